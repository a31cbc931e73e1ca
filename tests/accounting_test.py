"""Tests for tf_autoclip.accounting against published and closed-form privacy figures."""

import math
import re
import warnings

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from scipy import optimize, stats

from tf_autoclip import accounting


def _classic_rdp_epsilon(sigma, q, steps, delta, orders):
    """ε via the original RDP→(ε, δ) conversion ε = min_α RDP(α) + log(1/δ)/(α − 1).

    That conversion (Mironov 2017, Prop. 3) is what tensorflow-privacy's tutorials and the
    moments accountant of Abadi et al. used. The RDP curve is the one compute_epsilon
    composes (same events, same accountant), restricted to the publication's orders.
    """
    acct = accounting._composed_accountant(sigma, q, steps, "rdp")
    keep = np.isin(acct.orders, orders)
    assert keep.sum() == len(orders), "publication orders must be among the accountant's"
    return float(np.min(acct.rdp[keep] + math.log(1 / delta) / (acct.orders[keep] - 1)))


def _analytic_gaussian_epsilon(sigma, delta, sensitivity=1.0):
    """Exact ε of one Gaussian mechanism (Balle & Wang 2018, Theorem 8), solved with brentq.

    δ(ε) = Φ(Δ/(2σ) − εσ/Δ) − e^ε Φ(−Δ/(2σ) − εσ/Δ), σ the noise std.
    """

    def delta_of(eps):
        a = sensitivity / (2 * sigma)
        b = eps * sigma / sensitivity
        return stats.norm.cdf(a - b) - math.exp(eps) * stats.norm.cdf(-a - b)

    return optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 500.0, xtol=1e-12)


def _subsampled_gaussian_delta(eps, sigma, q):
    """Exact δ(ε) of ONE Poisson-subsampled Gaussian step, add/remove adjacency, Δ = 1.

    Neighbouring outputs are P = (1−q)·N(0, σ²) + q·N(1, σ²) and Q = N(0, σ²). The privacy
    loss is monotone in the output x, so both hockey-stick divergences are closed forms in Φ:
    remove (P vs Q) and add (Q vs P) directions; δ is their maximum.
    """
    sf, cdf = stats.norm.sf, stats.norm.cdf
    # Direction 1: sup_S P(S) − e^ε Q(S), attained on x > x1.
    x1 = sigma**2 * math.log((math.exp(eps) - 1 + q) / q) + 0.5
    d1 = (1 - q) * sf(x1 / sigma) + q * sf((x1 - 1) / sigma) - math.exp(eps) * sf(x1 / sigma)
    # Direction 2: sup_S Q(S) − e^ε P(S), attained on x < x2 (only if e^−ε > 1 − q).
    d2 = 0.0
    if math.exp(-eps) > 1 - q:
        x2 = sigma**2 * math.log((math.exp(-eps) - 1 + q) / q) + 0.5
        d2 = cdf(x2 / sigma) - math.exp(eps) * (
            (1 - q) * cdf(x2 / sigma) + q * cdf((x2 - 1) / sigma)
        )
    return max(d1, d2)


class PublishedFiguresTest(parameterized.TestCase, tf.test.TestCase):
    """ε against numbers published by others, each cited."""

    @parameterized.named_parameters(
        # tensorflow/privacy, tutorials/README.md, "Select Parameters" table for
        # tutorials/mnist_dpsgd_tutorial.py: n = 60000, batch 256, δ = 1e-5, RDP accountant,
        # steps = epochs * (60000 // 256), orders [1.1, 1.2, ..., 10.9] + [12, ..., 63].
        ("tfp_mnist_sigma1.12_60ep", 1.12, 256 / 60000, 60 * 234, 1e-5, 2.92, "tutorial"),
        ("tfp_mnist_sigma0.6_30ep", 0.6, 256 / 60000, 30 * 234, 1e-5, 9.74, "tutorial"),
        ("tfp_mnist_sigma1.2_10ep", 1.2, 256 / 60000, 10 * 234, 1e-5, 1.20, "tutorial"),
        # Abadi et al. 2016, "Deep Learning with Differential Privacy", Sec. 3.1: q = 0.01,
        # σ = 4, δ = 1e-5, T = 10000 gives ε ≈ 1.26 with the moments accountant (integer
        # moments λ ≤ 32, i.e. RDP orders 2..33, and the classic conversion).
        ("abadi2016_moments_accountant", 4.0, 0.01, 10000, 1e-5, 1.26, "abadi"),
    )
    def test_rdp_matches_published_rdp_figures(self, sigma, q, steps, delta, published, orders):
        orders = {
            "tutorial": [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)),
            "abadi": list(range(2, 34)),
        }[orders]
        # (1) The Poisson-subsampled Gaussian RDP curve reproduces the published figure
        # exactly (to its 2 printed decimals) under the publication's conversion and orders.
        self.assertAllClose(
            _classic_rdp_epsilon(sigma, q, steps, delta, orders), published, atol=0.015
        )
        # (2) compute_epsilon uses the improved conversion (Canonne et al. 2020), which is
        # smaller at every order by log(α)/(α−1) − log(1 − 1/α) (0.39 at α ≈ 9), over a superset
        # of the orders: it can only be lower, and not by more than that gain.
        eps = accounting.compute_epsilon(sigma, q, steps, delta)
        self.assertLessEqual(eps, published + 0.005)
        self.assertGreater(eps, 0.75 * published)

    def test_tensorflow_privacy_statement_figures(self):
        # tensorflow/privacy, tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_test.py,
        # test_dp_sgd_privacy_statement_no_user_dp_with_{rdp,pld}: 10000 examples, batch 64,
        # 5 epochs, noise multiplier 2.0 "with microbatching", δ = 1e-6, printed:
        #   RDP: once-per-epoch 13.376, Poisson 1.616; PLD: once-per-epoch 12.595, Poisson 1.199.
        # tensorflow-privacy halves σ when microbatching; tf-autoclip never adjusts σ, so the
        # equivalent input here is σ = 1.0. Their Poisson steps are ceil(epochs / q) = 782.
        q = 64 / 10000
        for acct, once_per_epoch, poisson in (("rdp", 13.376, 1.616), ("pld", 12.595, 1.199)):
            with self.subTest(accountant=acct):
                self.assertAllClose(
                    accounting.compute_epsilon(1.0, q, 782, 1e-6, acct), poisson, atol=6e-4
                )
                self.assertAllClose(
                    accounting.compute_epsilon(1.0, 1.0, 5, 1e-6, acct), once_per_epoch, atol=6e-4
                )
                # privacy_statement's conservative bound: 5 passes of 157 steps (no remainder
                # dropped) = 785 steps.
                text = accounting.privacy_statement(
                    1.0, q, 785, 1e-6, 10000, 64, acct, steps_per_epoch=157
                )
                self.assertIn("5 pass(es)", text)
                shuffle_eps = float(re.search(r"ε = (\S+)  conservative", text).group(1))
                self.assertAllClose(shuffle_eps, once_per_epoch, atol=6e-3)


class ClosedFormTest(parameterized.TestCase, tf.test.TestCase):
    @parameterized.parameters(0.5, 1.0, 2.0, 5.0)
    def test_one_gaussian_step_matches_analytic_gaussian(self, sigma):
        delta = 1e-5
        exact = _analytic_gaussian_epsilon(sigma, delta)
        eps_pld = accounting.compute_epsilon(sigma, 1.0, 1, delta, "pld")
        # PLD with pessimistic rounding is an upper bound, tight to its discretization.
        self.assertGreaterEqual(eps_pld, exact - 1e-9)
        self.assertLessEqual(eps_pld, exact + 1e-3)
        # RDP is a valid (looser) upper bound.
        self.assertGreaterEqual(accounting.compute_epsilon(sigma, 1.0, 1, delta), exact - 1e-9)

    def test_composed_gaussian_matches_analytic_gaussian(self):
        # k Gaussian releases with noise multiplier σ compose exactly into one with σ / √k.
        sigma, k, delta = 4.0, 16, 1e-6
        exact = _analytic_gaussian_epsilon(sigma / math.sqrt(k), delta)
        eps_pld = accounting.compute_epsilon(sigma, 1.0, k, delta, "pld")
        self.assertBetween(eps_pld, exact - 1e-9, exact + 1e-3)

    @parameterized.parameters((1.0, 0.1), (0.7, 0.01), (2.0, 0.5))
    def test_one_subsampled_step_matches_closed_form(self, sigma, q):
        delta = 1e-5
        exact = optimize.brentq(
            lambda e: _subsampled_gaussian_delta(e, sigma, q) - delta, 1e-9, 100.0, xtol=1e-12
        )
        eps_pld = accounting.compute_epsilon(sigma, q, 1, delta, "pld")
        self.assertBetween(eps_pld, exact - 1e-9, exact + 2e-3)
        self.assertGreaterEqual(accounting.compute_epsilon(sigma, q, 1, delta), exact - 1e-9)

    def test_pld_is_at_most_rdp(self):
        for sigma, q, steps in ((1.1, 256 / 60000, 14040), (0.8, 0.05, 500)):
            eps_rdp = accounting.compute_epsilon(sigma, q, steps, 1e-5, "rdp")
            eps_pld = accounting.compute_epsilon(sigma, q, steps, 1e-5, "pld")
            self.assertLess(eps_pld, eps_rdp)


class CalibrationTest(parameterized.TestCase, tf.test.TestCase):
    @parameterized.parameters(
        (3.0, 1e-5, 256 / 60000, None, 60, "rdp"),
        (1.0, 1e-6, 0.01, 2000, None, "rdp"),
        (8.0, 1e-5, 0.1, 300, None, "rdp"),
        (2.0, 1e-5, 0.02, 500, None, "pld"),
    )
    def test_round_trip(self, target, delta, q, steps, epochs, acct):
        tol = 1e-3
        sigma = accounting.compute_noise_multiplier(
            target, delta, q, steps=steps, epochs=epochs, accountant=acct, tolerance=tol
        )
        if steps is None:
            steps = math.ceil(epochs / q)
        self.assertLessEqual(accounting.compute_epsilon(sigma, q, steps, delta, acct), target)
        self.assertGreater(accounting.compute_epsilon(sigma - tol, q, steps, delta, acct), target)

    def test_published_mnist_setting(self):
        # The tutorial's σ = 1.12 for 2.92 under the classic conversion; the calibrated σ for
        # ε = 2.92 under the tighter conversion must be smaller, but not wildly so.
        sigma = accounting.compute_noise_multiplier(2.92, 1e-5, 256 / 60000, steps=14040)
        self.assertBetween(sigma, 0.9, 1.12)

    def test_epochs_convert_to_exact_steps(self):
        # 9 epochs at q = 0.03 are 300 steps, although the float 0.03 is slightly below 3/100;
        # 60 epochs at q = 256/60000 are ceil(14062.5) = 14063 steps. The fine tolerance
        # makes one step more give a different σ.
        def sigma(q, **kwargs):
            return accounting.compute_noise_multiplier(2.0, 1e-5, q, tolerance=1e-7, **kwargs)

        for epochs, q, steps in ((9, 0.03, 300), (60, 256 / 60000, 14063)):
            by_epochs = sigma(q, epochs=epochs)
            self.assertEqual(by_epochs, sigma(q, steps=steps))
            self.assertNotEqual(by_epochs, sigma(q, steps=steps + 1))

    def test_nothing_released_needs_no_noise(self):
        self.assertEqual(accounting.compute_noise_multiplier(1.0, 1e-5, 0.1, steps=0), 0.0)

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "exactly one of steps or epochs"):
            accounting.compute_noise_multiplier(1.0, 1e-5, 0.1, steps=10, epochs=1)
        with self.assertRaisesRegex(ValueError, "exactly one of steps or epochs"):
            accounting.compute_noise_multiplier(1.0, 1e-5, 0.1)
        with self.assertRaisesRegex(ValueError, "target_epsilon"):
            accounting.compute_noise_multiplier(0.0, 1e-5, 0.1, steps=10)
        with self.assertRaisesRegex(ValueError, "unreachable"):
            accounting.compute_noise_multiplier(1e-9, 1e-5, 1.0, steps=10**6)
        with self.assertRaisesRegex(ValueError, "tolerance"):
            accounting.compute_noise_multiplier(1.0, 1e-5, 0.1, steps=10, tolerance=0)


class MonotonicityTest(tf.test.TestCase):
    def test_epsilon_decreases_in_sigma(self):
        eps = [accounting.compute_epsilon(s, 0.01, 1000, 1e-5) for s in (0.6, 0.8, 1.0, 2.0, 4.0)]
        self.assertTrue(all(a > b for a, b in zip(eps, eps[1:], strict=False)), eps)

    def test_epsilon_increases_in_steps_and_q(self):
        for acct in ("rdp", "pld"):
            by_steps = [accounting.compute_epsilon(1.0, 0.01, t, 1e-5, acct) for t in (1, 10, 100)]
            self.assertTrue(all(a < b for a, b in zip(by_steps, by_steps[1:], strict=False)))
            by_q = [accounting.compute_epsilon(1.0, q, 100, 1e-5, acct) for q in (0.001, 0.01, 0.1)]
            self.assertTrue(all(a < b for a, b in zip(by_q, by_q[1:], strict=False)))

    def test_edge_cases(self):
        self.assertEqual(accounting.compute_epsilon(0.0, 0.01, 10, 1e-5), math.inf)
        self.assertEqual(accounting.compute_epsilon(0.0, 0.01, 10, 1e-5, "pld"), math.inf)
        self.assertEqual(accounting.compute_epsilon(1.0, 0.01, 0, 1e-5), 0.0)
        self.assertEqual(accounting.compute_epsilon(0.0, 0.01, 0, 1e-5), 0.0)
        self.assertIsInstance(accounting.compute_epsilon(1.0, 0.01, 10, 1e-5), float)


class ValidationTest(parameterized.TestCase, tf.test.TestCase):
    @parameterized.named_parameters(
        ("negative_sigma", dict(noise_multiplier=-0.1), "noise_multiplier"),
        ("nan_sigma", dict(noise_multiplier=float("nan")), "noise_multiplier"),
        ("q_above_one", dict(sampling_probability=1.5), "sampling_probability"),
        ("q_negative", dict(sampling_probability=-0.1), "sampling_probability"),
        ("delta_zero", dict(delta=0.0), "delta"),
        ("delta_one", dict(delta=1.0), "delta"),
        ("negative_steps", dict(steps=-1), "steps"),
        ("float_steps", dict(steps=1.5), "steps"),
        ("unknown_accountant", dict(accountant="moments"), "accountant"),
    )
    def test_invalid_inputs_raise(self, override, message):
        args = dict(
            noise_multiplier=1.0, sampling_probability=0.01, steps=10, delta=1e-5, accountant="rdp"
        )
        args.update(override)
        with self.assertRaisesRegex(ValueError, message):
            accounting.compute_epsilon(**args)
        with self.assertRaisesRegex(ValueError, message):
            accounting.privacy_statement(**args)

    def test_default_delta(self):
        for n in (3, 100, 60000, 10**9):
            self.assertAllClose(accounting.default_delta(n), 1 / (n * math.log(n)))
            self.assertLess(accounting.default_delta(n), 1 / n)
        with self.assertRaisesRegex(ValueError, "explicit delta"):
            accounting.default_delta(2)

    def test_warns_when_delta_not_below_one_over_n(self):
        with self.assertWarnsRegex(UserWarning, "1/num_examples"):
            accounting.compute_epsilon(1.0, 0.01, 10, 1e-3, num_examples=1000)
        with self.assertWarnsRegex(UserWarning, "1/num_examples"):
            accounting.privacy_statement(1.0, 0.01, 10, 1e-3, num_examples=1000)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            accounting.compute_epsilon(1.0, 0.01, 10, 1e-4, num_examples=1000)


class PrivacyStatementTest(tf.test.TestCase):
    def test_contents(self):
        n, b, steps, sigma, delta = 60000, 256, 14040, 1.1, 1e-5
        text = accounting.privacy_statement(sigma, b / n, steps, delta, n, b)
        poisson = accounting.compute_epsilon(sigma, b / n, steps, delta)
        # 60 passes of ceil(60000 / 256) = 235 steps (a Keras epoch keeps the partial batch),
        # each one full Gaussian release.
        shuffle = accounting.compute_epsilon(sigma, 1.0, 60, delta)
        self.assertIn(f"ε = {poisson:.4g}  with Poisson sampling", text)
        self.assertIn(f"ε = {shuffle:.4g}  conservative", text)
        self.assertIn("60 pass(es) of <= 235 steps", text)
        self.assertGreater(shuffle, poisson)
        for needle in (
            "σ = 1.1",
            "no microbatch adjustment",
            "q = 0.00426667",
            "steps = 14040",
            "δ = 1e-05",
            "add-or-remove-one",
            "Example-level",
            "hyperparameter tuning",
            "preprocessing",
            "released model",
        ):
            self.assertIn(needle, text)

    def test_partial_pass_counts_as_a_pass(self):
        text = accounting.privacy_statement(1.0, 0.1, 11, 1e-5, 100, 10)
        self.assertIn("2 pass(es) of <= 10 steps", text)

    def test_default_pass_length_is_a_keras_epoch(self):
        # Item 8: fit(x, y, batch_size=64, epochs=5) on 10,000 examples runs ceil(10000/64)
        # = 157 steps per epoch, the last one partial (785 steps; ceil(5 / q) = 782 is
        # tensorflow-privacy's count). Either way that is 5 passes, not 6.
        for steps in (782, 785):
            with self.subTest(steps=steps):
                text = accounting.privacy_statement(1.0, 64 / 10000, steps, 1e-6, 10000, 64)
                self.assertIn(f"steps = {steps} ", text)
                self.assertIn("5 pass(es) of <= 157 steps", text)
                shuffle_eps = float(re.search(r"ε = (\S+)  conservative", text).group(1))
                self.assertAllClose(
                    shuffle_eps, accounting.compute_epsilon(1.0, 1.0, 5, 1e-6), rtol=1e-3
                )
        # One more step starts a 6th pass.
        text = accounting.privacy_statement(1.0, 64 / 10000, 786, 1e-6, 10000, 64)
        self.assertIn("6 pass(es) of <= 157 steps", text)
        # From q alone: 1 / q steps per pass, rounded up, but 1 / (3/147) = 49.00000000000001
        # in floating point is 49 steps, not 50 (which would count 2450 steps as 49 passes).
        self.assertIn("ceil", accounting.privacy_statement.__doc__)
        text = accounting.privacy_statement(1.0, 3 / 147, 2450, 1e-5)
        self.assertIn("50 pass(es) of <= 49 steps", text)
        text = accounting.privacy_statement(1.0, 0.07, 15, 1e-5)  # 1 / 0.07 = 14.3
        self.assertIn("1 pass(es) of <= 15 steps", text)

    def test_overflow_probability_is_added_to_delta(self):
        sigma, q, steps, delta, eta = 1.0, 0.01, 100, 1e-5, 1e-7
        eps = accounting.compute_epsilon(sigma, q, steps, delta)
        text = accounting.privacy_statement(sigma, q, steps, delta, overflow_probability=eta)
        self.assertIn(f"{delta + (1 + math.exp(eps)) * eta:.6g} instead of δ", text)

    def test_inconsistent_batch_size(self):
        with self.assertRaisesRegex(ValueError, "batch_size"):
            accounting.privacy_statement(1.0, 0.01, 10, 1e-5, num_examples=1000, batch_size=64)


if __name__ == "__main__":
    tf.test.main()

"""tf_autoclip.audit's estimators against independent computations, and its canary helper.

- ``one_run_epsilon`` (Steinke, Nasr & Jagielski 2023): against the theorem's tail bound
  evaluated here term by term (a loop over the binomial pmf, ``brentq`` on it), the
  closed form of δ = 0 with every guess right, limits and monotonicity, and a simulated
  ε-DP randomized response (the worst case of the theorem) whose bound exceeds ε in at
  most 5% of runs.
- ``gdp_epsilon`` (Nasr et al. 2023): the μ-GDP to (ε, δ) conversion against the plain
  formula, the library's PLD accountant and dp-accounting's Gaussian mechanism; the
  confidence bound on μ against a normal approximation and by its coverage.
- ``gradient_canary_audit``: an honest DP-SGD step stays below its claimed ε, one with
  the noise divided by 10 is caught.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from scipy import optimize, stats

import tf_autoclip as ac
from tf_autoclip import audit

SIGNIFICANCE = 0.05  # confidence 0.95


# -- independent references ----------------------------------------------------------------
def reference_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke et al. (2023), Theorem 5.2 as stated: P[W >= v] <= beta + 2 m delta alpha."""
    q = math.exp(eps) / (1.0 + math.exp(eps))
    beta = sum(stats.binom.pmf(j, r, q) for j in range(v, r + 1))
    alpha, between = 0.0, 0.0
    for i in range(1, v + 1):
        between += stats.binom.pmf(v - i, r, q)  # P[v - i <= W < v]
        alpha = max(alpha, between / i)
    return min(1.0, beta + 2 * m * delta * alpha)


def reference_epsilon(m: int, r: int, v: int, delta: float) -> float:
    """The ε where the reference p-value crosses the significance (brentq on a grid bracket)."""

    def gap(eps):
        return reference_p_value(m, r, v, eps, delta) - SIGNIFICANCE

    grid = np.linspace(0.0, 20.0, 201)
    if gap(0.0) >= 0:
        return 0.0
    hi = next(e for e in grid if gap(e) >= 0)
    return optimize.brentq(gap, hi - 0.1, hi, xtol=1e-12)


def reference_gdp_delta(eps: float, mu: float) -> float:
    """Dong, Roth & Su (2019), Corollary 2.13, as written."""
    phi = stats.norm.cdf
    return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)


class OneRunEpsilonTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(
        (1000, 100, 100), (1000, 100, 80), (1000, 1000, 700), (100, 60, 45), (10_000, 500, 480)
    )
    def test_delta_zero_is_a_binomial_tail(self, m, r, v):
        # δ = 0: the bound solves P[Binomial(r, e^ε / (1 + e^ε)) >= v] = 0.05.
        def gap(eps):
            return stats.binom.sf(v - 1, r, 1 / (1 + math.exp(-eps))) - SIGNIFICANCE

        expected = optimize.brentq(gap, 0.0, 30.0, xtol=1e-12)
        self.assertAllClose(audit.one_run_epsilon(m, r, v, 0.0), expected, rtol=1e-6)

    @parameterized.parameters(
        (1000, 100, 100, 1e-5), (1000, 100, 80, 1e-5), (1000, 1000, 700, 1e-5),
        (100, 60, 45, 1e-3), (10_000, 500, 480, 1e-6), (1000, 200, 190, 1e-4),
    )  # fmt: skip
    def test_matches_the_theorem_evaluated_term_by_term(self, m, r, v, delta):
        expected = reference_epsilon(m, r, v, delta)
        self.assertAllClose(audit.one_run_epsilon(m, r, v, delta), expected, rtol=1e-6)
        self.assertAllClose(
            audit.one_run_p_value(m, r, v, 1.5, delta), reference_p_value(m, r, v, 1.5, delta)
        )

    def test_all_right_with_delta_zero_has_a_closed_form(self):
        # P[W >= r] = q^r = 0.05: ε = logit(0.05^(1/r)); grows without bound with r.
        for r in (10, 100, 1000, 10_000):
            q = SIGNIFICANCE ** (1 / r)
            self.assertAllClose(audit.one_run_epsilon(r, r, r, 0.0), math.log(q / (1 - q)))

    def test_limits_and_monotonicity(self):
        self.assertEqual(audit.one_run_epsilon(1000, 100, 0, 1e-5), 0.0)  # all wrong
        self.assertEqual(audit.one_run_epsilon(1000, 100, 50, 1e-5), 0.0)  # a coin flip
        self.assertEqual(audit.one_run_epsilon(1000, 0, 0, 1e-5), 0.0)  # no guesses
        bounds = [audit.one_run_epsilon(1000, 200, v, 1e-5) for v in range(110, 201, 10)]
        self.assertAllGreater(np.diff(bounds), 0.0)  # more right, larger ε
        # δ costs: more canaries (2 m δ) or a larger δ give a smaller bound.
        self.assertGreater(
            audit.one_run_epsilon(1000, 200, 190, 0.0), audit.one_run_epsilon(1000, 200, 190, 1e-4)
        )
        self.assertGreater(
            audit.one_run_epsilon(1000, 200, 190, 1e-5),
            audit.one_run_epsilon(100_000, 200, 190, 1e-5),
        )
        # Higher confidence, smaller bound.
        self.assertGreater(
            audit.one_run_epsilon(1000, 200, 190, 1e-5),
            audit.one_run_epsilon(1000, 200, 190, 1e-5, confidence=0.99),
        )

    def test_approaches_the_true_epsilon_with_many_guesses(self):
        # ε-DP randomized response is right with probability e^ε / (1 + e^ε): with a
        # million guesses right at exactly that rate, the bound is just below ε.
        for eps in (0.5, 2.0, 4.0):
            r = 1_000_000
            v = round(r / (1 + math.exp(-eps)))
            self.assertBetween(audit.one_run_epsilon(r, r, v, 0.0), eps - 0.03, eps)

    def test_randomized_response_is_not_overestimated(self):
        # The theorem's worst case: an ε-DP randomized response of each canary's bit.
        rng = np.random.default_rng(2023)
        for eps, delta in ((1.0, 0.0), (2.0, 1e-5)):
            m, runs = 1000, 200
            correct = rng.binomial(m, 1 / (1 + math.exp(-eps)), size=runs)
            bounds = np.array([audit.one_run_epsilon(m, m, int(v), delta) for v in correct])
            self.assertGreaterEqual(np.mean(bounds <= eps), 0.95)
            self.assertGreater(np.median(bounds), eps - 0.5)  # and not vacuous

    def test_from_scores(self):
        rng = np.random.default_rng(0)
        included = rng.permutation(np.arange(1000) < 500)  # 500 in, 500 out
        separated = included + rng.uniform(0.0, 0.5, 1000)
        perfect = audit.one_run_epsilon_from_scores(separated, included, 0.0)
        # Every guess right, 1000 guesses at the Bonferroni level for 6 choices of k.
        q = (SIGNIFICANCE / 6) ** (1 / 1000)
        self.assertAllClose(perfect, (math.log(q / (1 - q)), 1000, 1000))
        eps, k, v = audit.one_run_epsilon_from_scores(
            included + rng.normal(size=1000), included, 1e-5, num_guesses=[100, 400]
        )
        self.assertIn(k, (100, 400))
        self.assertAllClose(eps, audit.one_run_epsilon(1000, k, v, 1e-5, 1 - SIGNIFICANCE / 2))
        noise = audit.one_run_epsilon_from_scores(rng.normal(size=1000), included, 1e-5)
        self.assertLess(noise[0], 0.3)

    def test_argument_errors(self):
        for args, error, message in [
            ((1000, 100, 101, 1e-5), ValueError, "num_correct"),
            ((1000, 1001, 10, 1e-5), ValueError, "num_guesses"),
            ((0, 0, 0, 1e-5), ValueError, "num_canaries"),
            ((1000.5, 100, 10, 1e-5), TypeError, "integer"),
            ((True, 1, 1, 1e-5), TypeError, "integer"),
            ((1000, 100, -1, 1e-5), ValueError, "num_correct"),
            ((1000, 100, 10, 1.0), ValueError, "delta"),
            ((1000, 100, 10, -1e-5), ValueError, "delta"),
            ((1000, 100, 10, 1e-5, 1.0), ValueError, "confidence"),
        ]:
            with self.subTest(args=args), self.assertRaisesRegex(error, message):
                audit.one_run_epsilon(*args)


class GdpEpsilonTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters((0.2, 1e-5), (2 / 3, 1e-5), (1.0, 1e-6), (3.0, 1e-5), (8.0, 1e-3))
    def test_conversion_matches_the_formula_and_the_accountants(self, mu, delta):
        eps = audit.gdp_epsilon_from_mu(mu, delta)
        self.assertAllClose(reference_gdp_delta(eps, mu), delta, rtol=1e-6)
        self.assertAllClose(audit.gdp_delta(eps, mu), delta, rtol=1e-6)
        # A Gaussian release with noise multiplier 1/μ is μ-GDP, and that is tight.
        self.assertAllClose(eps, dp_accounting.get_epsilon_gaussian(1 / mu, delta), rtol=1e-5)
        pld = ac.compute_epsilon(1 / mu, 1.0, 1, delta, accountant="pld")
        self.assertAllClose(eps, pld, rtol=2e-3)

    def test_conversion_edges(self):
        self.assertEqual(audit.gdp_epsilon_from_mu(0.0, 1e-5), 0.0)
        self.assertEqual(audit.gdp_epsilon_from_mu(1e-6, 1e-5), 0.0)  # δ(0) < δ
        with self.assertRaisesRegex(ValueError, "mu"):
            audit.gdp_epsilon_from_mu(float("nan"), 1e-5)
        with self.assertRaisesRegex(ValueError, "delta"):
            audit.gdp_epsilon_from_mu(1.0, 0.0)

    def test_mu_bound_matches_a_normal_approximation(self):
        # Large samples: the lower bound ≈ μ̂ - z·se, se² = 1/n_in + 1/n_out + μ̂²/(2 n).
        rng = np.random.default_rng(1)
        x_in, x_out = rng.normal(0.8, 2.0, 20_000), rng.normal(0.0, 2.0, 30_000)
        mu_hat, lower = audit.gdp_mu_lower_bound(x_in, x_out)
        pooled = np.sqrt((19_999 * x_in.var(ddof=1) + 29_999 * x_out.var(ddof=1)) / 49_998)
        self.assertAllClose(mu_hat, (x_in.mean() - x_out.mean()) / pooled)
        se = math.sqrt(1 / 20_000 + 1 / 30_000 + mu_hat**2 / (2 * 50_000))
        self.assertAllClose(lower, mu_hat - stats.norm.ppf(0.95) * se, atol=2e-4)
        self.assertAllClose(
            audit.gdp_epsilon(x_in, x_out, 1e-5), audit.gdp_epsilon_from_mu(lower, 1e-5)
        )

    def test_mu_bound_covers_the_true_mu(self):
        rng = np.random.default_rng(5)
        runs = 400
        lows = [audit.gdp_mu_lower_bound(rng.normal(1, 1, 30), rng.normal(0, 1, 40))[1]
                for _ in range(runs)]  # fmt: skip
        # Exact under the model: coverage 95%, within 3 binomial standard errors.
        self.assertGreaterEqual(np.mean(np.array(lows) <= 1.0), 0.95 - 3 * math.sqrt(0.0475 / runs))

    def test_simulated_gaussian_mechanism_stays_below_its_epsilon(self):
        sigma, delta = 1.5, 1e-5
        claimed = ac.compute_epsilon(sigma, 1.0, 1, delta, accountant="pld")
        rng = np.random.default_rng(0)
        eps = audit.gdp_epsilon(rng.normal(1, sigma, 40_000), rng.normal(0, sigma, 40_000), delta)
        self.assertBetween(eps, claimed - 0.3, claimed)
        self.assertEqual(audit.gdp_epsilon(rng.normal(size=100), rng.normal(size=100), delta), 0)

    def test_argument_errors(self):
        with self.assertRaisesRegex(ValueError, "at least 2"):
            audit.gdp_epsilon([1.0], [0.0, 1.0], 1e-5)
        with self.assertRaisesRegex(ValueError, "finite"):
            audit.gdp_epsilon([1.0, np.nan], [0.0, 1.0], 1e-5)
        with self.assertRaisesRegex(ValueError, "zero variance"):
            audit.gdp_epsilon([1.0, 1.0], [0.0, 0.0], 1e-5)


class GradientCanaryAuditTest(tf.test.TestCase):
    SIGMA, DELTA = 1.5, 1e-5

    def optimizer_fn(self, sigma):
        def make(expected_batch_size):
            return ac.DPAutoSGD(
                learning_rate=1.0, noise_multiplier=sigma,
                expected_batch_size=expected_batch_size, seed=3,
            )  # fmt: skip

        return make

    def test_honest_below_claim_broken_caught(self):
        claimed = ac.compute_epsilon(self.SIGMA, 1.0, 1, self.DELTA, accountant="pld")
        honest = audit.gradient_canary_audit(self.optimizer_fn(self.SIGMA), 2000, self.DELTA)
        scores = honest.canaries
        self.assertEqual(scores.scores.shape, (2000,))
        self.assertBetween(scores.included.mean(), 0.45, 0.55)
        # Scores are the mechanism: noise std σ·S, the canary adds S = 1.
        self.assertAllClose(np.std(scores.out_scores), self.SIGMA, rtol=0.1)
        self.assertAllClose(honest.gdp_mu, 1 / self.SIGMA, atol=0.15)
        self.assertLess(honest.one_run_epsilon, claimed)
        self.assertBetween(honest.gdp_epsilon, 1.0, claimed)
        broken = audit.gradient_canary_audit(self.optimizer_fn(self.SIGMA / 10), 2000, self.DELTA)
        self.assertGreater(broken.one_run_epsilon, claimed + 1)
        self.assertGreater(broken.gdp_epsilon, claimed + 10)
        self.assertIn("one-run ε ≥", str(broken))

    def test_steps_compose(self):
        # Three steps: shift 3 S, noise std sqrt(3) σ S (μ = sqrt(3) / σ).
        canaries = audit.gradient_canary_scores(
            self.optimizer_fn(self.SIGMA), np.arange(600) % 2 == 0, steps=3, chunk=300
        )
        shift = canaries.in_scores.mean() - canaries.out_scores.mean()
        self.assertAllClose(shift, 3.0, atol=5 * math.sqrt(3) * self.SIGMA / math.sqrt(150))
        self.assertAllClose(np.std(canaries.out_scores), math.sqrt(3) * self.SIGMA, rtol=0.15)

    def test_refuses_stateful_optimizers(self):
        def momentum(expected_batch_size):
            return ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=1.0, momentum=0.9,
                                expected_batch_size=expected_batch_size)  # fmt: skip

        with self.assertRaisesRegex(ValueError, "without momentum"):
            audit.gradient_canary_scores(momentum, [True, False])


if __name__ == "__main__":
    tf.test.main()

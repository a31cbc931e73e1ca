"""Empirical privacy audit: a lower bound on ε from distinguishing D from D ∪ {canary}.

In the style of Jagielski et al. (2020) and Nasr et al. (2023, "Tight auditing of
DP-SGD"), with a white-box gradient canary:

- **Neighbours.** D holds ``BENIGN`` fixed examples; D' = D ∪ {canary}. One full-batch
  (q = 1) step of ``DPAutoSGD`` is taken on D or on D' from the same initial weights,
  and the updated weights are released.
- **Canary.** The model is ``p = <e_t, x>`` (an ``Embedding`` row ``e_t`` dotted with
  the input ``x``) with loss ``-p``, so an example's gradient is ``-x`` in row ``t`` and
  zero elsewhere, whatever the weights. The canary is ``x = CANARY_NORM * u`` (u a unit
  vector): its gradient is known, with a norm far above any clipping threshold, so its
  clipped contribution is (almost exactly) the sensitivity S along u.
- **Test.** The released row projected on u, rescaled: ``s = B/lr * <theta' - theta, u>``
  is ``sum_i c_i <x_i, u> - noise``; the canary adds about S to it, the noise is
  N(0, (sigma S)^2). Thresholding ``s`` is the optimal (Neyman-Pearson) test between
  the two Gaussians. The threshold and the direction of the test are chosen on one half
  of the trials (calibration); the false-positive and false-negative rates are counted
  on the other half.
- **Bound.** Any (ε, δ)-DP mechanism has ``FPR + e^ε FNR >= 1 - δ`` and
  ``FNR + e^ε FPR >= 1 - δ``. With one-sided Clopper-Pearson upper bounds at level
  ``1 - ALPHA`` on both rates (jointly at 95% by the union bound),
  ``ε_lb = max(log((1 - δ - FNR_up) / FPR_up), log((1 - δ - FPR_up) / FNR_up))``.

**Vectorized trials** (``tf_autoclip.audit.gradient_canary_scores``; the estimators are
``tf_autoclip.audit.threshold_epsilon`` and its helpers). Trial t uses Embedding row t
only: ``CHUNK`` trials share one ``train_on_batch`` call whose batch holds every trial's
copy of D (or D') tagged with its row index; on D the canary's slot holds ``x = 0``, a
zero gradient that clipping keeps at exactly zero. Clipping is per example and an
example's gradient lives in its own row, so each row receives exactly its trial's
clipped sum, plus the library's i.i.d. Gaussian noise, divided by
``expected_batch_size = BENIGN`` (a fixed denominator, as the accountant assumes). Each
row is thus an independent run of the mechanism on a ``DIM``-parameter model; the
weights are reset to 0 between calls.

**What is exercised** (the library's real code): ``make_private`` and Keras'
``train_on_batch`` -> the private ``train_step`` with the compiled loss -> the
``"vectorized"`` per-example engine (``tf.vectorized_map``, Embedding gradients made
dense) -> ``clipping.clip_and_sum`` with the mode's clip factors -> the optimizer's
``privatize`` (sensitivity, denominator, noise std) -> ``noise.noisy_average`` (the
seeded Philox noise) -> ``apply_gradients`` of SGD. Not exercised: Poisson subsampling
(q = 1 here), composition over steps, microbatches, gradient accumulation, distribution
strategies, other engines and clipping styles; the accountant is only checked to be an
upper bound at one step, q = 1.

**Settings and results** (sigma = 1.5, one step, q = 1, δ = 1e-5; 40,000 trials each
of D and D', 20,000 of each to calibrate and 20,000 to measure). The claimed ε is the
smaller of ``ac.compute_epsilon``'s RDP (2.985) and PLD (2.753) values. Measured lower
bounds (each audit has its own noise seed):

=============================================  ======  =========  ===============
mechanism                                      ε_lb    claimed ε  asserted
=============================================  ======  =========  ===============
auto-s                                         1.428   2.753      0.5 < ε_lb <= ε
auto-v                                         1.680   2.753      0.5 < ε_lb <= ε
abadi (R = 0.5)                                1.540   2.753      0.5 < ε_lb <= ε
auto-s, noise std scaled down 4x (broken)      6.007   2.753      > ε + 1
auto-s, noise std scaled down 2x (broken)      3.178   2.753      > ε
abadi, sensitivity under-estimated 4x (broken) 5.691   2.753      > ε + 1
=============================================  ======  =========  ===============

For reference: with 20,000 measured trials of each kind, a perfect test (no errors)
would give ε_lb = 8.6, so the broken mechanisms are not capped by the trial count;
the honest ones stay 1.1-1.4 below the claim. Everything is seeded (data, model, the
optimizer's noise seed), so the numbers are the same on every run; the file runs in
about 35 s on 2 CPU cores.
"""

from __future__ import annotations

import math
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tf_autoclip import audit
from tf_autoclip import clipping as clipping_lib
from tf_autoclip import noise as noise_lib

SIGMA = 1.5
DELTA = 1e-5
L2_NORM_CLIP = 0.5  # R for "abadi"
TRIALS = 40_000  # per neighbouring dataset; half calibrate the test, half measure it
CHUNK = 1_000  # trials per train_on_batch call (Embedding rows)
DIM = 2  # parameters per trial
BENIGN = 3  # examples in D
CANARY_NORM = 100.0
ALPHA = 0.025  # per Clopper-Pearson bound: both rates hold jointly at 95%
NUM_THRESHOLDS = 399
BROKEN_FACTOR = 4.0


# -- statistics: tf_autoclip.audit's estimators -----------------------------------------
def audit_epsilon(scores_out: np.ndarray, scores_in: np.ndarray, delta: float = DELTA):
    """ε_lb of the threshold test: chosen on the first half, counted on the second."""
    return audit.threshold_epsilon(
        scores_out, scores_in, delta, alpha=ALPHA, num_thresholds=NUM_THRESHOLDS
    )


def claimed_epsilon(sigma: float = SIGMA) -> float:
    """What the library claims for one full-batch step: its tighter accountant."""
    return min(
        ac.compute_epsilon(sigma, 1.0, 1, DELTA, accountant="rdp"),
        ac.compute_epsilon(sigma, 1.0, 1, DELTA, accountant="pld"),
    )


# -- the mechanism, many trials at once: tf_autoclip.audit's gradient canaries ------------
def run_trials(clipping: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``s`` of ``TRIALS`` one-step runs on D and ``TRIALS`` on D'.

    ``seed`` is the optimizer's noise seed: each audit uses its own noise draws. The
    ``TRIALS // CHUNK`` calls on D come first, then those on D'.
    """

    def optimizer_fn(expected_batch_size):
        return ac.DPAutoSGD(
            learning_rate=1.0,
            noise_multiplier=SIGMA,
            clipping=clipping,
            l2_norm_clip=L2_NORM_CLIP if clipping == "abadi" else None,
            expected_batch_size=expected_batch_size,
            seed=seed,
        )

    keras.utils.set_random_seed(0)
    included = np.repeat([False, True], TRIALS)
    canaries = audit.gradient_canary_scores(
        optimizer_fn, included, num_benign=BENIGN, dim=DIM, canary_norm=CANARY_NORM,
        chunk=CHUNK, engine="vectorized",
    )  # fmt: skip
    return canaries.out_scores, canaries.in_scores


def _noise_scaled_down(noisy_average, factor: float):
    def broken(clipped_sum, stddev, denominator, seed, *rest):
        return noisy_average(clipped_sum, stddev / factor, denominator, seed, *rest)

    return broken


# -- tests -----------------------------------------------------------------------------
class StatisticsTest(tf.test.TestCase):
    def test_clopper_pearson_upper(self):
        clopper_pearson_upper = audit.clopper_pearson_upper
        # k = 0: the bound solves (1 - p)^n = alpha.
        self.assertAllClose(clopper_pearson_upper(0, 1000, 0.05), 1 - 0.05 ** (1 / 1000))
        self.assertEqual(float(clopper_pearson_upper(10, 10, 0.05)), 1.0)
        self.assertBetween(float(clopper_pearson_upper(50, 1000, 0.05)), 0.05, 0.07)

    def test_epsilon_lower_bound(self):
        epsilon_lower_bound = audit.epsilon_from_error_rates
        # Perfect separation of n trials each: ε_lb = log((1 - δ - p) / p), p the k=0 bound.
        p = 1 - ALPHA ** (1 / 20_000)
        self.assertAllClose(
            epsilon_lower_bound(0, 0, 20_000, 20_000, DELTA, ALPHA), math.log((1 - DELTA - p) / p)
        )
        # A coin flip test gives nothing.
        self.assertEqual(float(epsilon_lower_bound(500, 500, 1000, 1000, DELTA, ALPHA)), 0.0)

    def test_audit_of_simulated_gaussians(self):
        # Shift 1/sigma between unit Gaussians: the Gaussian mechanism the audit targets.
        rng = np.random.default_rng(0)
        honest = audit_epsilon(rng.normal(size=TRIALS), rng.normal(1 / SIGMA, size=TRIALS))
        self.assertBetween(honest, 0.5, claimed_epsilon())


class PrivacyAuditTest(tf.test.TestCase, parameterized.TestCase):
    def assert_scores_are_the_mechanism(self, scores_out, scores_in, sensitivity):
        # Noise std sigma * S, canary shift ~S: the audit sees the mechanism it targets.
        self.assertAllClose(np.std(scores_out), SIGMA * sensitivity, rtol=0.03)
        shift = np.mean(scores_in) - np.mean(scores_out)
        self.assertAllClose(shift, sensitivity, atol=6 * SIGMA * sensitivity / math.sqrt(TRIALS))

    @parameterized.parameters(("auto-s", 1), ("auto-v", 2), ("abadi", 3))
    def test_honest_mechanism_stays_below_claimed_epsilon(self, clipping, seed):
        scores_out, scores_in = run_trials(clipping, seed)
        sensitivity = L2_NORM_CLIP if clipping == "abadi" else 1.0
        self.assert_scores_are_the_mechanism(scores_out, scores_in, sensitivity)
        eps_lb = audit_epsilon(scores_out, scores_in)
        print(f"audit {clipping}: eps_lb = {eps_lb:.3f}, claimed {claimed_epsilon():.3f}")
        self.assertLessEqual(eps_lb, claimed_epsilon())
        self.assertGreater(eps_lb, 0.5)  # the audit is not vacuous

    # Factor 4: the broken case the audit must catch by a wide margin. Factor 2: the size
    # of a forgotten microbatch factor (2 S); caught too (the lower bound exceeds the
    # claim), with the trials of two noise seeds pooled: one seed's 40,000 trials gave
    # eps_lb 2.80, 3.05, 3.69, 3.48 for seeds 6-9 (claimed 2.75), too close to call alone.
    @parameterized.parameters((BROKEN_FACTOR, (4,), 1.0), (2.0, (6, 7), 0.0))
    def test_noise_scaled_down_is_caught(self, factor, seeds, margin):
        broken = _noise_scaled_down(noise_lib.noisy_average, factor)
        with mock.patch.object(noise_lib, "noisy_average", broken):
            trials = [run_trials("auto-s", seed) for seed in seeds]
        scores_out = np.concatenate([out for out, _ in trials])
        scores_in = np.concatenate([in_ for _, in_ in trials])
        self.assertAllClose(np.std(scores_out), SIGMA / factor, rtol=0.03)
        eps_lb = audit_epsilon(scores_out, scores_in)
        print(f"audit auto-s, noise / {factor:g}: eps_lb = {eps_lb:.3f}, claimed "
              f"{claimed_epsilon():.3f}")  # fmt: skip
        self.assertGreater(eps_lb, claimed_epsilon() + margin)

    def test_underestimated_sensitivity_is_caught(self):
        def sensitivity(config):
            return float(config.l2_norm_clip or 1.0) / BROKEN_FACTOR

        with mock.patch.object(clipping_lib.ClippingConfig, "sensitivity", property(sensitivity)):
            scores_out, scores_in = run_trials("abadi", 5)
        eps_lb = audit_epsilon(scores_out, scores_in)
        print(f"audit abadi, S / 4: eps_lb = {eps_lb:.3f}, claimed {claimed_epsilon():.3f}")
        self.assertGreater(eps_lb, claimed_epsilon() + 1.0)


if __name__ == "__main__":
    tf.test.main()

"""Tests for tf_autoclip.sampling: Poisson inclusion, padding, overflow, determinism."""

import math
import warnings
from fractions import Fraction

import keras
import numpy as np
import tensorflow as tf
from scipy import stats

from tf_autoclip import sampling
from tf_autoclip.accounting import default_delta


def _batches(sampler):
    """List of (indices of the real rows, x, y, w) per step; x[:, 0] holds the example index."""
    out = []
    for xb, yb, wb in sampler.dataset.as_numpy_iterator():
        out.append((xb[wb > 0, 0].astype(int), xb, yb, wb))
    return out


def _data(n):
    x = np.stack([np.arange(n), 2 * np.arange(n) + 1], axis=1).astype(np.float32)
    y = (np.arange(n) + 1000).astype(np.int32)
    return x, y


class PoissonInclusionTest(tf.test.TestCase):
    """The realized sampling is Poisson(q): checked against 5-sigma binomial bands."""

    def test_inclusion_frequency_variance_and_independence(self):
        n, q, steps = 100, 0.1, 3000
        x, y = _data(n)
        s = sampling.poisson_sample(x, y, sampling_probability=q, steps=steps, seed=7)
        included = np.zeros((steps, n), dtype=bool)
        for t, (idx, _, _, _) in enumerate(_batches(s)):
            self.assertEqual(len(np.unique(idx)), len(idx))  # no example twice in a batch
            included[t, idx] = True
        self.assertEqual(s.overflow_probability < 1e-9, True)
        # Every example: count ~ Binomial(steps, q); 5 sigma = 82 around 300.
        per_example = included.sum(axis=0)
        sd = math.sqrt(steps * q * (1 - q))
        self.assertAllInRange(per_example, steps * q - 5 * sd, steps * q + 5 * sd)
        # All inclusions together: Binomial(n·steps, q); 5 sigma is 2.7% of the mean, so a
        # q off by 5% fails.
        total_sd = math.sqrt(n * steps * q * (1 - q))
        self.assertAllClose(included.sum(), n * steps * q, atol=5 * total_sd)
        # Batch sizes ~ Binomial(n, q): variance n·q·(1−q) = 9. A fixed-size batch (variance 0)
        # or sampling without independence fails. The sample variance of 3000 draws has
        # standard deviation ≈ 9·sqrt(2/2999) = 0.23; band ±1.5 (> 6 sigma).
        self.assertAllClose(included.sum(axis=1).var(ddof=1), n * q * (1 - q), atol=1.5)
        # Fresh randomness every step: P(in step t and t+1) = q² = 0.01 (reusing a sample would
        # give q = 0.1). Mean 2999, sd ≈ 59 (with the overlap covariance); band ±5 sd.
        both = np.logical_and(included[1:], included[:-1]).sum()
        self.assertAllClose(both, n * (steps - 1) * q * q, atol=300)

    def test_inclusion_threshold_never_exceeds_q(self):
        for q in (1e-6, 0.00426, 0.1, 1 / 3, 0.5, 0.999999):
            # Exact rational arithmetic: P(include) = threshold / 2^64 is in (q − 2^-64, q].
            p_include = Fraction(sampling._inclusion_threshold(q), 2**64)
            self.assertLessEqual(p_include, Fraction(q))
            self.assertGreater(p_include, Fraction(q) - Fraction(1, 2**64))
        self.assertIsNone(sampling._inclusion_threshold(1.0))

    def test_full_batch(self):
        x, y = _data(20)
        s = sampling.poisson_sample(x, y, sampling_probability=1.0, steps=3, seed=0)
        for idx, _, _, _ in _batches(s):
            self.assertAllEqual(idx, np.arange(20))


class ShapeAndPaddingTest(tf.test.TestCase):
    def test_static_shapes_and_harmless_padding(self):
        n = 64
        x, y = _data(n)
        images = np.random.default_rng(0).random((n, 2, 3)).astype(np.float32)
        s = sampling.poisson_sample(
            {"ids": x, "img": images}, y, expected_batch_size=8, steps=30, seed=1
        )
        B = s.padded_batch_size
        spec_x, spec_y, spec_w = s.dataset.element_spec
        self.assertEqual(spec_x["ids"].shape.as_list(), [B, 2])
        self.assertEqual(spec_x["img"].shape.as_list(), [B, 2, 3])
        self.assertEqual(spec_y.shape.as_list(), [B])
        self.assertEqual(spec_w.shape.as_list(), [B])
        for xb, yb, wb in s.dataset.as_numpy_iterator():
            k = int(wb.sum())
            # Real rows first with weight 1, then padding with weight 0.
            self.assertAllEqual(wb, np.r_[np.ones(k), np.zeros(B - k)])
            idx = xb["ids"][:k, 0].astype(int)
            self.assertAllEqual(xb["ids"][:k], x[idx])  # rows are whole examples,
            self.assertAllEqual(xb["img"][:k], images[idx])  # aligned across x and y
            self.assertAllEqual(yb[:k], y[idx])
            # Padding carries no data from any example.
            self.assertAllEqual(xb["ids"][k:], np.zeros((B - k, 2)))
            self.assertAllEqual(xb["img"][k:], np.zeros((B - k, 2, 3)))
            self.assertAllEqual(yb[k:], np.zeros(B - k))

    def test_user_sample_weights_are_multiplied_by_the_mask(self):
        n = 50
        x, y = _data(n)
        sw = np.linspace(0.0, 1.0, n).astype(np.float32)
        s = sampling.poisson_sample(
            x, y, sw, sampling_probability=0.2, steps=20, padded_batch_size=n, seed=3
        )
        for xb, _, wb in s.dataset.as_numpy_iterator():
            real = xb[:, 1] > 0  # x[:, 1] = 2i + 1 > 0 for real rows, 0 for padding
            self.assertAllClose(wb[real], sw[xb[real, 0].astype(int)])
            self.assertAllEqual(wb[~real], np.zeros((~real).sum()))

    def test_rejects_weights_outside_unit_interval(self):
        x, y = _data(10)
        for bad in (np.full(10, 1.5), np.full(10, -0.1)):
            with self.assertRaisesRegex(ValueError, r"\[0, 1\]"):
                sampling.poisson_sample(x, y, bad, sampling_probability=0.5, steps=1)

    def test_without_targets(self):
        x, _ = _data(10)
        s = sampling.poisson_sample(x, sampling_probability=0.5, steps=2, seed=0)
        xb, yb, wb = next(iter(s.dataset))
        self.assertIsNone(yb)
        self.assertEqual(xb.shape[0], wb.shape[0])


class PaddedSizeAndOverflowTest(tf.test.TestCase):
    def test_default_padded_size_is_smallest_within_budget(self):
        for n, ebs, steps in ((1000, 50, 40), (60000, 256, 2000), (30, 3, 100)):
            x = np.zeros((n, 1), np.float32)
            s = sampling.poisson_sample(x, expected_batch_size=ebs, steps=steps, seed=0)
            q, B = ebs / n, s.padded_batch_size
            budget = 1e-6 * default_delta(n)
            # Union bound over steps, with n + 1 examples (the larger neighbour).
            self.assertLessEqual(steps * stats.binom.sf(B, n + 1, q), budget)
            self.assertGreater(steps * stats.binom.sf(B - 1, n + 1, q), budget)
            self.assertAllClose(s.overflow_probability, steps * stats.binom.sf(B, n + 1, q))

    def test_overflow_keeps_uniform_random_subset(self):
        n, q, B, steps = 40, 0.5, 10, 2000
        x, y = _data(n)
        with self.assertWarnsRegex(UserWarning, "overflow_probability"):
            s = sampling.poisson_sample(
                x, y, sampling_probability=q, steps=steps, padded_batch_size=B, seed=5
            )
        self.assertAllClose(s.overflow_probability, 1.0)
        counts = np.zeros(n)
        for idx, xb, _, _ in _batches(s):
            self.assertEqual(xb.shape[0], B)
            self.assertEqual(len(np.unique(idx)), len(idx))
            self.assertLessEqual(len(idx), B)
            counts[idx] += 1
        # Truncation keeps a uniformly random subset: every example is kept equally often,
        # about B/n = 0.25 of the steps (≤ q, so no example is sampled more than Poisson says).
        # Per-example counts are ~Binomial(2000, 0.25): sd 19.4, band 5 sd.
        self.assertAllClose(counts.mean(), steps * B / n, atol=1.0)
        sd = math.sqrt(steps * 0.25 * 0.75)
        self.assertAllInRange(counts, counts.mean() - 5 * sd, counts.mean() + 5 * sd)
        self.assertLess(counts.max() / steps, q)

    def test_explicit_size_within_budget_does_not_warn(self):
        x = np.zeros((100, 1), np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sampling.poisson_sample(x, sampling_probability=0.1, steps=10, padded_batch_size=101)


class DeterminismTest(tf.test.TestCase):
    def _indices(self, **kwargs):
        x, y = _data(50)
        s = sampling.poisson_sample(x, y, sampling_probability=0.2, steps=20, **kwargs)
        return [tuple(idx) for idx, _, _, _ in _batches(s)]

    def test_seed_determinism_and_resume(self):
        run = self._indices(seed=11)
        self.assertEqual(run, self._indices(seed=11))
        self.assertNotEqual(run, self._indices(seed=12))
        self.assertNotEqual(self._indices(), self._indices())  # seed=None: fresh secret seed
        # Resuming at step 8 with the same seed continues the same run.
        self.assertEqual(run[8:], self._indices(seed=11, initial_step=8))

    def test_seed_not_in_repr(self):
        x, _ = _data(10)
        s = sampling.poisson_sample(x, sampling_probability=0.5, steps=1, seed=123456789)
        self.assertNotIn("123456789", repr(s))


class ApiTest(tf.test.TestCase):
    def test_fields_and_keras_fit(self):
        n = 200
        x = np.random.default_rng(0).random((n, 3)).astype(np.float32)
        y = x.sum(axis=1, keepdims=True)
        s = sampling.poisson_sample(x, y, expected_batch_size=20, epochs=3, seed=0)
        self.assertEqual(s.num_examples, n)
        self.assertAllClose(s.sampling_probability, 0.1)
        self.assertEqual(s.expected_batch_size, 20)
        self.assertEqual(s.steps_per_epoch, 10)  # round(1 / q)
        self.assertEqual((s.steps, s.epochs), (30, 3))
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        model.fit(
            s.dataset, epochs=s.epochs, steps_per_epoch=s.steps_per_epoch, shuffle=False, verbose=0
        )
        self.assertEqual(int(model.optimizer.iterations.numpy()), s.steps)

    def test_steps_per_epoch_rounds_one_over_q(self):
        x = np.zeros((1000, 1), np.float32)
        s = sampling.poisson_sample(x, sampling_probability=0.003, steps=1000)
        self.assertEqual(s.steps_per_epoch, 333)
        self.assertEqual(s.epochs, 4)

    def test_invalid_arguments(self):
        x, y = _data(10)
        cases = [
            (dict(sampling_probability=0.1, expected_batch_size=1, steps=1), "exactly one"),
            (dict(steps=1), "exactly one"),
            (dict(sampling_probability=0.1), "exactly one of steps"),
            (dict(sampling_probability=0.1, steps=1, epochs=1), "exactly one of steps"),
            (dict(sampling_probability=0.0, steps=1), "sampling_probability"),
            (dict(expected_batch_size=11, steps=1), "expected_batch_size"),
            (dict(sampling_probability=0.1, steps=-1), "steps"),
            (dict(sampling_probability=0.1, steps=5, initial_step=6), "initial_step"),
            (dict(sampling_probability=0.1, steps=5, padded_batch_size=0), "padded_batch_size"),
        ]
        for kwargs, message in cases:
            with self.subTest(kwargs=kwargs), self.assertRaisesRegex(ValueError, message):
                sampling.poisson_sample(x, y, **kwargs)
        with self.assertRaisesRegex(ValueError, "same number of examples"):
            sampling.poisson_sample(x, y[:5], sampling_probability=0.1, steps=1)


if __name__ == "__main__":
    tf.test.main()


class StepCountAgreementTest(tf.test.TestCase):
    def test_sampler_runs_the_steps_from_target_epsilon_calibrates_for(self):
        # Regression: the sampler ran epochs * round(1/q) steps while σ was calibrated for
        # ceil(epochs / q); with n = 1000, B = 385, 10 epochs that was 30 steps against 26,
        # and ε = 3.23 against a target of 3.
        import tf_autoclip as ac

        x = np.zeros((1000, 1), "float32")
        sampler = ac.poisson_sample(x, expected_batch_size=385, epochs=10, seed=0)
        optimizer = ac.DPAutoSGD.from_target_epsilon(
            target_epsilon=3.0, delta=1e-5, num_examples=1000, batch_size=385, epochs=10
        )
        self.assertEqual(sampler.steps, 26)
        epsilon = ac.compute_epsilon(optimizer.noise_multiplier, 0.385, sampler.steps, 1e-5)
        self.assertLessEqual(epsilon, 3.0)

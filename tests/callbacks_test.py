"""Tests for tf_autoclip.callbacks.PrivacyCallback on a toy Keras run."""

import contextlib
import csv
import functools
import io
import math
import os

import dp_accounting
import keras
import numpy as np
import tensorflow as tf

import tf_autoclip as ac
from tf_autoclip.accounting import compute_epsilon, default_delta
from tf_autoclip.callbacks import PrivacyCallback

N, BATCH, SIGMA, DELTA = 100, 10, 1.5, 1e-5
Q = BATCH / N


@keras.saving.register_keras_serializable(package="tf_autoclip_tests")
class _StubDPOptimizer(keras.optimizers.SGD):
    """Stand-in for a tf-autoclip optimizer: only the attributes the callback reads."""

    def __init__(self, noise_multiplier=SIGMA, expected_batch_size=BATCH, **kwargs):
        kwargs.setdefault("name", "stub_dp_sgd")  # the class name is not a valid scope name
        super().__init__(**kwargs)
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = expected_batch_size

    def get_config(self):
        config = super().get_config()
        config.update(
            noise_multiplier=self.noise_multiplier, expected_batch_size=self.expected_batch_size
        )
        return config


def _data():
    rng = np.random.default_rng(0)
    x = rng.random((N, 4)).astype(np.float32)
    return x, x.sum(axis=1, keepdims=True)


def _model(optimizer=None, steps_per_execution=1):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(
        optimizer=optimizer or _StubDPOptimizer(learning_rate=0.01),
        loss="mse",
        steps_per_execution=steps_per_execution,
    )
    return model


def _fit(model, callbacks, epochs):
    x, y = _data()
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, callbacks=callbacks, verbose=0)


def _steps(model):
    return int(model.optimizer.iterations.numpy())


@functools.cache
def _largest_steps_within(target, sigma=SIGMA, q=Q, delta=DELTA):
    """Independent linear scan: the last step count whose ε is <= target."""
    t = 0
    while compute_epsilon(sigma, q, t + 1, delta) <= target:
        t += 1
    return t


class EpsilonLoggingTest(tf.test.TestCase):
    def test_epoch_logs_history_and_csv(self):
        model = _model()
        path = os.path.join(self.get_temp_dir(), "log.csv")
        cb = PrivacyCallback(num_examples=N, delta=DELTA)
        history = _fit(model, [cb, keras.callbacks.CSVLogger(path)], epochs=3)
        expected = [compute_epsilon(SIGMA, Q, 10 * (e + 1), DELTA) for e in range(3)]
        self.assertAllClose(history.history["epsilon"], expected)
        with open(path) as f:
            rows = list(csv.DictReader(f))
        self.assertAllClose([float(r["epsilon"]) for r in rows], expected)

    def test_every_n_steps(self):
        seen = {}
        recorder = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: seen.update(
                {_steps(model): logs["epsilon"]} if "epsilon" in logs else {}
            )
        )
        model = _model()
        _fit(model, [PrivacyCallback(N, DELTA, every_n_steps=3), recorder], epochs=1)
        self.assertEqual(sorted(seen), [3, 6, 9])
        for steps, eps in seen.items():
            self.assertAllClose(eps, compute_epsilon(SIGMA, Q, steps, DELTA))

    def test_defaults_and_shuffle_mode(self):
        model = _model()
        cb = PrivacyCallback(num_examples=N, sampling="shuffle", accountant="pld")
        self.assertAllClose(cb.delta, default_delta(N))
        history = _fit(model, [cb], epochs=2)
        # Two passes of floor(100 / 10) = 10 steps, each an un-subsampled Gaussian release.
        self.assertAllClose(
            history.history["epsilon"][-1], compute_epsilon(SIGMA, 1.0, 2, cb.delta, "pld")
        )
        # A started pass counts fully.
        self.assertAllClose(cb.epsilon(21), compute_epsilon(SIGMA, 1.0, 3, cb.delta, "pld"))

    def test_explicit_batch_size_overrides_optimizer(self):
        model = _model(_StubDPOptimizer(expected_batch_size=None, learning_rate=0.01))
        history = _fit(model, [PrivacyCallback(N, DELTA, batch_size=20)], epochs=1)
        self.assertAllClose(history.history["epsilon"], [compute_epsilon(SIGMA, 0.2, 10, DELTA)])

    def test_clear_errors(self):
        with self.assertRaisesRegex(ValueError, "noise_multiplier"):
            _fit(_model(keras.optimizers.SGD()), [PrivacyCallback(N, DELTA)], epochs=1)
        model = _model(_StubDPOptimizer(expected_batch_size=None))
        with self.assertRaisesRegex(ValueError, "batch_size"):
            _fit(model, [PrivacyCallback(N, DELTA)], epochs=1)
        with self.assertRaisesRegex(ValueError, "sampling"):
            PrivacyCallback(N, DELTA, sampling="uniform")
        with self.assertRaisesRegex(ValueError, "target_epsilon"):
            PrivacyCallback(N, DELTA, target_epsilon=0.0)
        with self.assertWarnsRegex(UserWarning, "1/num_examples"):
            PrivacyCallback(N, delta=0.01)


class BudgetTest(tf.test.TestCase):
    TARGET = 2.2  # allows 26 steps: ε(26) = 2.169, ε(27) = 2.202

    def test_stops_at_the_last_step_within_budget(self):
        max_steps = _largest_steps_within(self.TARGET)
        self.assertNotEqual(max_steps % BATCH, 0)  # the stop falls mid-epoch
        model = _model()
        cb = PrivacyCallback(N, DELTA, target_epsilon=self.TARGET)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            history = _fit(model, [cb], epochs=100)
        self.assertEqual(_steps(model), max_steps)
        self.assertEqual(cb.max_steps, max_steps)
        self.assertLessEqual(compute_epsilon(SIGMA, Q, _steps(model), DELTA), self.TARGET)
        self.assertAllClose(
            history.history["epsilon"][-1], compute_epsilon(SIGMA, Q, max_steps, DELTA)
        )
        self.assertIn(f"stopping after {max_steps} steps", out.getvalue())
        # A new fit() would exceed the budget with its first step: it must refuse to start.
        with self.assertRaisesRegex(RuntimeError, "refusing to train"):
            _fit(model, [cb], epochs=1)
        self.assertEqual(_steps(model), max_steps)

    def test_steps_per_execution_never_overshoots(self):
        chunk = 4
        max_steps = _largest_steps_within(self.TARGET)
        model = _model(steps_per_execution=chunk)
        with contextlib.redirect_stdout(io.StringIO()):
            _fit(model, [PrivacyCallback(N, DELTA, target_epsilon=self.TARGET)], epochs=100)
        # Never after the budget, and stopped only because a full execution would not fit.
        self.assertLessEqual(_steps(model), max_steps)
        self.assertGreater(_steps(model) + chunk, max_steps)

    def test_refuses_to_start_if_one_step_exceeds(self):
        model = _model()
        target = 0.5 * compute_epsilon(SIGMA, Q, 1, DELTA)
        with self.assertRaisesRegex(RuntimeError, "refusing to train"):
            _fit(model, [PrivacyCallback(N, DELTA, target_epsilon=target)], epochs=1)
        self.assertEqual(_steps(model), 0)

    def test_shuffle_mode_stops_at_pass_boundary(self):
        target = 1.01 * compute_epsilon(SIGMA, 1.0, 3, DELTA)  # 3 passes fit, 4 do not
        model = _model()
        with contextlib.redirect_stdout(io.StringIO()):
            _fit(model, [PrivacyCallback(N, DELTA, target_epsilon=target, sampling="shuffle")], 9)
        self.assertEqual(_steps(model), 30)


class ResumeTest(tf.test.TestCase):
    def test_epsilon_after_save_and_load_equals_uninterrupted_run(self):
        uninterrupted = _fit(_model(), [PrivacyCallback(N, DELTA)], epochs=5)

        model = _model()
        _fit(model, [PrivacyCallback(N, DELTA)], epochs=3)
        path = os.path.join(self.get_temp_dir(), "m.keras")
        model.save(path)
        restored = keras.models.load_model(path)
        self.assertIsInstance(restored.optimizer, _StubDPOptimizer)
        self.assertEqual(_steps(restored), 30)
        resumed = _fit(restored, [PrivacyCallback(N, DELTA)], epochs=2)

        self.assertEqual(_steps(restored), 50)
        self.assertAllClose(resumed.history["epsilon"][-1], uninterrupted.history["epsilon"][-1])
        self.assertAllClose(resumed.history["epsilon"][-1], compute_epsilon(SIGMA, Q, 50, DELTA))

    def test_budget_carries_over_after_load(self):
        target = compute_epsilon(SIGMA, Q, 35, DELTA)  # exactly 35 steps allowed
        model = _model()
        _fit(model, [PrivacyCallback(N, DELTA)], epochs=3)
        path = os.path.join(self.get_temp_dir(), "m.keras")
        model.save(path)
        restored = keras.models.load_model(path)
        with contextlib.redirect_stdout(io.StringIO()):
            _fit(restored, [PrivacyCallback(N, DELTA, target_epsilon=target)], epochs=10)
        self.assertEqual(_steps(restored), 35)
        self.assertFalse(math.isnan(restored.get_weights()[0].sum()))


# --------------------------------------------------------------------------------------- #
# Gradient accumulation: k physical batches of B make one noisy release of k·B examples.
# --------------------------------------------------------------------------------------- #
K = 4  # gradient_accumulation_steps
LOGICAL = K * BATCH  # 40 examples per noisy release: q = 0.4


def _rdp_epsilon(sigma, q, releases, delta):
    """Independent of tf_autoclip.accounting: dp_accounting's RDP accountant, built here."""
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, releases))
    return accountant.get_epsilon(delta)


def _gaussian_epsilon(sigma, releases, delta):
    """ε of `releases` un-subsampled Gaussian releases of sensitivity 1 (RDP, built here)."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), releases)
    )
    return accountant.get_epsilon(delta)


def _private_model(expected_batch_size=LOGICAL, steps_per_execution=1, k=K):
    keras.utils.set_random_seed(0)
    model = ac.make_private(keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]))
    model.compile(
        optimizer=ac.DPAutoSGD(
            learning_rate=0.1,
            noise_multiplier=1.0,
            gradient_accumulation_steps=k,
            expected_batch_size=expected_batch_size,
            seed=0,
        ),
        loss="mse",
        steps_per_execution=steps_per_execution,
    )
    return model


def _physical_steps(model):
    return int(model.optimizer._iterations.numpy())


class GradientAccumulationTest(tf.test.TestCase):
    """Item 8: ε follows the noisy releases that ran (logical steps, logical batch)."""

    def test_logged_epsilon_is_that_of_the_logical_batches(self):
        # fit's batch_size=10 (what the user passes to the callback); each noisy release
        # sums K=4 such batches: q = 40/100 and one release per 4 physical steps. An epoch
        # is 10 physical steps, so after epochs 1, 2, 3 the releases are 2, 5, 7 (the
        # remaining 2 physical batches of epoch 3 are accumulated but not released).
        model = _private_model()
        with self.assertWarnsRegex(UserWarning, "2 of the gradient_accumulation_steps=4"):
            history = _fit(model, [PrivacyCallback(N, DELTA, batch_size=BATCH)], epochs=3)
        self.assertEqual(_physical_steps(model), 30)
        self.assertEqual(_steps(model), 7)  # Keras' iterations: floor(30 / 4) logical steps
        expected = [_rdp_epsilon(1.0, LOGICAL / N, t, DELTA) for t in (2, 5, 7)]
        self.assertAllClose(history.history["epsilon"], expected, rtol=1e-9)
        # The figure the callback used to log: q = 10/100 with the logical step count.
        old = compute_epsilon(1.0, BATCH / N, 7, DELTA)
        self.assertGreater(history.history["epsilon"][-1], 1.5 * old)

    def test_batch_size_defaults_to_the_optimizers_logical_batch(self):
        model = _private_model()
        history = _fit(model, [PrivacyCallback(N, DELTA)], epochs=3)
        expected = [_rdp_epsilon(1.0, LOGICAL / N, t, DELTA) for t in (2, 5, 7)]
        self.assertAllClose(history.history["epsilon"], expected, rtol=1e-9)

    def test_without_expected_batch_size_the_logical_batch_is_k_physical_ones(self):
        # The optimizer divides by (rows of the batch) × K: the callback's batch_size is the
        # batch_size given to fit, and a release samples K of them.
        model = _private_model(expected_batch_size=None)
        history = _fit(model, [PrivacyCallback(N, DELTA, batch_size=BATCH)], epochs=2)
        expected = [_rdp_epsilon(1.0, LOGICAL / N, t, DELTA) for t in (2, 5)]
        self.assertAllClose(history.history["epsilon"], expected, rtol=1e-9)

    def test_batch_size_contradicting_the_optimizer_raises(self):
        # expected_batch_size=40 with K=4 means physical batches of 10, not 20 or 40.
        for batch_size in (20, LOGICAL):
            cb = PrivacyCallback(N, DELTA, batch_size=batch_size)
            with (
                self.subTest(batch_size=batch_size),
                self.assertRaisesRegex(ValueError, "gradient_accumulation_steps=4"),
            ):
                _fit(_private_model(), [cb], epochs=1)
        # Without accumulation too: the optimizer divides by 10, the callback was told 20.
        with self.assertRaisesRegex(ValueError, "expected_batch_size=10"):
            _fit(_model(), [PrivacyCallback(N, DELTA, batch_size=20)], epochs=1)
        # Batches of 10 cannot be split into the optimizer's 4 microbatches.
        optimizer = ac.DPAutoSGD(learning_rate=0.1, noise_multiplier=1.0, num_microbatches=4)
        with self.assertRaisesRegex(ValueError, "num_microbatches=4"):
            _fit(_model(optimizer), [PrivacyCallback(N, DELTA, batch_size=BATCH)], epochs=1)

    def test_budget_counts_releases_not_physical_steps(self):
        q = LOGICAL / N
        max_releases = 3
        target = 0.5 * (_rdp_epsilon(1.0, q, 3, DELTA) + _rdp_epsilon(1.0, q, 4, DELTA))
        # Two physical steps per execution: after 3 releases (12 physical steps) the next
        # execution cannot complete a 4th release; a further one could.
        model = _private_model(steps_per_execution=2)
        cb = PrivacyCallback(N, DELTA, target_epsilon=target)
        with contextlib.redirect_stdout(io.StringIO()):
            history = _fit(model, [cb], epochs=10)
        self.assertEqual(cb.max_steps, max_releases)
        self.assertEqual(_steps(model), max_releases)
        # Stopped right after the last release: no clipped sums left waiting for noise.
        self.assertEqual(_physical_steps(model), K * max_releases)
        self.assertAllClose(
            history.history["epsilon"][-1], _rdp_epsilon(1.0, q, max_releases, DELTA), rtol=1e-9
        )

    def test_shuffle_bound_counts_passes_of_physical_batches(self):
        # Passes are 10 physical steps; releases are windows of 4. After 3 epochs the 7
        # releases cover physical steps 1..28, i.e. 3 passes, and a release can straddle two
        # passes (steps 9-12), holding one example twice: sensitivity 2 counts as 4 unit
        # Gaussian releases, so the conservative count is 2 per pass: 6.
        model = _private_model()
        cb = PrivacyCallback(N, DELTA, sampling="shuffle", batch_size=BATCH)
        history = _fit(model, [cb], epochs=3)
        self.assertAllClose(history.history["epsilon"][-1], _gaussian_epsilon(1.0, 6, DELTA))

    def test_shuffle_pass_length_is_a_keras_epoch(self):
        # 95 examples at batch 10: fit runs ceil(9.5) = 10 batches per pass (the last has 5
        # examples), so 19 steps are 2 passes, 21 are 3. With drop_remainder the user says 9.
        model = _model()
        for steps_per_epoch, passes in ((None, (2, 3)), (9, (3, 3))):
            cb = PrivacyCallback(
                95, DELTA, sampling="shuffle", batch_size=BATCH, steps_per_epoch=steps_per_epoch
            )
            cb.set_model(model)
            for steps, expected in zip((19, 21), passes, strict=True):
                self.assertAllClose(cb.epsilon(steps), _gaussian_epsilon(SIGMA, expected, DELTA))
        with self.assertRaisesRegex(ValueError, "steps_per_epoch"):
            PrivacyCallback(N, DELTA, steps_per_epoch=0)

    def test_shuffle_bound_aligned_passes(self):
        # 8 physical steps per pass (N = 80), a multiple of K: releases never straddle, so
        # after 3 epochs (6 releases) the bound is 3 unit Gaussian releases.
        model = _private_model()
        x, y = _data()
        cb = PrivacyCallback(80, DELTA, sampling="shuffle")
        history = model.fit(x[:80], y[:80], batch_size=BATCH, epochs=3, callbacks=[cb], verbose=0)
        self.assertEqual(_steps(model), 6)
        self.assertAllClose(history.history["epsilon"][-1], _gaussian_epsilon(1.0, 3, DELTA))


if __name__ == "__main__":
    tf.test.main()

"""Tests for tf_autoclip.callbacks.PrivacyCallback on a toy Keras run."""

import contextlib
import csv
import functools
import io
import math
import os

import keras
import numpy as np
import tensorflow as tf

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


if __name__ == "__main__":
    tf.test.main()

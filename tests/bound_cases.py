"""Shared by the norm-bound tests (norm_bounds_test, speed_paths_test): one example's
clipped contribution on adversarial rows, per engine, against the sensitivity S = 1."""

import keras  # noqa: F401  (the tests build keras models with these helpers)
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tests.reference import l2_norm as norm

BOUND = 1.0 + 1e-5
ENGINES = ("bk", "ghost", "auto")


def linear_loss(y_true, y_pred):
    """``sum(y_pred * y_true)`` per example: output gradients are exactly ``y_true``."""
    prod = tf.cast(y_pred, tf.float32) * tf.cast(y_true, tf.float32)
    return tf.reduce_sum(prod, axis=list(range(1, len(prod.shape))))


def clipped_sum_fn(model, engine, signature=None, jit_compile=False, clipping="auto-s"):
    """A compiled ``x, y -> clipped sum`` (sigma = 0, divided by 1); ``jit_compile``:
    compiled by XLA (its own kernels, and its own rounding)."""
    opt = ac.DPAutoSGD(
        learning_rate=1.0, noise_multiplier=0.0, expected_batch_size=1, clipping=clipping
    )

    def run(x, y):
        return ac.private_gradients(model, x, y, optimizer=opt, loss=linear_loss, engine=engine)

    return tf.function(run, autograph=False, input_signature=signature, jit_compile=jit_compile)


def cancelling_rows(rng, width, magnitude, rows=2, rest=(-9, -5)):
    """``[rows, width]``: row 1 of size ``magnitude``, row 2 ~ -row 1 plus a rest that
    is ``10**rest`` (a random exponent in that range) times smaller."""
    first = rng.normal(size=width) * magnitude
    rest = rng.normal(size=width) * magnitude * 10.0 ** rng.uniform(*rest)
    out = [first, -first + rest]
    out += [rng.normal(size=width) * 1e-3 for _ in range(rows - 2)]
    return np.stack(out).astype("float32")


def same_gradients(rng, width, rows=2):
    """Output gradients nearly equal on every row (so ``sum_t a_t g_t^T`` cancels)."""
    v = rng.normal(size=width)
    return np.stack([v * (1 + 1e-7 * rng.normal()) for _ in range(rows)]).astype("float32")


class ContributionTestCase(tf.test.TestCase, parameterized.TestCase):
    def contributions(self, model, inputs, engines=ENGINES, jit_compile=False):
        """Max clipped contribution of single-example batches, per engine."""
        worst = {}
        for engine in engines:
            fn = clipped_sum_fn(model, engine, jit_compile=jit_compile)
            worst[engine] = max(norm(fn(x[None], y[None])) for x, y in inputs)
        return worst

    def assert_bounded(self, worst):
        for engine, value in worst.items():
            self.assertLessEqual(value, BOUND, msg=f"engine={engine}: all {worst}")

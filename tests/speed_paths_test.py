"""Per-layer norm choices of the fast engines stay upper bounds of what the clipped sum adds.

``rules.numerics.use_ghost`` ("mixed") takes explicit per-example gradients for layers
with enough rows per example even where they are up to twice the layer's saved tensors
(faster on CPU: no float64 Gram products). The ghost engine then must not use the squared
norm of that explicit float32 tensor as is: its clipped sum is another float32 product (a
second backward pass), off by up to ``(T + 4) 2^-24 sum_t |a_t||g_t|`` when rows cancel.
The checks below measure one example's clipped contribution (sigma = 0), as
``norm_bounds_test`` does, on layers that now take the explicit form statically.
"""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tests.bound_cases import (
    BOUND,
    ENGINES,
    ContributionTestCase,
    cancelling_rows,
    same_gradients,
)
from tf_autoclip.rules import numerics


def rows_model(rows, dim, units):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((rows, dim)), keras.layers.Dense(units, use_bias=False)])


def cancelling_batch(rng, rows, dim, units):
    """Rows 1 and 2 cancel (as in norm_bounds_test); the other rows are small."""
    x = cancelling_rows(rng, dim, 10.0 ** rng.uniform(3, 6), rows=rows)
    y = same_gradients(rng, units, rows=rows)
    return x, y


class UseGhostTest(tf.test.TestCase):
    def test_explicit_band_from_sixteen_rows(self):
        # D*P = 8192 against T*(D+P) = 7200 (T = 25): explicit in the 2x band.
        self.assertFalse(numerics.use_ghost(25, 256, 32))
        self.assertTrue(numerics.use_ghost(8, 256, 32))  # 8192 > 2 * 8 * 288
        # W2's feed-forward layers: 65536 against 64 * 640 = 40960.
        self.assertFalse(numerics.use_ghost(64, 128, 512))
        # Under 16 rows the memory rule alone: 32 > 2 * 12 -> ghost.
        self.assertTrue(numerics.use_ghost(2, 8, 4))
        self.assertFalse(numerics.use_ghost(2, 2, 2))  # 4 <= 2 * 4
        # Far beyond twice the saved tensors: ghost (e.g. a 768 -> 3072 layer, T = 128).
        self.assertTrue(numerics.use_ghost(128, 768, 3072))


class StaticExplicitBoundTest(ContributionTestCase):
    @parameterized.named_parameters(
        ("memory_rule", 2, 2, 2),  # explicit by the memory rule (4 <= 2 * 4)
        ("time_band", 16, 24, 24),  # explicit only by the 2x band: 576 in (384, 768]
    )
    def test_every_engine_bounded(self, rows, dim, units):
        model = rows_model(rows, dim, units)
        self.assertFalse(numerics.use_ghost(rows, dim, units))
        rng = np.random.default_rng(7)
        inputs = [cancelling_batch(rng, rows, dim, units) for _ in range(40)]
        self.assert_bounded(self.contributions(model, inputs, ENGINES))

    def test_bound_is_tight_without_cancellation(self):
        # Honest rows: the contribution of a clipped example is 1 up to rounding: the
        # bounds do not inflate the norm by more than 1e-5 relative.
        model = rows_model(16, 24, 24)
        rng = np.random.default_rng(8)
        inputs = [
            (  # norms ~1e5: AUTO-S's n / (n + gamma) is 1 within 1e-6
                (1e3 * rng.normal(size=(16, 24))).astype("float32"),
                rng.normal(size=(16, 24)).astype("float32"),
            )
            for _ in range(5)
        ]
        for engine, value in self.contributions(model, inputs, ENGINES).items():
            self.assertGreater(value, 1.0 - 1e-5, msg=engine)
            self.assertLessEqual(value, BOUND, msg=engine)


class GhostEngineSumsTest(ContributionTestCase):
    """The ghost engine takes its clipped sum by a backward pass only for variables whose
    norms bound that pass (kernels, embeddings); the others (normalization scales and
    offsets, biases) take the sum of the very tensors their norms were read from. With
    output gradients that cancel across positions, the backward pass rounds differently
    than the per-example tensor, and one example moved the sum by up to 1.46 before."""

    @parameterized.named_parameters(
        ("layer_norm", lambda: keras.layers.LayerNormalization()),
        ("group_norm", lambda: keras.layers.GroupNormalization(groups=2)),
        ("dense_bias", lambda: keras.layers.Dense(8, kernel_initializer="zeros")),
    )
    def test_cancelling_positions_stay_bounded(self, make_layer):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4, 8)), make_layer()])
        rng = np.random.default_rng(0)
        inputs = []
        for _ in range(40):
            x = np.stack([rng.normal(size=8).astype("float32")] * 4)  # equal rows
            y = cancelling_rows(rng, 8, 10.0 ** rng.uniform(3, 6), rows=4)
            y[2:] = 0.0
            inputs.append((x, y))
        self.assert_bounded(self.contributions(model, inputs, ("bk", "ghost")))


if __name__ == "__main__":
    tf.test.main()

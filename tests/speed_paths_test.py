"""Per-layer norm choices of the fast engines stay upper bounds of what the clipped sum adds.

``rules.numerics.use_ghost`` ("mixed") takes explicit per-example gradients for layers
with enough rows per example even where they are up to twice the layer's saved tensors
(faster on CPU: no float64 Gram products). A norm read off that explicit float32 tensor
bounds that tensor only: a clipped sum that is another float32 product (the ghost engine's
former second backward pass; the low-memory sums) is off by up to
``(T + 4) 2^-24 sum_t |a_t||g_t|`` when rows cancel. The checks below measure one
example's clipped contribution (sigma = 0), as ``norm_bounds_test`` does, on layers that
now take the explicit form statically.
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
    """Normalization scales and offsets and biases take the sum of the very tensors their
    norms were read from, in every engine. With output gradients that cancel across
    positions, a backward pass (the ghost engine's clipped sum until this was fixed)
    rounds differently than the per-example tensor: one example moved the sum by up to
    1.46."""

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


class GroupedConvPathTest(tf.test.TestCase, parameterized.TestCase):
    """The bk conv rule's grouped per-example path (``conv._GROUPED_CHANNELS``: one grouped
    filter gradient, examples on axis 1 of ``[D, B, P]``): norms and clipped sums against a
    plain loop, one ``tf.GradientTape`` per example, and norms never below those of the
    float32 tensor the clipped sum adds."""

    @staticmethod
    def loop(layer, x, g):
        """Per-example float64 [kernel, bias] gradients of ``sum(conv(x_i) * g_i)``."""
        grads = []
        for i in range(len(x)):
            with tf.GradientTape() as tape:
                z = layer(x[i : i + 1])
                value = tf.reduce_sum(z * g[i : i + 1])
            grads.append([np.float64(t) for t in tape.gradient(value, [layer.kernel, layer.bias])])
        return grads

    def run_rule(self, layer, x, g, c, finite):
        from tf_autoclip.rules.base import Record, get_layer_rule

        rule = get_layer_rule(layer)
        record = Record(layer, rule, lambda t: None)
        with numerics.norm_method("mixed"):
            rule.forward(layer, record, layer.call, tf.constant(x))
            record.grads["outputs"] = tf.constant(g)
            norms = [n.numpy() for n in rule.squared_norms(layer, record)]
            self.assertIn("kernel_by_example", record.cache)  # the path under test
            used = record.cache["kernel_by_example"].numpy()  # [D, B, P] float32
            record.all_finite = tf.constant(finite)
            sums = [s.numpy() for s in rule.clipped_sum(layer, record, [tf.constant(c)] * 2)]
        return norms, sums, used

    @parameterized.named_parameters(
        # W1's second convolution at a smaller size: 16 channels, 4x4, stride 2, T = 16;
        # P = 32 sums squares in float32 blocks.
        ("w1_conv2", (10, 10, 16), lambda: keras.layers.Conv2D(32, 4, 2, activation="tanh")),
        # 3 channels, "same", P = 8 < 16: squares summed in float64.
        ("same_narrow", (9, 9, 3), lambda: keras.layers.Conv2D(8, 3, padding="same")),
        ("conv1d", (40, 12), lambda: keras.layers.Conv1D(24, 5, 2, padding="same")),
        ("32_channels", (6, 6, 32), lambda: keras.layers.Conv2D(8, 3, use_bias=True)),
    )
    def test_matches_loop(self, shape, make_layer):
        from tf_autoclip.rules import conv

        keras.utils.set_random_seed(0)
        layer = make_layer()
        layer.build((None, *shape))
        layer.bias.assign(np.random.default_rng(1).normal(size=layer.bias.shape))
        activation, layer.activation = layer.activation, None  # the loop differentiates z
        self.assertLessEqual(shape[-1], conv._GROUPED_CHANNELS)
        rng = np.random.default_rng(2)
        B = 6
        x = rng.normal(size=(B, *shape)).astype("float32")
        g = rng.normal(size=(B, *layer.compute_output_shape((B, *shape))[1:])).astype("float32")
        want = self.loop(layer, x, g)
        c = np.array([0.5, 2.0, 0.0, 1.25, 3.0, 0.75], "float32")
        for finite in (True, False):
            norms, sums, used = self.run_rule(layer, x, g, c, finite)
            for v in range(2):
                exact = np.array([np.sum(w[v] ** 2) for w in want])
                self.assertAllClose(norms[v], exact, rtol=1e-5)
            # The kernel norms bound the float32 tensor the clipped sum adds.
            used_sq = np.sum(np.float64(used) ** 2, axis=(0, 2))
            self.assertTrue(np.all(np.float64(norms[0]) >= used_sq), msg=(norms[0], used_sq))
            for v in range(2):
                ref = sum(np.float64(ci) * w[v] for ci, w in zip(c, want, strict=True))
                scale = np.max(np.abs(ref))
                self.assertAllClose(sums[v], ref, rtol=1e-5, atol=1e-5 * scale)
        layer.activation = activation

    def test_dropped_nan_example_adds_zero(self):
        keras.utils.set_random_seed(0)
        layer = keras.layers.Conv2D(32, 4, 2)
        layer.build((None, 10, 10, 16))
        rng = np.random.default_rng(3)
        x = rng.normal(size=(3, 10, 10, 16)).astype("float32")
        g = rng.normal(size=(3, 4, 4, 32)).astype("float32")
        want = self.loop(layer, x, g)
        x[1, 0, 0, 0] = np.nan
        c = np.array([1.5, 0.0, 0.25], "float32")
        _, sums, _ = self.run_rule(layer, x, g, c, finite=False)
        ref = 1.5 * want[0][0] + 0.25 * want[2][0]
        self.assertAllClose(sums[0], ref, rtol=1e-5, atol=1e-5 * np.max(np.abs(ref)))

    def test_squared_rows_never_below_float32_rows(self):
        # Blocks of 32: one square of 1 and 31 of 1e-8 each; a float32 sum drops the small
        # ones (3.1e-7 relative, more than to_f32_up's 2^-22 margin); the bound must not.
        from tf_autoclip.rules.numerics import squared_rows_up64, to_f32_up

        rng = np.random.default_rng(4)
        E = (1e-4 * rng.choice([-1.0, 1.0], size=(64, 5, 32))).astype("float32")
        E[:, :, 0] = 1.0
        E[:, 2] *= 1e3  # another scale for one example
        exact = np.sum(np.float64(E) ** 2, axis=(0, 2))
        # Under XLA the blocks are float32 sums of squares (no Euclidean-norm kernel there).
        for jit in (False, True):
            bound = tf.function(
                lambda e: to_f32_up(squared_rows_up64(e, batch_axis=1)), jit_compile=jit
            )
            got = np.float64(bound(tf.constant(E)).numpy())
            self.assertTrue(np.all(got >= exact), msg=(jit, (got - exact) / exact))
            self.assertAllClose(got, exact, rtol=1e-5)
        narrow = E[:, :, :8]  # P = 8: float64 throughout
        got = np.float64(to_f32_up(squared_rows_up64(tf.constant(narrow), batch_axis=1)).numpy())
        self.assertTrue(np.all(got >= np.sum(np.float64(narrow) ** 2, axis=(0, 2))))

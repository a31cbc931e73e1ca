"""Ghost and book-keeping norms never underestimate, even when rows cancel.

The fast engines compute each example's norm from layer inputs ``a_t`` and output
gradients ``g_t`` (e.g. the Gram form ``sum_{t,s} (a_t.a_s)(g_t.g_s)``) and the clipped
sum ``sum_i c_i g_i`` by another float32 computation. When an example's rows nearly
cancel (row 2 ~ -row 1, magnitudes 1e2..1e6) the true norm is tiny next to
``sum_t |a_t||g_t|``, and both rounding errors are large relative to it: a norm that
underestimates gives that example a clipped contribution far above the sensitivity 1.

Each check measures one example's clipped contribution directly: with
``noise_multiplier=0`` and ``expected_batch_size=1`` the private gradient IS the clipped
sum, so for a batch of that one example its norm is the contribution (or, in a batch,
the norm of the difference with and without it). The tolerance ``1 + 1e-5``: the
contribution is ``n / (n_hat + gamma)`` with ``n_hat >= n`` the bound, and the only
slack left is the float32 rounding of a few operations on the norm and factor (~1e-7);
before the fix these cases gave 1.007 (attention) up to 4625 (Conv1D).
"""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tests.bound_cases import (
    BOUND,
    ENGINES,
    ContributionTestCase,
    cancelling_rows,
    clipped_sum_fn,
    linear_loss,
    norm,
    same_gradients,
)
from tf_autoclip import layer_rules

D, P = 8, 4  # Dense 8 -> 4 on 2 rows: ghost norms (D*P = 32 > T*(D+P) = 24)


def dense_model(rows=2, dim=D, units=P, bias=False):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((rows, dim)), keras.layers.Dense(units, use_bias=bias)])


class DenseSequenceTest(ContributionTestCase):
    @parameterized.named_parameters(("graph", False), ("xla", True))
    def test_random_search_over_cancelling_rows(self, jit_compile):
        # XLA: other kernels, other rounding, and float32-block square sums.
        rng = np.random.default_rng(1)
        inputs = [
            (cancelling_rows(rng, D, 10.0 ** rng.uniform(2, 6)), same_gradients(rng, P))
            for _ in range(200)
        ]
        worst = self.contributions(dense_model(bias=True), inputs, jit_compile=jit_compile)
        self.assert_bounded(worst)

    def test_one_adversary_in_an_honest_batch(self):
        rng = np.random.default_rng(2)
        model = dense_model()
        honest_x = rng.normal(size=(4, 2, D)).astype("float32")
        honest_y = rng.normal(size=(4, 2, P)).astype("float32")
        worst = {}
        for engine in ENGINES:
            fn = clipped_sum_fn(model, engine)
            without = fn(honest_x, honest_y)
            for _ in range(20):
                x = cancelling_rows(rng, D, 10.0 ** rng.uniform(3, 6))[None]
                y = same_gradients(rng, P)[None]
                with_it = fn(np.concatenate([honest_x, x]), np.concatenate([honest_y, y]))
                diff = [a - b for a, b in zip(with_it, without, strict=True)]
                worst[engine] = max(worst.get(engine, 0.0), norm(diff))
        self.assert_bounded(worst)

    @parameterized.named_parameters(("ghost_branch", 8, 4), ("explicit_branch", 2, 2))
    def test_dynamic_rows(self, dim, units):
        # Rows unknown while tracing: the rule picks ghost or explicit norms in a tf.cond.
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((None, dim)), keras.layers.Dense(units, use_bias=False)]
        )
        signature = [
            tf.TensorSpec([None, None, dim], tf.float32),
            tf.TensorSpec([None, None, units], tf.float32),
        ]
        rng = np.random.default_rng(3)
        inputs = [
            (cancelling_rows(rng, dim, 10.0 ** rng.uniform(3, 6)), same_gradients(rng, units))
            for _ in range(40)
        ]
        worst = {}
        for engine in ENGINES:
            fn = clipped_sum_fn(model, engine, signature)
            worst[engine] = max(norm(fn(x[None], y[None])) for x, y in inputs)
        self.assert_bounded(worst)

    def test_fit_step(self):
        rng = np.random.default_rng(4)
        model = ac.make_private(dense_model())
        model.compile(
            optimizer=ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0, expected_batch_size=1),
            loss=linear_loss,
        )
        x = np.stack([cancelling_rows(rng, D, 10.0 ** rng.uniform(3, 6)) for _ in range(40)])
        y = np.stack([same_gradients(rng, P) for _ in range(40)])
        snapshots = [[v.numpy() for v in model.trainable_variables]]
        record = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs=None: snapshots.append(
                [v.numpy() for v in model.trainable_variables]
            )
        )
        model.fit(x, y, batch_size=1, epochs=1, shuffle=False, verbose=0, callbacks=[record])
        steps = [
            norm([a.astype(np.float64) - b for a, b in zip(s, t, strict=True)])
            for s, t in zip(snapshots, snapshots[1:])
        ]
        self.assertLen(steps, 40)
        self.assertLessEqual(max(steps), BOUND)


class OtherRulesTest(ContributionTestCase):
    def test_einsum_dense_on_sequences(self):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((2, D)), keras.layers.EinsumDense("abc,cd->abd", output_shape=(2, P))]
        )
        rng = np.random.default_rng(5)
        inputs = [
            (cancelling_rows(rng, D, 10.0 ** rng.uniform(3, 6)), same_gradients(rng, P))
            for _ in range(30)
        ]
        self.assert_bounded(self.contributions(model, inputs))

    def test_multi_head_attention(self):
        # Self-attention on 2 nearly opposite tokens: the value/key/query projections see
        # cancelling rows; the output projection sees nearly cancelling values.
        keras.utils.set_random_seed(0)
        x_in = keras.Input((2, D))
        out = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(x_in, x_in)
        model = keras.Model(x_in, out)
        rng = np.random.default_rng(6)
        inputs = [
            (cancelling_rows(rng, D, 10.0 ** rng.uniform(1, 4)), same_gradients(rng, D))
            for _ in range(30)
        ]
        self.assert_bounded(self.contributions(model, inputs))

    @parameterized.named_parameters(("graph", False), ("xla", True))
    def test_embedding_with_repeated_ids(self, jit_compile):
        # One id on both positions, output gradients g and -g + tiny: the gradient of that
        # embedding row is their (tiny) sum.
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((2,), dtype="int32"), keras.layers.Embedding(5, 8)])
        rng = np.random.default_rng(7)
        ids = np.array([3, 3], np.int32)
        inputs = [(ids, cancelling_rows(rng, 8, 10.0 ** rng.uniform(2, 6))) for _ in range(30)]
        self.assert_bounded(self.contributions(model, inputs, jit_compile=jit_compile))

    @parameterized.named_parameters(
        ("groups1", 1, "mixed", False),
        ("groups2", 2, "mixed", False),
        ("groups2_explicit", 2, "explicit", False),
        ("groups2_xla", 2, "mixed", True),
        ("groups2_explicit_xla", 2, "explicit", True),
    )
    def test_conv1d(self, groups, method, jit_compile):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((2, 16)), keras.layers.Conv1D(16, 1, groups=groups, use_bias=False)]
        )
        rng = np.random.default_rng(8)
        inputs = [
            (cancelling_rows(rng, 16, 10.0 ** rng.uniform(2, 6)), same_gradients(rng, 16))
            for _ in range(30)
        ]
        with layer_rules.norm_method(method):
            worst = self.contributions(model, inputs, ENGINES, jit_compile=jit_compile)
        self.assert_bounded(worst)

    def test_ghost_engine_bias_on_cancelling_rows(self):
        # A float32 backward pass (the ghost engine's clipped sum before) is another
        # computation than the explicit per-example bias gradient (output gradients g and
        # -g + tiny) whose norm sets the factor: the sum adds that tensor. Measured 1.028
        # with the backward pass.
        model = dense_model(bias=True)
        rng = np.random.default_rng(12)
        inputs = [
            (np.full((2, D), 1e-3, "float32"), cancelling_rows(rng, P, 10.0 ** rng.uniform(2, 6)))
            for _ in range(100)
        ]
        self.assert_bounded(self.contributions(model, inputs, engines=("ghost",)))


class BackwardRoundingTest(ContributionTestCase):
    """The ghost engine used to take its clipped sum by a second backward pass of
    ``sum_i c_i L_i``. That pass rounds differently from the first, whose output gradients
    set the norms: here the input gradient of the hidden unit is ``y0 + y1 - y0`` with
    ``y1`` under half an ulp of ``y0``, which rounds to 0 in the first pass (norm 0) and
    to one ulp of ``c y0`` once scaled by ``c``. That example then contributed 1.18 S
    (this search). The clipped sums now come from the first pass' output gradients."""

    def test_scaled_backward_pass_cancelling_to_zero(self):
        inputs = keras.Input((2,))
        hidden = keras.layers.Dense(  # x = [s, s] gives h = 0: the second layer adds 0
            1, use_bias=False, kernel_initializer=keras.initializers.Constant([[1.0], [-1.0]])
        )(inputs)
        outputs = keras.layers.Dense(3, use_bias=False, kernel_initializer="ones")(hidden)
        model = keras.Model(inputs, outputs)
        rng = np.random.default_rng(0)
        cases = []
        for _ in range(60):
            y0 = np.float32(rng.uniform(1, 2))
            y1 = np.float32(rng.uniform(0.05, 0.95) * np.spacing(y0))
            y = np.array([y0, y1, -y0], "float32")[rng.permutation(3)]
            cases.append((np.full(2, 10.0 ** rng.uniform(2, 6), "float32"), y))
        self.assert_bounded(self.contributions(model, cases, (*ENGINES, "vectorized")))


class MixedPrecisionTest(ContributionTestCase):
    def tearDown(self):
        keras.mixed_precision.set_global_policy("float32")
        super().tearDown()

    @parameterized.named_parameters(
        ("float16", "mixed_float16", False),
        ("bfloat16", "mixed_bfloat16", False),
        ("float16_xla", "mixed_float16", True),
        ("bfloat16_xla", "mixed_bfloat16", True),
    )
    def test_dense_on_cancelling_rows(self, policy, jit_compile):
        keras.mixed_precision.set_global_policy(policy)
        model = dense_model()
        rng = np.random.default_rng(9)
        # float16 tops out at 65504: row magnitudes up to 1e3; its rows cancel only to
        # ~2^-11 (a smaller rest rounds away and the rows cancel exactly).
        inputs = [
            (
                cancelling_rows(rng, D, 10.0 ** rng.uniform(1, 3), rest=(-4.5, -2.5)),
                same_gradients(rng, P),
            )
            for _ in range(100)
        ]
        worst = self.contributions(model, inputs, ("bk", "auto"), jit_compile=jit_compile)
        self.assert_bounded(worst)


class UnderflowTest(ContributionTestCase):
    """CPU kernels flush float32 results below 2^-126 to zero. A gradient of one entry just
    above that scale and many just below it had its norm read off the large entry alone:
    AUTO-V (factor 1 / norm) then gave the example a contribution of 7.3 S here (vectorized
    engine; the bk and ghost engines took float64 or exact paths).
    The norms now add what flushing can lose (``numerics.squared_rows_up64``)."""

    @parameterized.named_parameters(
        ("units_16", 16, False), ("units_64", 64, False), ("units_64_xla", 64, True)
    )
    def test_auto_v_tiny_gradients(self, units, jit_compile):
        # XLA's CPU kernels flush too.
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((1, 64)), keras.layers.Dense(units, use_bias=False)])
        x = np.full((1, 1, 64), 1e-19, "float32")  # squares 1e-38: flushed to 0
        x[..., 0] = 1.1e-19  # its square 1.21e-38 is just above 2^-126
        y = np.ones((1, 1, units), "float32")
        worst = {}
        for engine in (*ENGINES, "vectorized"):
            fn = clipped_sum_fn(model, engine, jit_compile=jit_compile, clipping="auto-v")
            worst[engine] = norm(fn(x, y))
        self.assert_bounded(worst)


class UtilityTest(tf.test.TestCase):
    def test_bound_is_tight_on_ordinary_inputs(self):
        # The bound may not wreck clipping: within 1e-3 (relative) of the exact norm.
        rng = np.random.default_rng(10)
        for rows, dim, units in [(1, 64, 32), (8, 64, 48), (32, 128, 96), (128, 256, 256)]:
            a = rng.normal(size=(16, rows, dim)).astype("float32")
            g = rng.normal(size=(16, rows, units)).astype("float32")
            exact = np.linalg.norm(
                np.einsum("btd,btp->bdp", a.astype(np.float64), g.astype(np.float64)),
                axis=(1, 2),
            )
            got = np.sqrt(layer_rules.linear_ghost_sq(tf.constant(a), tf.constant(g)).numpy())
            ratio = got / exact
            self.assertAllGreaterEqual(ratio, 1.0)
            self.assertAllLessEqual(ratio, 1.0 + 1e-3)

    def test_bound_holds_against_exact_norms_on_cancelling_rows(self):
        rng = np.random.default_rng(11)
        a = np.stack([cancelling_rows(rng, D, 10.0 ** rng.uniform(2, 6)) for _ in range(500)])
        g = np.stack([same_gradients(rng, P) for _ in range(500)])
        exact = np.linalg.norm(
            np.einsum("btd,btp->bdp", a.astype(np.float64), g.astype(np.float64)), axis=(1, 2)
        )
        got = np.sqrt(layer_rules.linear_ghost_sq(tf.constant(a), tf.constant(g)).numpy())
        self.assertAllGreaterEqual(got - exact, 0.0)


if __name__ == "__main__":
    tf.test.main()

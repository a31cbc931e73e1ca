"""The fast engines ("bk", "ghost") give the same clipped sum as a plain per-example loop.

Reference: tests/reference.py (one GradientTape per example, clip factors computed in
NumPy float64 from the formulas of the paper, summed). ``private_gradients`` with
sigma = 0 returns ``sum_i c_i g_i / B``. Every layer rule is checked with ghost and with
explicit norms; whole models with every clipping mode and style, with and without XLA,
against the loop and the vectorized engine.
"""

import functools
import itertools
import time
import warnings

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tests import reference, testing_models
from tests.engine_cases import (
    BATCH,
    CLASSES,
    LAYER_CASES,
    LOSS,
    EngineTestCase,
    L,
    engine_sum,
    layer_case_data,
    threshold_between_norms,
)
from tests.reference import MODES, STYLES
from tf_autoclip import bk_engine, engines, layer_rules


class LayerRuleTest(EngineTestCase):
    @parameterized.named_parameters((name, name) for name in LAYER_CASES)
    def test_rule_matches_loop(self, name):
        shape, dtype, factory = LAYER_CASES[name]
        keras.utils.set_random_seed(4)
        model = testing_models.single_layer(shape, factory, dtype)
        x, y = layer_case_data(shape, dtype)
        self.assertTrue(bk_engine.supports(model, None))
        grads = reference.unit_gradients(model, x, y, LOSS)
        for style in STYLES:
            want = reference.clipped_sum(grads, reference.groups_for(model, style))
            for method in ("ghost", "explicit"):
                with self.subTest(style=style, method=method), layer_rules.norm_method(method):
                    self.assert_sums_close(engine_sum(model, x, y, "bk", style=style), want)
            with self.subTest(style=style, engine="ghost"):
                self.assert_sums_close(engine_sum(model, x, y, "ghost", style=style), want)


mlp = functools.partial(testing_models.mlp, hidden=((8, "tanh"), (5, None)), sequential=True)


MODELS = {
    "mlp": mlp,
    "mnist_cnn": testing_models.mnist_cnn,
    "text_conv": testing_models.text_conv,
    "transformer": testing_models.pre_ln_transformer,
    "masked": testing_models.masked_sequence_labeler,
}


def model_data(model, seed=0):
    """Ids in [1, 6), the last 2 positions padding (3 in the first example)."""
    return testing_models.data_for(model, BATCH, seed, ids=(1, 6), pad=2, pad_first=3)


class WholeModelTest(EngineTestCase):
    @parameterized.named_parameters((name, name) for name in MODELS)
    def test_modes_and_styles_match_loop(self, name):
        keras.utils.set_random_seed(5)
        model = MODELS[name]()
        x, y = model_data(model)
        sw = np.linspace(0.5, 2.0, BATCH).astype("float32")
        self.assertIs(engines.select_engine("auto", model, None), bk_engine.bk_engine)
        grads = reference.unit_gradients(model, x, y, LOSS, sample_weight=sw)
        R = threshold_between_norms(grads)
        for mode, style in itertools.product(MODES, STYLES):
            want = reference.clipped_sum(grads, reference.groups_for(model, style), mode, R=R)
            for engine in ("bk", "ghost"):
                with self.subTest(mode=mode, style=style, engine=engine):
                    got = engine_sum(model, x, y, engine, mode, style, R, sample_weight=sw)
                    self.assert_sums_close(got, want)
        vectorized = engine_sum(model, x, y, "vectorized", "abadi", "per-layer", R, sw)
        bk = engine_sum(model, x, y, "bk", "abadi", "per-layer", R, sw)
        self.assert_sums_close(bk, vectorized)

    @parameterized.named_parameters(
        (f"{name}_{engine}_{'xla' if jit else 'graph'}", name, engine, jit)
        for name, engine, jit in [
            *((n, "bk", j) for n in MODELS for j in (False, True)),
            ("mnist_cnn", "ghost", True),
            ("transformer", "ghost", False),
        ]
    )
    def test_fit_step_matches_loop(self, name, engine, jit):
        keras.utils.set_random_seed(6)
        model = ac.make_private(MODELS[name](), engine=engine)
        x, y = model_data(model, seed=1)
        grads = reference.unit_gradients(model, x, y, LOSS)
        model.compile(
            optimizer=ac.DPAutoSGD(
                learning_rate=1.0, noise_multiplier=0.0, clipping_style="per-layer"
            ),
            loss=LOSS,
            jit_compile=jit,
        )
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch(x, y)
        moved = [(b - v.numpy()) * BATCH for b, v in zip(before, model.trainable_variables)]
        self.assert_sums_close(
            moved, reference.clipped_sum(grads, reference.groups_for(model, "per-layer"))
        )


class Scale(keras.layers.Layer):
    """y = x * w: a user layer."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="random_normal")

    def call(self, x):
        return x * self.w


class ScaleRule(layer_rules.LayerRule):
    def forward(self, layer, record, call, x):
        record.save(x=x)
        return record.watch("y", call(x))

    def per_example_gradients(self, layer, record):
        x, b = record.saved["x"], record.grads["y"]
        prod = tf.reshape(x * b, [tf.shape(x)[0], -1, x.shape[-1]])
        return [tf.reduce_sum(prod, 1)]


class TiedOutput(keras.layers.Layer):
    """Logits from the transposed embedding matrix: a variable read outside its layer."""

    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def call(self, h):
        return keras.ops.matmul(h, keras.ops.transpose(self.embedding.embeddings))


class PositionEmbedding(keras.layers.Layer):
    """The common position embedding: an Embedding of arange(T), without batch axis."""

    def __init__(self, length, dim, **kwargs):
        super().__init__(**kwargs)
        self.length = length
        self.positions = L.Embedding(length, dim)

    def call(self, h):
        return h + self.positions(keras.ops.arange(self.length))


# These test layers treat each example alone; the library cannot know that unless told.
for _cls in (TiedOutput, PositionEmbedding):
    ac.register_per_example_layer(_cls)


class FallbackAndRulesTest(EngineTestCase):
    def check_against_loop(self, model, x, y, engine="auto", style="all-layer"):
        grads = reference.unit_gradients(model, x, y, LOSS)
        got = engine_sum(model, x, y, engine, style=style)
        self.assert_sums_close(
            got, reference.clipped_sum(grads, reference.groups_for(model, style))
        )

    def test_unsupported_layer_falls_back_to_vectorized(self):
        keras.utils.set_random_seed(7)
        inputs = keras.Input((4, 3))
        model = keras.Model(inputs, L.Dense(CLASSES)(L.GRU(5)(inputs)))
        self.assertFalse(bk_engine.supports(model, None))
        self.assertIn("GRU", layer_rules.unsupported_reason(model))
        self.assertIs(engines.select_engine("auto", model, None), engines.vectorized_engine)
        with self.assertRaisesRegex(ValueError, "does not support"):
            engines.select_engine("bk", model, None)
        x, y = layer_case_data((4, 3), "float32")
        self.check_against_loop(model, x, y)

    def test_microbatches_and_activity_regularizers_fall_back(self):
        self.assertFalse(bk_engine.supports(mlp(), 2))
        inputs = keras.Input((6,))
        model = keras.Model(inputs, L.Dense(CLASSES, activity_regularizer="l2")(inputs))
        self.assertFalse(bk_engine.supports(model, None))
        self.assertIs(engines.select_engine("auto", model, None), engines.vectorized_engine)

    def test_user_rule_and_shared_layers(self):
        keras.utils.set_random_seed(8)
        inputs = keras.Input((4, 3))
        self.assertFalse(bk_engine.supports(keras.Model(inputs, Scale()(inputs)), None))
        layer_rules.register_layer_rule(Scale, ScaleRule())
        scale, dense = Scale(), L.Dense(3)
        h = scale(scale(inputs))  # called twice: per-example gradients of both calls add up
        h = dense(h) + dense(keras.ops.flip(h, axis=1))  # merged calls of a ruled layer
        model = keras.Model(inputs, testing_models.head(h))
        self.assertTrue(bk_engine.supports(model, None))
        x, y = layer_case_data((4, 3), "float32")
        for engine in ("bk", "ghost"):
            with self.subTest(engine=engine):
                self.check_against_loop(model, x, y, engine, style="per-layer")

    def test_tied_weights_fall_back_with_a_warning(self):
        keras.utils.set_random_seed(9)
        inputs = keras.Input((5,), dtype="int32")
        embedding = L.Embedding(CLASSES, 4)
        h = L.GlobalAveragePooling1D()(embedding(inputs))
        model = keras.Model(inputs, TiedOutput(embedding)(L.Dense(4)(h)))
        x, y = layer_case_data((5,), "int32")
        x = x % CLASSES
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.check_against_loop(model, x, y, "bk")
        self.assertTrue(any("read outside their layer" in str(w.message) for w in caught))

    def test_positions_without_batch_axis_fall_back(self):
        keras.utils.set_random_seed(10)
        inputs = keras.Input((BATCH, 4))  # sequence length == batch size: shapes cannot tell
        h = PositionEmbedding(BATCH, 4)(inputs)
        model = keras.Model(inputs, testing_models.head(L.Dense(3)(h)))
        x, y = layer_case_data((BATCH, 4), "float32")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.check_against_loop(model, x, y, "bk")
        self.assertTrue(any("not the batch" in str(w.message) for w in caught))

    def test_dropout_masks_per_example(self):
        keras.utils.set_random_seed(11)
        inputs = keras.Input((8,))
        h = L.Dropout(0.5)(L.Dense(8, activation="tanh")(inputs))
        model = keras.Model(inputs, L.Dense(CLASSES)(h))
        x, y = layer_case_data((8,), "float32")
        seeds = bk_engine.per_example._seed_generators(model)
        state = [tf.convert_to_tensor(sg.state.value) for sg in seeds]
        # Reference: per-example gradients (Jacobian) of the batched forward pass with
        # the same seed state, so the same masks.
        variables = model.trainable_variables
        with tf.GradientTape(persistent=True) as tape:
            with keras.StatelessScope(state_mapping=list(zip([s.state for s in seeds], state))):
                logits = model(x, training=True)
            losses = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        jac = [tape.jacobian(losses, v, experimental_use_pfor=False).numpy() for v in variables]
        grads = [[j[i] for j in jac] for i in range(BATCH)]
        want = reference.clipped_sum(grads)
        self.assert_sums_close(engine_sum(model, x, y, "bk"), want)
        after = [sg.state.numpy() for sg in seeds]
        self.assertNotAllEqual(after[0], state[0].numpy())  # advanced like a forward pass
        for sg, s in zip(seeds, state, strict=True):
            sg.state.assign(s)
        self.assert_sums_close(engine_sum(model, x, y, "ghost"), want)

    def test_non_finite_example_is_dropped(self):
        keras.utils.set_random_seed(12)
        model = mlp()
        x, y = layer_case_data((6,), "float32")
        x[1, 0] = np.inf
        grads = reference.unit_gradients(model, x, y, LOSS)
        want = reference.clipped_sum(grads)
        for engine in ("bk", "ghost", "vectorized"):
            for jit in (False, True):  # XLA: other kernels for the NaN-safe sums
                with self.subTest(engine=engine, jit=jit):
                    got = engine_sum(model, x, y, engine, jit_compile=jit)
                    self.assertTrue(all(np.all(np.isfinite(g)) for g in got))
                    self.assert_sums_close(got, want)

    @parameterized.parameters("mixed_float16", "mixed_bfloat16")
    def test_mixed_precision(self, policy):
        # float16: the static loss scale of the vectorized engine, unscaled in float32.
        keras.config.set_dtype_policy(policy)
        try:
            keras.utils.set_random_seed(15)
            model = testing_models.mnist_cnn()
            x, y = model_data(model)
            want = reference.clipped_sum(reference.unit_gradients(model, x, y, LOSS))
            for engine in ("bk", "ghost"):
                with self.subTest(engine=engine):
                    got = engine_sum(model, x, y, engine)
                    rtol = 1e-3 if policy == "mixed_float16" else 5e-2  # bfloat16: 8 bits
                    self.assert_sums_close(got, want, rtol=rtol)
        finally:
            keras.config.set_dtype_policy("float32")

    def test_xla_step_compiles_once(self):
        # Differentiating through vectorized_map's ops from outside once made XLA treat
        # the batch and the weights as compile-time constants: a recompilation (seconds)
        # at every step. A step must cost a small fraction of the first (compiling) one.
        keras.utils.set_random_seed(14)
        model = ac.make_private(testing_models.mnist_cnn(), engine="bk")
        model.compile(
            optimizer=ac.DPAutoSGD(learning_rate=0.1, noise_multiplier=1.0),
            loss=LOSS,
            jit_compile=True,
        )
        x, y = model_data(model)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times.append(time.perf_counter() - start)
        self.assertLess(times[2], 0.25 * times[0], times)

    def test_tracing_for_xla(self):
        # Rules switch to their XLA-friendly form (e.g. no grouped per-example conv
        # gradient, ~150x slower under XLA on CPU) only while tracing for XLA.
        seen = {}

        def probe(name):
            def fn(x):
                seen[name] = layer_rules.tracing_for_xla()
                return x + 1

            return fn

        tf.function(probe("xla"), jit_compile=True)(tf.constant(1.0))
        tf.function(probe("graph"))(tf.constant(1.0))
        probe("eager")(tf.constant(1.0))
        self.assertEqual(seen, {"xla": True, "graph": False, "eager": False})

    def test_dynamic_sequence_length(self):
        keras.utils.set_random_seed(13)
        inputs = keras.Input((None, 6))
        h = L.Dense(4)(L.Conv1D(5, 2, padding="same")(inputs))
        model = keras.Model(inputs, L.Dense(CLASSES)(L.GlobalAveragePooling1D()(h)))
        x, y = layer_case_data((7, 6), "float32")
        optimizer = ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0)

        @tf.function(
            autograph=False,
            input_signature=[
                tf.TensorSpec([None, None, 6], tf.float32),
                tf.TensorSpec([None], tf.int32),
            ],
        )
        def step(x, y):
            return ac.private_gradients(model, x, y, optimizer=optimizer, loss=LOSS, engine="bk")

        got = [g.numpy() * BATCH for g in step(x, y)]
        grads = reference.unit_gradients(model, x, y, LOSS)
        self.assert_sums_close(got, reference.clipped_sum(grads))


if __name__ == "__main__":
    tf.test.main()

"""Layers that mix examples within a batch must not reach the one-pass engines.

The fast engines ("bk", "ghost") run ONE batched forward pass; a layer whose output for
example i depends on example j makes example j's clipped gradient depend on example i,
and the sensitivity bound of the clipped sum (2 for replace-one under automatic
clipping, each clipped gradient has norm < 1) no longer holds. Such models must go to
the vectorized engine (each example alone) under ``engine="auto"``, and ``engine="bk"``
must refuse them, naming the layer. Attacks measured here: a Lambda standardizing by
batch statistics, a Lambda multiplying by the sign of the batch mean, and
``UnitNormalization(axis=0)``.
"""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tf_autoclip import bk_engine, engines, layer_safety

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BATCH = 8
DIM = 4
CLASSES = 3
BOUND = 2.0  # replace-one sensitivity of sum_i c_i g_i when every ||c_i g_i|| < 1


def standardize_by_batch(h):
    mean = keras.ops.mean(h, axis=0, keepdims=True)
    return (h - mean) / (keras.ops.std(h, axis=0, keepdims=True) + 1e-3)


def sign_of_batch_mean(h):
    return h * keras.ops.sign(keras.ops.mean(h, axis=0, keepdims=True))


ATTACKS = {
    "lambda_batch_standardize": lambda: L.Lambda(standardize_by_batch),
    "lambda_sign_of_batch_mean": lambda: L.Lambda(sign_of_batch_mean),
    "unit_normalization_axis_0": lambda: L.UnitNormalization(axis=0),
}


def attack_model(make_layer):
    inputs = keras.Input((DIM,))
    h = L.Dense(DIM, kernel_initializer="identity", use_bias=False)(inputs)
    return keras.Model(inputs, L.Dense(CLASSES)(make_layer()(h)))


def neighbouring_batches():
    """Two batches that differ in example 0 only: a large outlier replaces it. Similar
    examples with one label: their clipped gradients are aligned and add up."""
    rng = np.random.default_rng(0)
    x = (0.3 * rng.normal(size=(BATCH, DIM)) + 1.0).astype("float32")
    y = np.zeros(BATCH, "int32")
    x2 = x.copy()
    x2[0] = -50.0 * np.abs(x[0]) - 20.0
    return (x, y), (x2, y)


def clipped_sum(model, x, y, engine="auto"):
    """sum_i c_i g_i: sigma = 0 and the sum divided by expected_batch_size = 1."""
    opt = ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0, expected_batch_size=1)
    grads = ac.private_gradients(model, x, y, optimizer=opt, loss=LOSS, engine=engine)
    return np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in grads])


class PerExample(keras.layers.Layer):
    """A user layer that acts on each example alone (y = 2x + 1)."""

    def call(self, x):
        return 2.0 * x + 1.0


class BatchCentered(keras.layers.Layer):
    """A user layer that mixes examples (subtracts the batch mean)."""

    def call(self, x):
        return x - keras.ops.mean(x, axis=0, keepdims=True)


class SensitivityTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters((name, name) for name in ATTACKS)
    def test_replace_one_sensitivity_is_bounded(self, name):
        keras.utils.set_random_seed(1)
        model = attack_model(ATTACKS[name])
        (x, y), (x2, y2) = neighbouring_batches()
        delta = np.linalg.norm(clipped_sum(model, x, y) - clipped_sum(model, x2, y2))
        print(f"{name}: ||delta|| = {delta:.3f} (bound {BOUND})")
        self.assertLessEqual(delta, BOUND + 1e-5)

    @parameterized.named_parameters((name, name) for name in ATTACKS)
    def test_auto_uses_the_vectorized_engine_and_bk_refuses(self, name):
        model = attack_model(ATTACKS[name])
        self.assertIs(engines.select_engine("auto", model, None), engines.vectorized_engine)
        layer = model.layers[2]
        for engine in ("bk", "ghost"):
            message = f"{layer.name}.*{type(layer).__name__}.*register_per_example_layer"
            with self.subTest(engine=engine), self.assertRaisesRegex(ValueError, message):
                engines.select_engine(engine, model, None)

    def test_functional_op_over_the_batch_axis_is_not_vouched(self):
        inputs = keras.Input((DIM,))
        h = L.Dense(DIM)(inputs)
        mixed = h - keras.ops.mean(h, axis=0, keepdims=True)  # a keras.ops node, no Layer
        model = keras.Model(inputs, L.Dense(CLASSES)(mixed))
        self.assertRegex(layer_safety.unvouched_reason(model), "Mean")
        self.assertFalse(bk_engine.supports(model, None))
        per_example = keras.ops.relu(h) * 2.0 + keras.ops.mean(h, axis=-1, keepdims=True)
        per_example = keras.ops.flip(per_example, axis=1)
        model = keras.Model(inputs, L.Dense(CLASSES)(per_example))
        self.assertIsNone(layer_safety.unvouched_reason(model))
        self.assertTrue(bk_engine.supports(model, None))
        for mixed in (keras.ops.flip(h), keras.ops.transpose(h), h + keras.ops.sum(h, axis=1)):
            with self.subTest(op=mixed.name):
                model = keras.Model(inputs, mixed)
                self.assertIsNotNone(layer_safety.unvouched_reason(model))


class VouchingTest(tf.test.TestCase, parameterized.TestCase):
    def test_stock_per_example_models_are_vouched(self):
        inputs = keras.Input((6, 6, 1))
        h = L.Conv2D(2, 3, activation="relu")(inputs)
        h = L.MaxPooling2D()(L.Dropout(0.1)(h))
        h = L.UnitNormalization(axis=-1)(L.Flatten()(h))
        h = L.Softmax()(L.LayerNormalization()(L.Dense(4)(h)))
        model = keras.Model(inputs, L.Dense(CLASSES)(h))
        self.assertIsNone(layer_safety.unvouched_reason(model))
        self.assertIs(engines.select_engine("auto", model, None), bk_engine.bk_engine)
        nested = keras.Sequential([keras.Input((6, 6, 1)), model, L.Activation("tanh")])
        self.assertIsNone(layer_safety.unvouched_reason(nested))

    @parameterized.named_parameters(
        ("unit_norm_last", lambda: L.UnitNormalization(axis=-1), None),
        ("unit_norm_batch", lambda: L.UnitNormalization(axis=0), "axis"),
        ("unit_norm_minus_rank", lambda: L.UnitNormalization(axis=-2), "axis"),
        ("unit_norm_list", lambda: L.UnitNormalization(axis=[0, 1]), "axis"),
        ("softmax_batch", lambda: L.Softmax(axis=0), "axis"),
        ("lambda", lambda: L.Lambda(lambda h: h), "Lambda"),
        ("normalization_scalar", lambda: L.Normalization(axis=None, mean=0.0, variance=1.0), None),
        ("reshape", lambda: L.Reshape((1, DIM)), None),
        ("batch_norm", lambda: L.BatchNormalization(), "BatchNormalization"),
    )
    def test_argument_predicates(self, make_layer, expected):
        layer = make_layer()
        model = attack_model(lambda: layer)
        reason = layer_safety.unvouched_reason(model)
        if expected is None:
            self.assertIsNone(reason)
        else:
            self.assertRegex(reason, f"{layer.name!r}.*{expected}")

    def test_concatenate_over_the_batch_axis_is_not_vouched(self):
        inputs = keras.Input((DIM,))
        h = L.Dense(DIM)(inputs)
        ok = keras.Model(inputs, L.Concatenate(axis=-1)([h, h]))
        self.assertIsNone(layer_safety.unvouched_reason(ok))
        bad = keras.Model(inputs, L.Concatenate(axis=0)([h, h]))
        self.assertRegex(layer_safety.unvouched_reason(bad), "axis")

    def test_vouched_user_layer_gets_bk_and_check_is_applied(self):
        model = attack_model(PerExample)
        self.assertRegex(layer_safety.unvouched_reason(model), "PerExample.*register_per_example")
        self.assertIs(engines.select_engine("auto", model, None), engines.vectorized_engine)
        try:
            ac.register_per_example_layer(PerExample)
            self.assertIsNone(layer_safety.unvouched_reason(model))
            self.assertIs(engines.select_engine("auto", model, None), bk_engine.bk_engine)
            self.assertIs(engines.select_engine("bk", model, None), bk_engine.bk_engine)
            ac.register_per_example_layer(PerExample, check=lambda layer: "not today")
            self.assertRegex(layer_safety.unvouched_reason(model), "not today")
        finally:
            layer_safety.unregister_per_example_layer(PerExample)
        self.assertIsNotNone(layer_safety.unvouched_reason(model))

    def test_vouching_does_not_extend_to_subclasses_with_their_own_call(self):
        try:
            ac.register_per_example_layer(PerExample)

            class Sneaky(PerExample):
                def call(self, x):
                    return x - keras.ops.mean(x, axis=0)

            class Renamed(PerExample):
                pass

            self.assertIsNotNone(layer_safety.unvouched_reason(attack_model(Sneaky)))
            self.assertIsNone(layer_safety.unvouched_reason(attack_model(Renamed)))
        finally:
            layer_safety.unregister_per_example_layer(PerExample)

    def test_sublayers_of_a_vouched_layer_are_checked(self):
        class Block(keras.layers.Layer):
            def __init__(self, inner, **kwargs):
                super().__init__(**kwargs)
                self.inner = inner

            def call(self, x):
                return self.inner(x)

        try:
            ac.register_per_example_layer(Block)
            for inner, expected in [
                (L.Softmax(), None),
                (L.UnitNormalization(axis=0), "axis"),
                (L.BatchNormalization(), "BatchNormalization"),
            ]:
                with self.subTest(inner=type(inner).__name__):
                    model = attack_model(lambda inner=inner: Block(inner))
                    reason = layer_safety.unvouched_reason(model)
                    if expected is None:
                        self.assertIsNone(reason)
                    else:
                        self.assertRegex(reason, f"{inner.name!r}.*{expected}")
        finally:
            layer_safety.unregister_per_example_layer(Block)

    def test_subclassed_model_is_not_vouched(self):
        class Model(keras.Model):
            def __init__(self):
                super().__init__()
                self.dense = L.Dense(CLASSES)

            def call(self, x):
                return self.dense(x - keras.ops.mean(x, axis=0))

        model = Model()
        model(np.zeros((2, DIM), "float32"))
        self.assertRegex(layer_safety.unvouched_reason(model), "Model")
        self.assertFalse(bk_engine.supports(model, None))

    def test_register_refuses_what_it_cannot_vouch(self):
        with self.assertRaisesRegex(TypeError, "layer class"):
            ac.register_per_example_layer(BatchCentered())
        with self.assertRaisesRegex(ValueError, "BatchNormalization.*GroupNormalization"):
            ac.register_per_example_layer(L.BatchNormalization)
        with self.assertRaisesRegex(ValueError, "every Lambda.*custom layer"):
            ac.register_per_example_layer(L.Lambda)

    def test_every_keras_layer_is_decided(self):
        decided = layer_safety.decided_layer_names()
        for name in dir(L):
            value = getattr(L, name)
            if isinstance(value, type) and issubclass(value, L.Layer):
                self.assertIn(value.__name__, decided, f"keras.layers.{name} is not in the table")

    def test_batch_normalization_is_still_refused_by_every_engine(self):
        model = attack_model(L.BatchNormalization)
        (x, y), _ = neighbouring_batches()
        for engine in ("auto", "vectorized"):
            with self.assertRaisesRegex(ValueError, "BatchNormalization"):
                clipped_sum(model, x, y, engine)


# x[key] on a [B, 4, 3] input: vouched only when the key keeps every example's row.
GETITEM_KEYS = {
    "cls_token": ((slice(None), 0), True),
    "ellipsis_last_axis": ((Ellipsis, 0), True),
    "batch_index": ((0,), False),
    "reversed_batch": ((slice(None, None, -1),), False),
    "batch_slice": ((slice(1, None),), False),
    "new_axis_first": ((None,), False),
    "ellipsis_covering_every_axis": ((Ellipsis, 0, 0, 0), False),
}


class GetItemTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters((name, name) for name in GETITEM_KEYS)
    def test_getitem_vouched_only_when_the_batch_axis_stays_whole(self, name):
        key, vouched = GETITEM_KEYS[name]
        inputs = keras.Input((4, 3))
        model = keras.Model(inputs, keras.layers.Dense(2)(inputs)[key])
        reason = layer_safety.unvouched_reason(model)
        if vouched:
            self.assertIsNone(reason)
        else:
            self.assertIn("GetItem", reason or "")


if __name__ == "__main__":
    tf.test.main()

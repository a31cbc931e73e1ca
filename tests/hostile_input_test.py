"""Hostile and unusual input: a clear error or correct handling, never a silently wrong update."""

import keras
import numpy as np
import tensorflow as tf

import tf_autoclip as ac
from tests import testing_models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def compiled(model, **optimizer_kwargs):
    optimizer_kwargs.setdefault("learning_rate", 0.1)
    optimizer_kwargs.setdefault("noise_multiplier", 1.0)
    model = ac.make_private(model)
    model.compile(optimizer=ac.DPAutoSGD(**optimizer_kwargs), loss=LOSS)
    return model


class HostileInputTest(tf.test.TestCase):
    def test_empty_batch(self):
        model = compiled(testing_models.mlp())
        empty_x, empty_y = np.zeros((0, 6), "float32"), np.zeros((0,), "int32")
        start = model.get_weights()
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "Empty batch"):
            model.train_on_batch(empty_x, empty_y)
        for a, b in zip(start, model.get_weights(), strict=True):
            self.assertAllEqual(a, b)
        # With an expected batch size (Poisson sampling) an empty batch is a legitimate,
        # pure-noise step of std sigma / B.
        model = compiled(testing_models.mlp(), expected_batch_size=4)
        start = model.get_weights()
        model.train_on_batch(empty_x, empty_y)
        moved = np.concatenate([(a - b).ravel() for a, b in zip(start, model.get_weights())])
        self.assertTrue(np.isfinite(moved).all())
        self.assertGreater(np.abs(moved).max(), 0.0)

    def test_ragged_and_sparse_inputs_refused(self):
        inputs = keras.Input((None,), dtype="int32")
        h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(10, 4)(inputs))
        model = compiled(keras.Model(inputs, keras.layers.Dense(2)(h)))
        ragged = tf.ragged.constant([[1, 2], [3, 4, 5]])
        with self.assertRaisesRegex(ValueError, "RaggedTensor inputs are not supported.*to_tensor"):
            model.train_on_batch(ragged, np.zeros(2, "int32"))

    def test_variable_length_sequences(self):
        def dataset():
            lengths = [3, 5, 2, 7]
            rows = ((np.arange(1, n + 1, dtype="int32"), 0) for n in lengths)
            spec = (tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32))
            return tf.data.Dataset.from_generator(lambda: rows, output_signature=spec).padded_batch(
                2
            )

        inputs = keras.Input((None,), dtype="int32")
        h = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
        pooled = compiled(
            keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(h)))
        )
        history = pooled.fit(dataset(), verbose=0)  # dense layers: any length works
        self.assertGreater(int(pooled.optimizer.iterations), 0)
        self.assertTrue(np.isfinite(history.history["loss"]).all())
        recurrent = compiled(keras.Model(inputs, keras.layers.Dense(2)(keras.layers.LSTM(3)(h))))
        with self.assertRaisesRegex(ValueError, "sequence length fixed"):
            recurrent.fit(dataset(), verbose=0)

    def test_dict_int_and_bool_features(self):
        a = keras.Input((3,), name="a")
        b = keras.Input((2,), name="b", dtype="bool")
        c = keras.Input((1,), name="c", dtype="int32")
        h = keras.layers.Concatenate()(
            [
                a,
                keras.ops.cast(b, "float32"),
                keras.layers.Flatten()(keras.layers.Embedding(5, 2)(c)),
            ]
        )
        model = compiled(keras.Model({"a": a, "b": b, "c": c}, keras.layers.Dense(2)(h)))
        x = {
            "a": np.ones((8, 3), "float32"),
            "b": np.ones((8, 2), bool),
            "c": np.arange(8).reshape(8, 1) % 5,
        }
        history = model.fit(x, np.zeros(8, "int32"), batch_size=4, verbose=0)
        self.assertTrue(np.isfinite(history.history["loss"]).all())

    def test_overridden_compute_loss_or_train_step_refused(self):
        class CustomLoss(keras.Model):
            def compute_loss(self, *args, **kwargs):
                return super().compute_loss(*args, **kwargs) * 2.0

        class CustomStep(keras.Model):
            def train_step(self, data):
                return super().train_step(data)

        for cls, hook in ((CustomLoss, "compute_loss"), (CustomStep, "train_step")):
            inputs = keras.Input((3,))
            model = cls(inputs, keras.layers.Dense(2)(inputs))
            with self.subTest(hook), self.assertRaisesRegex(ValueError, f"overrides {hook}"):
                ac.make_private(model)

        class PrivateCustomLoss(ac.DPModel):
            def compute_loss(self, *args, **kwargs):
                return super().compute_loss(*args, **kwargs) * 2.0

        inputs = keras.Input((3,))
        model = PrivateCustomLoss(inputs, keras.layers.Dense(2)(inputs))
        model.compile(optimizer=ac.DPAutoSGD(noise_multiplier=1.0), loss=LOSS)
        with self.assertRaisesRegex(ValueError, "overrides compute_loss"):
            model.train_on_batch(np.ones((2, 3), "float32"), np.zeros(2, "int32"))

    def test_reduction_none_in_compile_is_still_per_example(self):
        keras.utils.set_random_seed(0)
        reference = ac.make_private(testing_models.mlp())
        x, y = testing_models.data_for(reference, 4)
        start = reference.get_weights()
        updates = []
        for reduction in ("sum_over_batch_size", "none", "sum"):
            reference.set_weights(start)
            reference.compile(
                optimizer=ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True, reduction=reduction
                ),
            )
            reference.train_on_batch(x, y)
            updates.append(reference.get_weights())
        # Each example's loss is computed on its own, so the reduction cannot mix examples.
        for other in updates[1:]:
            for a, b in zip(updates[0], other, strict=True):
                self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)


if __name__ == "__main__":
    tf.test.main()

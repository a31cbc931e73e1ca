"""The Keras integration: misuse is refused loudly, Keras features keep their meaning."""

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tests import reference, testing_models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def sgd(**kwargs):
    kwargs.setdefault("learning_rate", 1.0)
    kwargs.setdefault("noise_multiplier", 0.0)
    return ac.DPAutoSGD(**kwargs)


def weights_moved(model, before):
    return [b - v.numpy() for b, v in zip(before, model.trainable_variables, strict=True)]


class MisuseTest(tf.test.TestCase):
    def test_unwrapped_model_with_dp_optimizer_refuses_to_train(self):
        model = testing_models.mlp()
        model.compile(optimizer=ac.DPAutoAdam(noise_multiplier=1.0), loss=LOSS)
        x, y = testing_models.data_for(model, 4)
        before = [v.numpy() for v in model.trainable_variables]
        with self.assertRaisesRegex(ac.NonPrivateGradientError, "make_private"):
            model.fit(x, y, verbose=0)
        for b, v in zip(before, model.trainable_variables, strict=True):
            self.assertAllEqual(b, v.numpy())  # not a single step was taken

    def test_custom_loop_with_plain_gradients_refused(self):
        model = testing_models.mlp()
        opt = ac.DPAutoSGD(learning_rate=0.1, noise_multiplier=1.0)
        x, y = testing_models.data_for(model, 4)
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x))
        grads = tape.gradient(loss, model.trainable_variables)
        with self.assertRaises(ac.NonPrivateGradientError):
            opt.apply_gradients(zip(grads, model.trainable_variables))
        # Private gradients, modified after privatization, are refused too.
        private = ac.private_gradients(model, x, y, optimizer=opt, loss=LOSS)
        with self.assertRaises(ac.NonPrivateGradientError):
            opt.apply_gradients(zip([g * 1.0 for g in private], model.trainable_variables))

    def test_custom_loop_with_private_gradients(self):
        model = testing_models.mlp()
        opt = ac.DPAutoSGD(learning_rate=0.1, noise_multiplier=1.0, seed=0)
        x, y = testing_models.data_for(model, 4)

        @tf.function
        def step(x, y):
            grads = ac.private_gradients(model, x, y, optimizer=opt, loss=LOSS)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        step(x, y)
        step(x, y)
        self.assertEqual(int(opt.iterations), 2)

    def test_private_model_needs_dp_optimizer(self):
        model = ac.make_private(testing_models.mlp())
        model.compile(optimizer="adam", loss=LOSS)
        x, y = testing_models.data_for(model, 4)
        with self.assertRaisesRegex(TypeError, "DP optimizer"):
            model.fit(x, y, verbose=0)

    def test_batch_normalization_refused_before_any_step(self):
        model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
        with self.assertRaisesRegex(ValueError, "GroupNormalization or LayerNormalization"):
            ac.make_private(model)
        nested = keras.Sequential(
            [keras.Input((3,)), keras.Sequential([keras.layers.BatchNormalization()])]
        )
        with self.assertRaisesRegex(ValueError, "mixes examples"):
            ac.make_private(nested)

    def test_invalid_arguments(self):
        cases = [
            dict(noise_multiplier=-1.0),
            dict(noise_multiplier=float("nan")),
            dict(noise_multiplier=1.0, gamma=-0.1),
            dict(noise_multiplier=1.0, clipping="abadi"),
            dict(noise_multiplier=1.0, clipping="abadi", l2_norm_clip=0.0),
            dict(noise_multiplier=1.0, clipping="global", l2_norm_clip=-1.0),
            dict(noise_multiplier=1.0, clipping="auto"),
            dict(noise_multiplier=1.0, clipping_style="per-tensor"),
            dict(noise_multiplier=1.0, expected_batch_size=0),
            dict(noise_multiplier=1.0, num_microbatches=0),
            dict(noise_multiplier=1.0, clipnorm=1.0),
            dict(noise_multiplier=1.0, global_clipnorm=1.0),
        ]
        for kwargs in cases:
            with (
                self.subTest(**{k: str(v) for k, v in kwargs.items()}),
                self.assertRaises(ValueError),
            ):
                ac.DPAutoSGD(**kwargs)
        with self.assertRaises(TypeError):
            ac.DPAutoSGD(learning_rate=0.1)  # noise_multiplier is required

    def test_batch_not_divisible_by_microbatches(self):
        model = ac.make_private(testing_models.mlp())
        model.compile(optimizer=sgd(num_microbatches=4), loss=LOSS)
        x, y = testing_models.data_for(model, 6)
        with self.assertRaisesRegex(
            (ValueError, tf.errors.InvalidArgumentError), "multiple of num_microbatches"
        ):
            model.train_on_batch(x, y)


class SerializationTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(
        ac.DPAutoSGD, ac.DPAutoAdam, ac.DPAutoAdamW, ac.DPAutoAdagrad, ac.DPAutoRMSprop,
        ac.DPAutoNadam, ac.DPAutoAdamax, ac.DPAutoAdadelta, ac.DPAutoAdafactor, ac.DPAutoFtrl,
        ac.DPAutoLion, ac.DPAutoLamb, ac.DPAutoMuon, ac.DPAutoScheduleFreeAdamW,
    )  # fmt: skip
    def test_config_round_trip_and_one_step(self, cls):
        opt = cls(
            noise_multiplier=0.7, clipping="abadi", l2_norm_clip=0.5, clipping_style="per-layer",
            expected_batch_size=8, seed=3,
        )  # fmt: skip
        config = opt.get_config()
        restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
        self.assertIs(type(restored), cls)
        self.assertEqual(restored.get_config(), config)
        model = ac.make_private(testing_models.mlp())
        model.compile(optimizer=restored, loss=LOSS)
        x, y = testing_models.data_for(model, 8)
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch(x, y)
        self.assertTrue(any(np.any(m != 0) for m in weights_moved(model, before)))

    @parameterized.parameters("sequential", "functional")
    def test_save_and_load_restores_private_model_and_optimizer(self, kind):
        if kind == "sequential":
            model = ac.make_private(
                keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), keras.layers.Dense(3)])
            )
        else:
            model = ac.make_private(testing_models.mlp())
        model.compile(
            optimizer=ac.DPAutoAdam(learning_rate=1e-2, noise_multiplier=1.1, clipping="auto-v"),
            loss=LOSS,
            metrics=["accuracy"],
        )
        x, y = testing_models.data_for(model, 16)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        path = os.path.join(tempfile.mkdtemp(), "m.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        self.assertIs(type(loaded), type(model))
        self.assertIsInstance(loaded.optimizer, ac.DPAutoAdam)
        self.assertEqual(loaded.optimizer.noise_multiplier, 1.1)
        self.assertEqual(loaded.optimizer.clipping_config.mode, "auto-v")
        self.assertEqual(int(loaded.optimizer.iterations), 2)
        for a, b in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
            self.assertAllClose(a, b)
        for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
            self.assertAllClose(a, b)
        loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
        self.assertEqual(int(loaded.optimizer.iterations), 4)

    def test_subclassed_model_reloads_as_user_class_and_refuses_until_private(self):
        model = ac.make_private(SubclassedMLP())
        model.compile(optimizer=ac.DPAutoSGD(learning_rate=0.1, noise_multiplier=1.0), loss=LOSS)
        x, y = testing_models.data_for(testing_models.mlp(), 8)
        model.fit(x, y, verbose=0)
        path = os.path.join(tempfile.mkdtemp(), "m.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        self.assertIsInstance(loaded, SubclassedMLP)
        with self.assertRaises(ac.NonPrivateGradientError):
            loaded.fit(x, y, verbose=0)
        ac.make_private(loaded).fit(x, y, verbose=0)

    def test_user_optimizer_class(self):
        @keras.saving.register_keras_serializable(package="tests")
        class MySGD(keras.optimizers.SGD):
            pass

        DPAutoMySGD = ac.make_dp_optimizer_class(MySGD)
        self.assertIs(ac.make_dp_optimizer_class(MySGD), DPAutoMySGD)
        opt = DPAutoMySGD(learning_rate=0.5, noise_multiplier=0.0)
        self.assertIsInstance(opt, MySGD)
        restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
        self.assertIs(type(restored), DPAutoMySGD)
        with self.assertRaises(TypeError):
            ac.make_dp_optimizer_class(DPAutoMySGD)


@keras.saving.register_keras_serializable(package="tests")
class SubclassedMLP(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(5, activation="tanh")
        self.out = keras.layers.Dense(testing_models.NUM_CLASSES)

    def call(self, x, training=False):
        return self.out(self.hidden(x))


class KerasFeaturesTest(tf.test.TestCase):
    def test_weight_regularizer_outside_clipping_activity_regularizer_inside(self):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        h = keras.layers.Dense(4, kernel_regularizer=keras.regularizers.L2(0.3))(inputs)
        h = keras.layers.Dense(3, activity_regularizer=keras.regularizers.L2(0.2))(h)
        model = keras.Model(inputs, h)
        x, y = testing_models.data_for(model, 4)
        # Reference: data loss + activity term per example, clipped; L2 gradient unclipped.
        plain = keras.Model(inputs, h)
        with tf.GradientTape() as tape:
            reg = tf.add_n(plain._get_regularization_losses())
        reg_grads = [
            np.zeros(v.shape) if g is None else g.numpy()
            for g, v in zip(
                tape.gradient(reg, plain.trainable_variables),
                plain.trainable_variables,
                strict=True,
            )
        ]
        per_example = reference.unit_gradients(
            plain, x, y, LOSS,
            extra_loss=lambda m: tf.add_n([tf.reduce_sum(v) for v in m.layers[-1].losses]),
        )  # fmt: skip
        clipped = reference.sgd_step(per_example, 4, dtype=np.float32)
        expected = [c + r for c, r in zip(clipped, reg_grads, strict=True)]
        ac.make_private(model)
        model.compile(optimizer=sgd(), loss=LOSS)
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch(x, y)
        for got, want in zip(weights_moved(model, before), expected, strict=True):
            self.assertAllClose(got, want, rtol=1e-5, atol=1e-6)

    def test_zero_weight_and_non_finite_examples_contribute_nothing(self):
        keras.utils.set_random_seed(0)
        model = ac.make_private(testing_models.mlp())
        x, y = testing_models.data_for(model, 4)
        model.compile(optimizer=sgd(expected_batch_size=4), loss=LOSS)
        start = model.get_weights()
        model.train_on_batch(x[:2], y[:2])
        two_only = model.get_weights()
        x_padded = x.copy()
        x_padded[2] = np.nan  # a masked row may hold anything
        x_padded[3] = np.inf
        model.set_weights(start)
        model.compile(optimizer=sgd(expected_batch_size=4), loss=LOSS)
        model.train_on_batch(x_padded, y, sample_weight=np.array([1.0, 1.0, 0.0, 0.0]))
        for a, b in zip(two_only, model.get_weights(), strict=True):
            self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)
        # An unmasked non-finite example is dropped from the sum as well.
        model.set_weights(start)
        model.compile(optimizer=sgd(expected_batch_size=4), loss=LOSS)
        model.train_on_batch(x_padded, y)
        for a, b in zip(two_only, model.get_weights(), strict=True):
            self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)

    def test_multiple_outputs_with_loss_weights(self):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        h = keras.layers.Dense(5, activation="tanh")(inputs)
        a = keras.layers.Dense(3, name="a")(h)
        b = keras.layers.Dense(1, name="b")(h)
        model = keras.Model(inputs, {"a": a, "b": b})
        x, y = testing_models.data_for(model, 4)
        yb = np.linspace(-1, 1, 4).astype("float32")[:, None]
        mse = keras.losses.MeanSquaredError()

        def weighted_loss(y_true, y_pred):
            return LOSS(y_true["a"], y_pred["a"]) + 0.5 * mse(y_true["b"], y_pred["b"])

        per_example = reference.unit_gradients(model, x, {"a": y, "b": yb}, weighted_loss)
        expected = reference.sgd_step(per_example, 4, dtype=np.float32)
        ac.make_private(model)
        model.compile(
            optimizer=sgd(), loss={"a": LOSS, "b": mse}, loss_weights={"a": 1.0, "b": 0.5},
            metrics={"a": ["accuracy"]},
        )  # fmt: skip
        before = [v.numpy() for v in model.trainable_variables]
        logs = model.train_on_batch(x, {"a": y, "b": yb}, return_dict=True)
        for got, want in zip(weights_moved(model, before), expected, strict=True):
            self.assertAllClose(got, want, rtol=1e-5, atol=1e-6)
        self.assertIn("a_accuracy", logs)
        self.assertGreater(logs["b_loss"], 0.0)

    def test_dropout_draws_a_mask_per_example(self):
        model = ac.make_private(
            keras.Sequential([keras.Input((64,)), keras.layers.Dropout(0.5), keras.layers.Dense(2)])
        )
        model.compile(optimizer=sgd(), loss=LOSS)
        x = np.ones((4, 64), "float32")
        step = ac.training.private_step(model, model.optimizer, x, np.zeros(4, "int32"), None)
        rows = step.y_pred.numpy()
        self.assertNotAllClose(rows[0], rows[1])
        again = ac.training.private_step(model, model.optimizer, x, np.zeros(4, "int32"), None)
        self.assertNotAllClose(rows, again.y_pred.numpy())  # and a new mask every step

    def test_fit_with_dataset_metrics_and_steps_per_execution(self):
        model = ac.make_private(testing_models.cnn())
        model.compile(
            optimizer=ac.DPAutoAdam(
                learning_rate=1e-2, noise_multiplier=0.5, seed=1, expected_batch_size=8
            ),
            loss=LOSS, metrics=["accuracy"], steps_per_execution=2,
        )  # fmt: skip
        x, y = testing_models.data_for(model, 20)
        # The last batch is partial: divided by expected_batch_size, not by its size.
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        history = model.fit(ds, epochs=2, verbose=0)
        self.assertEqual(int(model.optimizer.iterations), 6)
        self.assertLen(history.history["accuracy"], 2)
        self.assertTrue(np.isfinite(history.history["loss"]).all())

    def test_run_eagerly(self):
        model = ac.make_private(testing_models.mlp())
        model.compile(optimizer=sgd(learning_rate=0.1), loss=LOSS, run_eagerly=True)
        x, y = testing_models.data_for(model, 4)
        model.fit(x, y, verbose=0)
        self.assertEqual(int(model.optimizer.iterations), 1)


if __name__ == "__main__":
    tf.test.main()

"""The divisor of the noisy sum is data-independent, and batch sizes are never released.

Dividing each batch by its own size releases it: a partial last batch releases n mod B,
user-made variable batches their sizes. The default (``expected_batch_size=None``) fixes
the divisor at the first batch and refuses other sizes; ``poisson_sample``'s dataset sets
the divisor to q·n itself. Measured with sigma = 0 and SGD at lr = 1, so a step moves the
weights by exactly -(clipped sum) / divisor.
"""

import keras
import numpy as np
import tensorflow as tf

import tf_autoclip as ac
from tests import testing_models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def private_model(**optimizer_kwargs) -> keras.Model:
    model = ac.make_private(testing_models.mlp())
    model.compile(
        optimizer=ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0, **optimizer_kwargs),
        loss=LOSS,
    )
    return model


def clipped_sum(model: keras.Model, x, y) -> list[np.ndarray]:
    """sum_i c_i g_i of the batch (divisor 1), from a copy of the model's optimizer settings."""
    opt = ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0, expected_batch_size=1)
    return [g.numpy() for g in ac.private_gradients(model, x, y, optimizer=opt, loss=LOSS)]


def step_delta(model: keras.Model, fn) -> list[np.ndarray]:
    before = [v.numpy() for v in model.trainable_variables]
    fn()
    return [b - v.numpy() for b, v in zip(before, model.trainable_variables, strict=True)]


class WeightRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.after = []

    def on_train_batch_end(self, batch, logs=None):
        self.after.append(self.model.get_weights())


class DivisorTest(tf.test.TestCase):
    def test_partial_last_batch_is_refused(self):
        model = private_model()
        x, y = testing_models.data_for(model, 50)
        recorder = WeightRecorder()
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "expected_batch_size=B"):
            model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[recorder])  # 16,16,16,2
        self.assertLen(recorder.after, 3)  # the partial batch never moved the weights
        for a, b in zip(recorder.after[-1], model.get_weights(), strict=True):
            self.assertAllEqual(a, b)

    def test_variable_batches_are_refused(self):
        model = private_model()
        x, y = testing_models.data_for(model, 41)
        sizes = [3, 11, 27]
        starts = np.cumsum([0, *sizes])

        def batches():
            for a, b in zip(starts[:-1], starts[1:], strict=True):
                yield x[a:b], y[a:b]

        dataset = tf.data.Dataset.from_generator(
            batches,
            output_signature=(
                tf.TensorSpec([None, 6], tf.float32),
                tf.TensorSpec([None], y.dtype),
            ),
        )
        recorder = WeightRecorder()
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "different size"):
            model.fit(dataset, epochs=1, verbose=0, callbacks=[recorder])
        self.assertLen(recorder.after, 1)
        for a, b in zip(recorder.after[-1], model.get_weights(), strict=True):
            self.assertAllEqual(a, b)

    def test_refused_with_static_shapes(self):
        model = private_model()
        x, y = testing_models.data_for(model, 6)
        model.train_on_batch(x[:4], y[:4])
        refused = (ValueError, tf.errors.InvalidArgumentError)  # at trace time, or at run time
        with self.assertRaisesRegex(refused, "different size than the first"):
            model.train_on_batch(x[:2], y[:2])

    def test_partial_batch_divided_by_expected_batch_size(self):
        model = private_model(expected_batch_size=16)
        x, y = testing_models.data_for(model, 2)
        expected = clipped_sum(model, x, y)
        delta = step_delta(model, lambda: model.train_on_batch(x, y))
        for d, s in zip(delta, expected, strict=True):
            self.assertAllClose(d, s / 16, rtol=1e-5, atol=1e-7)

    def test_divisor_stays_fixed_where_assertions_are_dropped(self):
        # XLA drops tf.debugging assertions: the divisor must still be the first size.
        model = testing_models.mlp()
        opt = ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0)
        x, y = testing_models.data_for(model, 6)

        @tf.function(
            jit_compile=True,
            input_signature=[tf.TensorSpec([None, 6]), tf.TensorSpec([None], y.dtype)],
        )
        def grads(xb, yb):
            return ac.private_gradients(model, xb, yb, optimizer=opt, loss=LOSS)

        grads(x[:4], y[:4])
        got = [g.numpy() for g in grads(x[:2], y[:2])]
        for g, s in zip(got, clipped_sum(model, x[:2], y[:2]), strict=True):
            self.assertAllClose(g, s / 4, rtol=1e-5, atol=1e-7)

    def test_poisson_sampler_sets_the_divisor(self):
        model = private_model()
        x, y = testing_models.data_for(model, 40)
        sampler = ac.poisson_sample(x, y, expected_batch_size=8, steps=1, seed=3)
        xb, yb, wb = next(iter(sampler.dataset))
        self.assertGreater(sampler.padded_batch_size, 8)
        keep = wb.numpy() > 0
        expected = clipped_sum(model, xb.numpy()[keep], yb.numpy()[keep])
        delta = step_delta(model, lambda: model.fit(sampler.dataset, epochs=1, verbose=0))
        self.assertEqual(model.optimizer.expected_batch_size, 8.0)
        for d, s in zip(delta, expected, strict=True):
            self.assertAllClose(d, s / 8, rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
    tf.test.main()

"""Virtual batches (gradient_accumulation_steps): k physical batches make one private step."""

import keras
import numpy as np
import tensorflow as tf

import tf_autoclip as ac
from tests import testing_models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class AccumulationTest(tf.test.TestCase):
    def test_k_physical_steps_equal_one_logical_step(self):
        keras.utils.set_random_seed(0)
        model = ac.make_private(testing_models.mlp())
        x, y = testing_models.data_for(model, 12)
        start = model.get_weights()

        model.compile(
            optimizer=ac.DPAutoSGD(learning_rate=1.0, momentum=0.9, noise_multiplier=0.0),
            loss=LOSS,
        )
        model.train_on_batch(x, y)
        one_step = model.get_weights()

        model.set_weights(start)
        model.compile(
            optimizer=ac.DPAutoSGD(
                learning_rate=1.0, momentum=0.9, noise_multiplier=0.0, gradient_accumulation_steps=3
            ),
            loss=LOSS,
        )
        for part in range(3):
            model.train_on_batch(x[4 * part : 4 * part + 4], y[4 * part : 4 * part + 4])
            if part < 2:  # nothing is released before the logical batch is complete
                for a, b in zip(start, model.get_weights(), strict=True):
                    self.assertAllEqual(a, b)
        for a, b in zip(one_step, model.get_weights(), strict=True):
            self.assertAllClose(a, b, rtol=1e-5, atol=1e-7)
        self.assertEqual(int(model.optimizer.iterations), 1)  # logical steps, for accounting

    def test_noise_added_once_per_logical_batch(self):
        # Zero gradients: the update is pure noise, std sigma / B_logical (not sqrt(k) times
        # that, not divided by k twice). 100,000 weights: relative standard error of the
        # std estimate 1/sqrt(2e5) = 0.22%; allow 6 of them.
        model = ac.make_private(
            keras.Sequential([keras.Input((200,)), keras.layers.Dense(500, use_bias=False)])
        )
        model.compile(
            optimizer=ac.DPAutoSGD(
                learning_rate=1.0, noise_multiplier=3.0, gradient_accumulation_steps=4, seed=0
            ),
            loss=lambda y_true, y_pred: 0.0 * tf.reduce_sum(y_pred, axis=-1),
        )
        x, y = np.ones((5, 200), "float32"), np.zeros((5, 500), "float32")
        start = model.get_weights()[0]
        for _ in range(4):
            model.train_on_batch(x, y)
        noise = (start - model.get_weights()[0]).ravel()
        self.assertAllClose(noise.std(), 3.0 / 20, rtol=6 / np.sqrt(2 * noise.size))


if __name__ == "__main__":
    tf.test.main()

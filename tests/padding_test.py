"""Padding rows (sample weight 0, as ``poisson_sample`` pads its batches) contribute
nothing to the clipped sum, even through activity regularizers or ``add_loss`` terms.

Their number depends on the sample (padded size minus sampled examples), so if each
contributed up to the sensitivity, adding one example (one padding row fewer) would move
the sum by up to 2S instead of S.
"""

import keras
import numpy as np
import tensorflow as tf

import tf_autoclip as ac

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class AddsLoss(keras.layers.Layer):
    def call(self, x):
        self.add_loss(tf.reduce_sum(tf.square(x)))
        return x


def model_with(extra: str) -> keras.Model:
    inputs = keras.Input((3,))
    if extra == "activity":
        h = keras.layers.Dense(4, activity_regularizer=keras.regularizers.L2(1.0))(inputs)
    else:
        h = AddsLoss()(keras.layers.Dense(4)(inputs))
    return keras.Model(inputs, keras.layers.Dense(2)(h))


class PaddingTest(tf.test.TestCase):
    def sums(self, model, x, y, sw, **kwargs):
        opt = ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0, expected_batch_size=4)
        grads = ac.private_gradients(model, x, y, sw, optimizer=opt, loss=LOSS, **kwargs)
        return [g.numpy() for g in grads]

    def test_padding_rows_add_nothing(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(4, 3)).astype("float32")
        y = np.array([0, 1, 1, 0])
        pad_x = rng.normal(size=(3, 3)).astype("float32")  # any content, weight 0
        padded_x, padded_y = np.concatenate([x, pad_x]), np.concatenate([y, [0, 0, 0]])
        padded_sw = np.array([1, 1, 1, 1, 0, 0, 0], "float32")
        for extra in ("activity", "add_loss"):
            keras.utils.set_random_seed(1)
            model = model_with(extra)
            want = self.sums(model, x, y, np.ones(4, "float32"))
            for kwargs in ({}, {"user_ids": np.array([5, 6, 7, 8, -1, -1, -1])}):
                with self.subTest(extra=extra, **{k: "yes" for k in kwargs}):
                    got = self.sums(model, padded_x, padded_y, padded_sw, **kwargs)
                    for g, w in zip(got, want, strict=True):
                        self.assertAllClose(g, w, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    tf.test.main()

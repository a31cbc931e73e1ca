"""Mixed precision: per-example gradients are unscaled before clipping; norms and noise in float32.

The reference is the plain per-example loop of tests/reference.py under the same dtype
policy (same float16 or bfloat16 arithmetic, no loss scaling), so the tolerance only has
to cover the effect of the static loss scale (a power of two: exact unless something
underflows) and of the order of float32 sums.
"""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tests import reference, testing_models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class MixedPrecisionTest(tf.test.TestCase, parameterized.TestCase):
    def tearDown(self):
        keras.config.set_dtype_policy("float32")
        super().tearDown()

    @parameterized.product(policy=["mixed_float16", "mixed_bfloat16"], gamma=[0.01, 1.0])
    def test_step_matches_loop_under_policy(self, policy, gamma):
        # gamma = 1 is comparable to the norms: a gamma applied to loss-scaled gradients
        # (256x larger) would change every factor, and the step, by far more than rtol.
        keras.config.set_dtype_policy(policy)
        keras.utils.set_random_seed(0)
        model = ac.make_private(testing_models.cnn())
        x, y = testing_models.data_for(model, 6)
        grads = reference.unit_gradients(model, x, y, LOSS)
        expected = reference.sgd_step(grads, len(x), gamma=gamma)
        model.compile(
            optimizer=ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0, gamma=gamma),
            loss=LOSS,
        )
        self.assertIsInstance(model.optimizer, ac.DPAutoSGD)  # not wrapped in a loss scaler
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch(x, y)
        # bfloat16 keeps 8 bits of mantissa: the vectorized (batched) kernels and the loop's
        # single-example kernels round differently, by up to ~3% measured; float16 agrees
        # to 1e-3.
        rtol = 1e-3 if policy == "mixed_float16" else 5e-2
        for b, v, want in zip(before, model.trainable_variables, expected, strict=True):
            self.assertEqual(v.dtype, "float32")
            self.assertAllClose(b - v.numpy(), want, rtol=rtol, atol=rtol * np.abs(want).max())

    def test_noise_is_float32(self):
        # Zero gradients: the update is pure noise; float16 noise would be quantized to
        # about 2^-11 relative steps, float32 noise has (almost) all distinct values.
        keras.config.set_dtype_policy("mixed_float16")
        model = ac.make_private(
            keras.Sequential([keras.Input((100,)), keras.layers.Dense(200, use_bias=False)])
        )
        model.compile(
            optimizer=ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=1.0, seed=0),
            loss=lambda y_true, y_pred: 0.0 * tf.reduce_sum(y_pred, axis=-1),
        )
        start = model.get_weights()[0]
        model.train_on_batch(np.ones((4, 100), "float32"), np.zeros((4, 200), "float32"))
        noise = (start - model.get_weights()[0]).ravel()
        self.assertAllClose(noise.std(), 1.0 / 4, rtol=6 / np.sqrt(2 * noise.size))
        noise32 = start.astype(np.float64) - model.get_weights()[0].astype(np.float64)
        self.assertGreater(len(np.unique(noise32)), 0.99 * noise32.size)

    def test_loss_scale_optimizer_refused(self):
        model = ac.make_private(testing_models.mlp())
        wrapped = keras.optimizers.LossScaleOptimizer(ac.DPAutoSGD(noise_multiplier=1.0))
        with self.assertRaisesRegex(ValueError, "not a LossScaleOptimizer"):
            model.compile(optimizer=wrapped, loss=LOSS)


if __name__ == "__main__":
    tf.test.main()

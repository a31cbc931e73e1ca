"""Microbatches are refused with Poisson-sampled batches.

``poisson_sample`` lists the sampled examples in index order, so adding one example shifts
every later one into another microbatch and moves many clipped microbatch means at once:
the sum then changes by far more than the 2S the microbatch noise is calibrated for.
"""

import keras
import tensorflow as tf

import tf_autoclip as ac
from tests import testing_models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def private_mlp(**optimizer_kwargs) -> keras.Model:
    model = ac.make_private(testing_models.mlp())
    model.compile(
        optimizer=ac.DPAutoSGD(learning_rate=0.1, noise_multiplier=1.0, **optimizer_kwargs),
        loss=LOSS,
    )
    return model


class MicrobatchPoissonTest(tf.test.TestCase):
    def test_fit_on_poisson_batches_with_microbatches_is_refused(self):
        model = private_mlp(num_microbatches=2, expected_batch_size=8)
        x, y = testing_models.data_for(model, 40)
        sampler = ac.poisson_sample(x, y, expected_batch_size=8, steps=2, seed=0)
        start = model.get_weights()
        with self.assertRaisesRegex(ValueError, "num_microbatches cannot be used with Poisson"):
            model.fit(sampler.dataset, epochs=1, verbose=0)
        for a, b in zip(start, model.get_weights(), strict=True):
            self.assertAllEqual(a, b)

    def test_fit_on_poisson_batches_with_accumulation_is_refused(self):
        # k Poisson batches summed under one noise draw are not a Poisson sample.
        model = private_mlp(gradient_accumulation_steps=2)
        x, y = testing_models.data_for(model, 40)
        sampler = ac.poisson_sample(x, y, expected_batch_size=8, steps=2, seed=0)
        with self.assertRaisesRegex(ValueError, "gradient_accumulation_steps cannot be used"):
            model.fit(sampler.dataset, epochs=1, verbose=0)

    def test_microbatches_refuse_batches_of_another_size(self):
        # Poisson batches of the user's own (variable size) are refused too.
        model = private_mlp(num_microbatches=2, expected_batch_size=8)
        x, y = testing_models.data_for(model, 10)
        model.train_on_batch(x[:6], y[:6])
        refused = (ValueError, tf.errors.InvalidArgumentError)  # at trace time, or at run time
        with self.assertRaisesRegex(refused, "different size than the first"):
            model.train_on_batch(x[:4], y[:4])


if __name__ == "__main__":
    tf.test.main()

"""Random small models from the supported layer set: each trains privately, or is refused.

For every generated model the private SGD step (sigma = 0, lr = 1, AUTO-S) must equal a
plain per-example loop (tests/reference.py); models with a layer that mixes examples
must be refused with a message. Nothing may crash the process.
"""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tests import reference

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
STEPS, FEATURES, BATCH = 5, 4, 4

# Sequence -> sequence layers (batch, STEPS, width) that keep per-example independence.
MENU = {
    "dense": lambda rng: keras.layers.Dense(int(rng.integers(2, 6)), activation="tanh"),
    "conv1d": lambda rng: keras.layers.Conv1D(
        int(rng.integers(2, 5)), int(rng.integers(1, 4)), padding="same",
        dilation_rate=int(rng.integers(1, 3)),
    ),
    "layer_norm": lambda rng: keras.layers.LayerNormalization(),
    "group_norm": lambda rng: keras.layers.GroupNormalization(groups=1),
    "dropout0": lambda rng: keras.layers.Dropout(0.0),
    "lstm": lambda rng: keras.layers.LSTM(int(rng.integers(2, 5)), return_sequences=True),
    "gru": lambda rng: keras.layers.GRU(int(rng.integers(2, 5)), return_sequences=True),
    "simple_rnn": lambda rng: keras.layers.SimpleRNN(3, return_sequences=True),
    "attention": lambda rng: "attention",
    "batch_norm": lambda rng: keras.layers.BatchNormalization(),
}  # fmt: skip


def random_model(seed):
    rng = np.random.default_rng(seed)
    names = list(rng.choice(list(MENU), size=int(rng.integers(1, 4)), replace=True))
    inputs = keras.Input((STEPS, FEATURES))
    h = inputs
    for name in names:
        layer = MENU[name](rng)
        h = keras.layers.MultiHeadAttention(2, 2)(h, h) if layer == "attention" else layer(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return names, keras.Model(inputs, keras.layers.Dense(3)(h))


class FuzzTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(range(16))
    def test_random_model(self, seed):
        keras.utils.set_random_seed(seed)
        names, model = random_model(seed)
        rng = np.random.default_rng(100 + seed)
        x = rng.normal(size=(BATCH, STEPS, FEATURES)).astype("float32")
        y = rng.integers(0, 3, size=BATCH)
        if "batch_norm" in names:
            with self.assertRaisesRegex(ValueError, "mixes examples"):
                ac.make_private(model)
            return
        expected = reference.sgd_step(reference.unit_gradients(model, x, y, LOSS), BATCH)
        model = ac.make_private(model)
        model.compile(optimizer=ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0), loss=LOSS)
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch(x, y)
        for b, v, want in zip(before, model.trainable_variables, expected, strict=True):
            self.assertAllClose(b - v.numpy(), want, rtol=1e-4, atol=1e-6, msg=str(names))


if __name__ == "__main__":
    tf.test.main()

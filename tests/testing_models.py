"""Small models shared by the tests: each trains in well under a second per step."""

from __future__ import annotations

import keras
import numpy as np

NUM_CLASSES = 3


def mlp() -> keras.Model:
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))


def cnn() -> keras.Model:
    inputs = keras.Input((10, 10, 1))
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="tanh")(inputs)
    h = keras.layers.MaxPool2D(2, 1)(h)
    h = keras.layers.Conv2D(4, 2, activation="tanh")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))


def embedding() -> keras.Model:
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(20, 4)(inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))


def lstm() -> keras.Model:
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(20, 4, mask_zero=True)(inputs)
    h = keras.layers.LSTM(5)(h)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))


def gru() -> keras.Model:
    inputs = keras.Input((4, 3))
    h = keras.layers.GRU(5)(inputs)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))


def transformer() -> keras.Model:
    """One block: Embedding + MultiHeadAttention + LayerNorm + Dense."""
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(20, 8)(inputs)
    h = keras.layers.LayerNormalization()(h + keras.layers.MultiHeadAttention(2, 4)(h, h))
    h = keras.layers.LayerNormalization()(h + keras.layers.Dense(8, activation="relu")(h))
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))


MODELS = {
    "mlp": mlp,
    "cnn": cnn,
    "embedding": embedding,
    "lstm": lstm,
    "gru": gru,
    "transformer": transformer,
}


def data_for(model: keras.Model, batch_size: int, seed: int = 0):
    """Random inputs matching the model's input spec, and labels."""
    rng = np.random.default_rng(seed)
    spec = model.inputs[0]
    shape = (batch_size, *spec.shape[1:])
    if "int" in str(spec.dtype):
        x = rng.integers(1, 20, size=shape).astype("int32")
        x[:, -1] = 0  # padding, so masking paths are exercised
    else:
        x = rng.normal(size=shape).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=(batch_size,)).astype("int32")
    return x, y

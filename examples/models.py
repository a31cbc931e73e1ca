"""Models shared by the examples and the benchmarks (no flags: importable anywhere)."""

from __future__ import annotations

import keras

# Tramèr & Boneh (2021), "Differentially Private Learning Needs Better Features": 4-layer CNN.
NUM_PARAMETERS = 26_010


def tramer_boneh_cnn(num_classes: int = 10) -> keras.Model:
    """The Tramèr & Boneh CNN (26,010 parameters for 28x28x1 inputs and 10 classes)."""
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(16, 8, strides=2, padding="same", activation="tanh"),
            layers.MaxPooling2D(2, strides=1),
            layers.Conv2D(32, 4, strides=2, padding="valid", activation="tanh"),
            layers.MaxPooling2D(2, strides=1),
            layers.Flatten(),
            layers.Dense(32, activation="tanh"),
            layers.Dense(num_classes),
        ],
        name="tramer_boneh_cnn",
    )
    if num_classes == 10 and model.count_params() != NUM_PARAMETERS:
        raise AssertionError(f"expected {NUM_PARAMETERS} parameters, got {model.count_params()}")
    return model

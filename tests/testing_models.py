"""Small models and data shared by the tests: each trains in well under a second per step.

The model builders used by more than one kind of check live here (``MODELS`` is the grid
of tests/per_example_test.py); a test keeps only builders specific to what it attacks or
measures (random fuzz models, cancelling-row probes, batch-mixing attacks). The
reference the models are checked against is tests/reference.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np

import tf_autoclip as ac

NUM_CLASSES = 3
L = keras.layers


def mlp(
    input_dim: int = 6,
    hidden: Sequence[tuple[int, str | None]] = ((8, "tanh"),),
    *,
    l2: float | None = None,
    sequential: bool = False,
) -> keras.Model:
    """Dense layers ``(units, activation)`` of ``hidden``, then a Dense logits layer.

    ``l2``: an L2 kernel regularizer on every layer. ``sequential``: a
    ``keras.Sequential`` instead of a functional model.
    """
    reg = None if l2 is None else keras.regularizers.L2(l2)
    sizes = [*hidden, (NUM_CLASSES, None)]
    if sequential:
        layers = [L.Dense(units, activation=act, kernel_regularizer=reg) for units, act in sizes]
        return keras.Sequential([keras.Input((input_dim,)), *layers])
    inputs = keras.Input((input_dim,))
    h = inputs
    for units, act in sizes:
        h = L.Dense(units, activation=act, kernel_regularizer=reg)(h)
    return keras.Model(inputs, h)


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


def small_cnn(l2: float | None = None) -> keras.Model:
    """Conv2D on 6x6 inputs and a Dense layer; ``l2`` regularizes both kernels."""
    reg = None if l2 is None else keras.regularizers.L2(l2)
    return keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            L.Conv2D(4, 3, activation="tanh", kernel_regularizer=reg),
            L.Flatten(),
            L.Dense(NUM_CLASSES, kernel_regularizer=reg),
        ]
    )


def mnist_cnn() -> keras.Model:
    """Tramer & Boneh's MNIST CNN, scaled down."""
    return keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            L.Conv2D(4, 4, strides=2, padding="same", activation="tanh"),
            L.MaxPool2D(2, 1),
            L.Conv2D(6, 3, strides=2, padding="valid", activation="tanh"),
            L.MaxPool2D(2, 1),
            L.Flatten(),
            L.Dense(8, activation="tanh"),
            L.Dense(NUM_CLASSES),
        ]
    )


def text_conv() -> keras.Model:
    inputs = keras.Input((12,), dtype="int32")
    h = L.Embedding(30, 8)(inputs)
    h = L.Conv1D(6, 3, activation="relu", padding="same")(h)
    h = L.GlobalMaxPooling1D()(h)
    return keras.Model(inputs, L.Dense(NUM_CLASSES)(h))


class Positions(keras.layers.Layer):
    """Position ids with a batch axis: ``[B, T]``. Acts on each example alone, which the
    library cannot know unless told (``ac.register_per_example_layer``)."""

    def call(self, tokens):
        shape = keras.ops.shape(tokens)
        return keras.ops.broadcast_to(keras.ops.arange(shape[1]), shape)


ac.register_per_example_layer(Positions)  # every model built here is then vouched


def pre_ln_transformer(blocks: int = 2, seq: int = 6, dim: int = 8) -> keras.Model:
    """Token + position embeddings (positions given per example), pre-LN blocks."""
    tokens = keras.Input((seq,), dtype="int32")
    positions = Positions()(tokens)
    h = L.Embedding(30, dim, mask_zero=True)(tokens) + L.Embedding(seq, dim)(positions)
    for _ in range(blocks):
        a = L.LayerNormalization()(h)
        h = h + L.MultiHeadAttention(2, dim // 2)(a, a)
        a = L.LayerNormalization()(h)
        h = h + L.Dense(dim)(L.Dense(2 * dim, activation="gelu")(a))
    h = L.GlobalAveragePooling1D()(L.LayerNormalization()(h))
    return keras.Model(tokens, L.Dense(NUM_CLASSES)(h))


def masked_sequence_labeler() -> keras.Model:
    """Per-token labels; padding (id 0) is masked out of each example's loss."""
    inputs = keras.Input((7,), dtype="int32")
    h = L.Embedding(30, 6, mask_zero=True)(inputs)
    h = L.Dense(8, activation="tanh")(h)
    h = L.LayerNormalization()(h)
    return keras.Model(inputs, L.Dense(NUM_CLASSES)(h))


def head(h, classes: int = NUM_CLASSES):
    """Logits on top of ``h``: flattened first if it has more than one feature axis."""
    if len(h.shape) > 2:
        h = L.Flatten()(h)
    return L.Dense(classes)(h)


def single_layer(
    input_shape, make_layer: Callable[[], keras.layers.Layer], dtype="float32",
    classes: int = NUM_CLASSES,
) -> keras.Model:  # fmt: skip
    """The layer ``make_layer()`` on inputs of ``input_shape``, then ``head``."""
    inputs = keras.Input(input_shape, dtype=dtype)
    return keras.Model(inputs, head(make_layer()(inputs), classes))


def data_for(
    model: keras.Model,
    batch_size: int,
    seed: int = 0,
    *,
    ids: tuple[int, int] = (1, 20),
    pad: int = 1,
    pad_first: int = 0,
    classes: int = NUM_CLASSES,
):
    """Random inputs matching the model's input spec, and labels.

    Integer inputs are ids in ``[ids[0], ids[1])``; the last ``pad`` positions of every
    example, and the last ``pad_first`` of the first, are 0 (padding, so masking paths
    are exercised). Float inputs are standard normal. Labels in ``[0, classes)``, one
    per output position of the first output (per example, or per token).
    """
    rng = np.random.default_rng(seed)
    spec = model.inputs[0]
    shape = (batch_size, *spec.shape[1:])
    if "int" in str(spec.dtype):
        x = rng.integers(*ids, size=shape).astype("int32")
        if pad:
            x[:, -pad:] = 0
        if pad_first:
            x[0, -pad_first:] = 0
    else:
        x = rng.normal(size=shape).astype("float32")
    label_shape = (batch_size, *model.outputs[0].shape[1:-1])
    y = rng.integers(0, classes, size=label_shape).astype("int32")
    return x, y

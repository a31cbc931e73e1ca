"""The rules for ``LayerNormalization``, ``GroupNormalization`` and ``RMSNormalization``:
per-example gradients are small (a vector per example)."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from tf_autoclip.rules.base import LayerRule, layer_rule
from tf_autoclip.rules.numerics import f32


def save_statistics(record, x: tf.Tensor, mean: tf.Tensor | None, inv: tf.Tensor) -> None:
    """Save the layer's input ``x`` as it is (the backward pass keeps it anyway) and its
    small float32 statistics, not ``x_hat``: a normalized float32 copy would stay alive
    from the forward pass to the norms, one activation-sized tensor per layer (W3: nine
    ``[32, 128, 256]``, 36 MB)."""
    record.save(x=tf.stop_gradient(x), inv=inv, **({} if mean is None else {"mean": mean}))


def normalized(record) -> tf.Tensor:
    """``x_hat = (x - mean) * inv`` (or ``x * inv``) from :func:`save_statistics`."""
    x = f32(record.saved["x"])
    if "mean" in record.saved:
        x = x - record.saved["mean"]
    return x * record.saved["inv"]


def _reduce_to(t: tf.Tensor, keep_axes: Sequence[int]) -> tf.Tensor:
    """Sum ``t`` over every axis except 0 and ``keep_axes``."""
    rank = len(t.shape)
    keep = {a % rank for a in keep_axes}
    axes = [a for a in range(1, rank) if a not in keep]
    return tf.reduce_sum(t, axes) if axes else t


@layer_rule(keras.layers.LayerNormalization)
class LayerNormalizationRule(LayerRule):
    """``y = x_hat * gamma + beta``: per-example ``sum x_hat * b`` and ``sum b``."""

    def unsupported_reason(self, layer):
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        if 0 in axes:
            return "normalization over the batch axis"
        return None

    def variables(self, layer):
        return [v for v in (layer.gamma, layer.beta) if v is not None]

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        outputs = call(inputs, *args, **kwargs)
        x = tf.stop_gradient(f32(inputs))
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        mean, variance = tf.nn.moments(x, axes=axes, keepdims=True)
        inv = tf.math.rsqrt(variance + layer.epsilon)
        save_statistics(record, inputs, None if layer.rms_scaling else mean, inv)
        return record.watch("outputs", outputs)

    def per_example_gradients(self, layer, record):
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        b = f32(record.grads["outputs"])
        grads = []
        if layer.gamma is not None:
            grads.append(_reduce_to(normalized(record) * b, axes))
        if layer.beta is not None:
            g = _reduce_to(b, axes)
            grads.append(tf.zeros_like(g) if layer.rms_scaling else g)
        return [tf.reshape(g, [-1, *v.shape]) for g, v in zip(grads, self.variables(layer))]


def into_groups(layer: keras.layers.GroupNormalization, x: tf.Tensor) -> tf.Tensor:
    """``x`` with its channel axis ``layer.axis`` split into ``[groups, channels // groups]``,
    as Keras 3.15's ``GroupNormalization`` groups channels before normalizing.

    >>> layer = keras.layers.GroupNormalization(groups=2)
    >>> tuple(into_groups(layer, tf.zeros([3, 5, 4])).shape)
    (3, 5, 2, 2)
    """
    dynamic = keras.ops.shape(x)
    shape = [-1] + [dynamic[i] if d is None else d for i, d in enumerate(x.shape) if i > 0]
    shape[layer.axis] = dynamic[layer.axis] // layer.groups
    shape.insert(layer.axis, layer.groups)
    return keras.ops.reshape(x, shape)


@layer_rule(keras.layers.GroupNormalization)
class GroupNormalizationRule(LayerRule):
    """Like LayerNormalization, with ``x_hat`` normalized per group of channels."""

    def variables(self, layer):
        return [v for v in (layer.gamma, layer.beta) if v is not None]

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        outputs = call(inputs, *args, **kwargs)
        x = tf.stop_gradient(f32(inputs))
        grouped = into_groups(layer, x)
        axes = list(range(1, len(grouped.shape)))
        axes.pop(-2 if layer.axis == -1 else layer.axis - 1)
        mean, variance = tf.nn.moments(grouped, axes=axes, keepdims=True)
        inv = tf.math.rsqrt(variance + layer.epsilon)
        save_statistics(record, into_groups(layer, inputs), mean, inv)
        return record.watch("outputs", outputs)

    def per_example_gradients(self, layer, record):
        b = f32(record.grads["outputs"])
        grads = []
        if layer.gamma is not None:
            x_hat = tf.reshape(normalized(record), tf.shape(b))
            grads.append(_reduce_to(x_hat * b, [layer.axis]))
        if layer.beta is not None:
            grads.append(_reduce_to(b, [layer.axis]))
        return grads


@layer_rule(getattr(keras.layers, "RMSNormalization", None))
class RMSNormalizationRule(LayerRule):
    """``y = x * rsqrt(mean(x^2) + eps) * scale``."""

    def variables(self, layer):
        return [layer.scale]

    def unsupported_reason(self, layer):
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        return "normalization over the batch axis" if 0 in axes else None

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        outputs = call(inputs, *args, **kwargs)
        x = tf.stop_gradient(f32(inputs))
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        rrms = tf.math.rsqrt(tf.reduce_mean(tf.square(x), axes, keepdims=True) + layer.epsilon)
        save_statistics(record, inputs, None, rrms)
        return record.watch("outputs", outputs)

    def per_example_gradients(self, layer, record):
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        g = _reduce_to(normalized(record) * f32(record.grads["outputs"]), axes)
        return [tf.reshape(g, [-1, *layer.scale.shape])]

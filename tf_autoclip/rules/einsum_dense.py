"""The rule for ``keras.layers.EinsumDense`` (and so ``MultiHeadAttention``'s
projections)."""

from __future__ import annotations

import string

import keras
import tensorflow as tf
from keras import ops

from tf_autoclip.rules.base import LayerRule, _not_quantized, layer_rule
from tf_autoclip.rules.numerics import _Linear, batch_rows, f32, squared_rows, weighted_sum


def _parse_einsum(equation: str, input_rank: int | None = None):
    """``(inputs, kernel, outputs)`` specs with ``...`` spelled out (uppercase letters)."""
    lhs, out = equation.replace(" ", "").split("->")
    ins, ker = lhs.split(",")
    if "..." in ins:
        n = 1 if input_rank is None else input_rank - (len(ins) - 3)
        fill = string.ascii_uppercase[:n]
        ins, out = ins.replace("...", fill), out.replace("...", fill)
    return ins, ker, out


def _einsum_or_reshape(equation: str, t: tf.Tensor) -> tf.Tensor:
    """A one-operand einsum, skipped when it changes nothing (no copy)."""
    src, dst = equation.split("->")
    return t if src == dst else tf.einsum(equation, t)


@layer_rule(keras.layers.EinsumDense)
class EinsumDenseRule(LayerRule):
    """``z = einsum(eq, a, W) + b``. The example index is the first input letter; the
    per-example kernel gradient is ``einsum(a, b -> example + kernel letters)``."""

    def unsupported_reason(self, layer):
        reason = _not_quantized(layer)
        if reason:
            return reason
        if "..." in layer.equation.split("->")[0].split(",")[1]:
            return "an ellipsis in the kernel spec"
        ins, ker, out = _parse_einsum(layer.equation)
        batch = ins[0]
        if batch in ker or batch not in out:
            return f"equation {layer.equation!r} does not keep the batch axis first"
        if any(ch not in ins and ch not in out for ch in ker):
            return f"equation {layer.equation!r} has kernel axes in neither input nor output"
        return None

    def variables(self, layer):
        return [v for v in (layer._kernel, layer.bias) if v is not None]

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        z = ops.einsum(layer.equation, inputs, layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        record.save(inputs=inputs)
        z = record.watch("outputs", z)
        return layer.activation(z) if layer.activation is not None else z

    def _specs(self, layer, record):
        return _parse_einsum(layer.equation, len(record.saved["inputs"].shape))

    def _kernel_per_example(self, layer, record):
        ins, ker, out = self._specs(layer, record)
        a, g = f32(record.saved["inputs"]), f32(record.grads["outputs"])
        return tf.einsum(f"{ins},{out}->{ins[0]}{ker}", a, g)

    def _bias_per_example(self, layer, record):
        if "bias" not in record.cache:
            ins, ker, out = self._specs(layer, record)
            chars = "".join(ch for ch in out if ch in layer.bias_axes)
            g = _einsum_or_reshape(f"{out}->{ins[0]}{chars}", f32(record.grads["outputs"]))
            record.cache["bias"] = tf.reshape(g, [-1, *layer.bias.shape])
        return record.cache["bias"]

    def _ghost_parts(self, layer, record):
        """``A [B,T,Dc]``, ``G [B,T,Do]`` and the kernel letters in their order, if the
        equation is a matrix product per example (no kernel letter in both input and
        output), else None."""
        ins, ker, out = self._specs(layer, record)
        b = ins[0]
        if any(ch in ins and ch in out for ch in ker):
            return None
        tok = "".join(ch for ch in ins if ch in out and ch not in ker and ch != b)
        con = "".join(ch for ch in ins if ch in ker)
        free = "".join(ch for ch in out if ch in ker)
        a = _einsum_or_reshape(f"{ins}->{b}{tok}{con}", f32(record.saved["inputs"]))
        g = _einsum_or_reshape(f"{out}->{b}{tok}{free}", f32(record.grads["outputs"]))
        return batch_rows(a, len(con)), batch_rows(g, len(free)), con + free

    def per_example_gradients(self, layer, record):
        grads = [self._kernel_per_example(layer, record)]
        if layer.bias is not None:
            grads.append(self._bias_per_example(layer, record))
        return grads

    def squared_norms(self, layer, record):
        parts = self._ghost_parts(layer, record)
        if parts is None:
            return super().squared_norms(layer, record)
        A, G, order = parts
        linear = _Linear(record, "kernel_per_example", A, G)
        record.cache["linear"] = (linear, order)
        norms = [linear.sq_norm()]
        if layer.bias is not None:
            norms.append(squared_rows(self._bias_per_example(layer, record)))
        return norms

    def clipped_sum(self, layer, record, factors):
        if "linear" not in record.cache:
            return super().clipped_sum(layer, record, factors)
        linear, order = record.cache["linear"]
        _, ker, _ = self._specs(layer, record)
        size = dict(zip(ker, layer.kernel.shape, strict=True))
        kernel = tf.reshape(linear.clipped_sum(factors[0]), [size[ch] for ch in order])
        kernel = tf.transpose(kernel, [order.index(ch) for ch in ker])
        sums = [kernel]
        if layer.bias is not None:
            bias = self._bias_per_example(layer, record)
            sums.append(weighted_sum(bias, factors[1], record.all_finite))
        return sums

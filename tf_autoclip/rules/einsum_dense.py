"""The rule for ``keras.layers.EinsumDense`` (and so ``MultiHeadAttention``'s
projections)."""

from __future__ import annotations

import string

import keras
import tensorflow as tf
from keras import ops

from tf_autoclip.rules.base import layer_rule
from tf_autoclip.rules.dense import LinearRule, lora_scale
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


class _EinsumKernel:
    """Per-example gradients of a kernel used as ``einsum(ins,ker->out)`` on inputs ``a``
    with output gradients ``g``: ``einsum(a, g -> example + kernel letters)``. Ghost or
    explicit norms of that linear map when the equation is a matrix product per example
    (no kernel letter in both input and output); else the explicit tensor."""

    def __init__(self, record, key: str, spec: tuple[str, str, str], a, g, shape) -> None:
        self.record, self.key, self.spec = record, key, spec
        self.a, self.g, self.shape = a, g, list(shape)
        self.linear: _Linear | None = None
        self.order = ""

    def per_example(self) -> tf.Tensor:
        if self.key not in self.record.cache:
            ins, ker, out = self.spec
            self.record.cache[self.key] = tf.einsum(f"{ins},{out}->{ins[0]}{ker}", self.a, self.g)
        return self.record.cache[self.key]

    def sq_norm(self) -> tf.Tensor:
        ins, ker, out = self.spec
        b = ins[0]
        if any(ch in ins and ch in out for ch in ker):
            return squared_rows(self.per_example())
        tok = "".join(ch for ch in ins if ch in out and ch not in ker and ch != b)
        con = "".join(ch for ch in ins if ch in ker)
        free = "".join(ch for ch in out if ch in ker)
        A = _einsum_or_reshape(f"{ins}->{b}{tok}{con}", self.a)
        G = _einsum_or_reshape(f"{out}->{b}{tok}{free}", self.g)
        self.linear = _Linear(self.record, self.key + "_linear", batch_rows(A, len(con)),
                              batch_rows(G, len(free)))  # fmt: skip
        self.order = con + free
        return self.linear.sq_norm()

    def clipped_sum(self, c: tf.Tensor) -> tf.Tensor:
        if self.linear is None:
            return weighted_sum(self.per_example(), c, self.record.all_finite)
        ker = self.spec[1]
        size = dict(zip(ker, self.shape, strict=True))
        kernel = tf.reshape(self.linear.clipped_sum(c), [size[ch] for ch in self.order])
        return tf.transpose(kernel, [self.order.index(ch) for ch in ker])


def _lora_kernels(layer, record, spec, a, g) -> list[_EinsumKernel]:
    """The LoRA factors of ``W + s * einsum(A[ker[:-1] r], B[r e])``, ``e = ker[-1]`` an
    output letter, as kernels of two einsums of their own: ``A`` maps ``a`` to
    ``s * g B^T`` (``e`` replaced by ``r`` in the output), ``B`` maps ``s * a A`` (the
    contracted letters replaced by ``r``) to ``g``."""
    ins, ker, out = spec
    e, pre = ker[-1], ker[:-1]
    r = next(ch for ch in string.ascii_lowercase if ch not in ins + ker + out)
    s = lora_scale(layer)
    lora_a, lora_b = f32(layer.lora_kernel_a), f32(layer.lora_kernel_b)
    out_r = out.replace(e, r)
    g_r = s * tf.einsum(f"{out},{r}{e}->{out_r}", g, lora_b)
    ins_r = "".join(ch for ch in ins if ch not in pre) + "".join(ch for ch in pre if ch not in ins)
    a_r = s * tf.einsum(f"{ins},{pre}{r}->{ins_r}{r}", a, lora_a)
    return [
        _EinsumKernel(record, "lora_a", (ins, pre + r, out_r), a, g_r, lora_a.shape),
        _EinsumKernel(record, "lora_b", (ins_r + r, r + e, out), a_r, g, lora_b.shape),
    ]


@layer_rule(keras.layers.EinsumDense)
class EinsumDenseRule(LinearRule):
    """``z = einsum(eq, a, W) + b``. The example index is the first input letter; the
    per-example kernel gradient is ``einsum(a, b -> example + kernel letters)``. Under
    ``enable_lora(r)`` the variables are the two LoRA factors (see ``_lora_kernels``)."""

    def unsupported_reason(self, layer):
        reason = super().unsupported_reason(layer)
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
        if layer.lora_enabled and (ker[-1] in ins or ker[-1] not in out):
            return (
                f"LoRA on equation {layer.equation!r}: its last kernel axis is not an output axis"
            )
        return None

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        z = ops.einsum(layer.equation, inputs, layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        record.save(inputs=inputs)
        z = record.watch("outputs", z)
        return layer.activation(z) if layer.activation is not None else z

    def _specs(self, layer, record):
        return _parse_einsum(layer.equation, len(record.saved["inputs"].shape))

    def _kernels(self, layer, record) -> list[_EinsumKernel]:
        if "kernels" not in record.cache:
            spec = self._specs(layer, record)
            a, g = f32(record.saved["inputs"]), f32(record.grads["outputs"])
            if layer.lora_enabled:
                kernels = _lora_kernels(layer, record, spec, a, g)
            else:
                kernels = [_EinsumKernel(record, "kernel", spec, a, g, layer.kernel.shape)]
            record.cache["kernels"] = kernels
        return record.cache["kernels"]

    def _bias_per_example(self, layer, record):
        if "bias" not in record.cache:
            ins, ker, out = self._specs(layer, record)
            chars = "".join(ch for ch in out if ch in layer.bias_axes)
            g = _einsum_or_reshape(f"{out}->{ins[0]}{chars}", f32(record.grads["outputs"]))
            record.cache["bias"] = tf.reshape(g, [-1, *layer.bias.shape])
        return record.cache["bias"]

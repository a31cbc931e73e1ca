"""The rules for linear layers: the shared ``LinearRule`` (kernel or LoRA factors, bias) and
the rule for ``keras.layers.Dense``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from tf_autoclip import _keras_compat
from tf_autoclip.rules.base import LayerRule, Record, _not_quantized, layer_rule
from tf_autoclip.rules.numerics import (
    _Linear,
    batch_rows,
    f32,
    squared_rows,
    weighted_sum,
)


def _concat_rows(records: Sequence[Record], saved_key: str, grad_key: str, last: int = 1):
    """Merge calls of a layer whose per-example gradient sums over rows: concatenate the
    rows of every call (``[B, T_call, ...]``) along T."""
    merged = Record(records[0].layer, records[0].rule, lambda t: None)
    merged.saved[saved_key] = tf.concat(
        [batch_rows(r.saved[saved_key], last) for r in records], axis=1
    )
    merged.grads[grad_key] = tf.concat([batch_rows(r.grads[grad_key], 1) for r in records], 1)
    return merged


def lora_scale(layer) -> float:
    """The factor ``s`` of Keras' LoRA kernel ``W + s * lora_kernel_a @ lora_kernel_b``."""
    return layer.lora_alpha / layer.lora_rank


class LinearRule(LayerRule):
    """Shared by the Dense and EinsumDense rules: variables are the kernel (or, under
    ``enable_lora(r)``, its two LoRA factors) and an optional bias. Subclasses give
    ``_kernels(layer, record)``, one object per kernel variable with ``per_example()``,
    ``sq_norm()`` and ``clipped_sum(c)``, and ``_bias_per_example(layer, record)``."""

    def unsupported_reason(self, layer):
        return _not_quantized(layer, lora=True)

    def variables(self, layer):
        if layer.lora_enabled:
            kernels = [layer.lora_kernel_a, layer.lora_kernel_b]
        else:
            kernels = [_keras_compat.kernel_variable(layer)]
        return [*kernels, *([layer.bias] if layer.bias is not None else [])]

    def _kernels(self, layer, record) -> list[Any]:
        raise NotImplementedError

    def _bias_per_example(self, layer, record) -> tf.Tensor:
        raise NotImplementedError

    def per_example_gradients(self, layer, record):
        grads = [k.per_example() for k in self._kernels(layer, record)]
        if layer.bias is not None:
            grads.append(self._bias_per_example(layer, record))
        return grads

    def squared_norms(self, layer, record):
        norms = [k.sq_norm() for k in self._kernels(layer, record)]
        if layer.bias is not None:
            norms.append(squared_rows(self._bias_per_example(layer, record)))
        return norms

    def clipped_sum(self, layer, record, factors):
        kernels = self._kernels(layer, record)
        sums = [k.clipped_sum(c) for k, c in zip(kernels, factors, strict=False)]
        if layer.bias is not None:
            bias = self._bias_per_example(layer, record)
            sums.append(weighted_sum(bias, factors[len(kernels)], record.all_finite))
        return sums


@layer_rule(keras.layers.Dense)
class DenseRule(LinearRule):
    """``z = a W + b`` on ``a [B, ..., D]``; rows are all positions of an example.

    With ``enable_lora(r)`` the kernel is ``W + s A B`` with ``W`` frozen: the rule's
    variables are ``A [D, r]`` and ``B [r, P]``, whose per-example gradients are again
    linear maps of the rows, ``a^T (s b B^T)`` and ``(s a A)^T b`` (``b = dL/dz``), so
    they get ghost or explicit norms like a kernel without ever forming ``[D, P]``.
    """

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        z = ops.matmul(inputs, layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        record.save(inputs=inputs)
        z = record.watch("outputs", z)
        return layer.activation(z) if layer.activation is not None else z

    def _kernels(self, layer, record) -> list[_Linear]:
        """One linear form per kernel variable: ``[W]``, or ``[A, B]`` under LoRA."""
        if "linear" not in record.cache:
            A = f32(batch_rows(record.saved["inputs"]))
            G = f32(batch_rows(record.grads["outputs"]))
            if not layer.lora_enabled:
                record.cache["linear"] = [_Linear(record, "kernel_per_example", A, G)]
            else:
                s = lora_scale(layer)
                lora_a, lora_b = f32(layer.lora_kernel_a), f32(layer.lora_kernel_b)
                record.cache["linear"] = [
                    _Linear(
                        record, "lora_a_per_example", A, s * tf.einsum("btp,rp->btr", G, lora_b)
                    ),
                    _Linear(
                        record, "lora_b_per_example", s * tf.einsum("btd,dr->btr", A, lora_a), G
                    ),
                ]
        return record.cache["linear"]

    def _bias_per_example(self, layer, record):
        if "bias" not in record.cache:
            G = self._kernels(layer, record)[-1].G  # dL/dz in every case
            record.cache["bias"] = tf.reduce_sum(G, 1)
        return record.cache["bias"]

    def merge(self, layer, records):
        return _concat_rows(records, "inputs", "outputs")

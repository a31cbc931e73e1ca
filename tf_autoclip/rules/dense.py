"""The rule for ``keras.layers.Dense``."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf
from keras import ops

from tf_autoclip.rules.base import LayerRule, Record, _not_quantized, layer_rule
from tf_autoclip.rules.numerics import (
    _Linear,
    batch_rows,
    f32,
    linear_per_example,
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


@layer_rule(keras.layers.Dense)
class DenseRule(LayerRule):
    """``z = a W + b`` on ``a [B, ..., D]``; rows are all positions of an example."""

    def unsupported_reason(self, layer):
        return _not_quantized(layer)

    def variables(self, layer):
        return [v for v in (layer._kernel, layer.bias) if v is not None]

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        z = ops.matmul(inputs, layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        record.save(inputs=inputs)
        z = record.watch("outputs", z)
        return layer.activation(z) if layer.activation is not None else z

    def _parts(self, record):
        if "linear" not in record.cache:
            A = f32(batch_rows(record.saved["inputs"]))
            G = f32(batch_rows(record.grads["outputs"]))
            record.cache["linear"] = _Linear(record, "kernel_per_example", A, G)
        return record.cache["linear"]

    def per_example_gradients(self, layer, record):
        parts = self._parts(record)
        grads = [linear_per_example(parts.A, parts.G)]
        if layer.bias is not None:
            grads.append(self._bias_per_example(record))
        return grads

    def _bias_per_example(self, record):
        if "bias" not in record.cache:
            record.cache["bias"] = tf.reduce_sum(self._parts(record).G, 1)
        return record.cache["bias"]

    def squared_norms(self, layer, record):
        norms = [self._parts(record).sq_norm()]
        if layer.bias is not None:
            norms.append(squared_rows(self._bias_per_example(record)))
        return norms

    def clipped_sum(self, layer, record, factors):
        sums = [self._parts(record).clipped_sum(factors[0])]
        if layer.bias is not None:
            sums.append(weighted_sum(self._bias_per_example(record), factors[1], record.all_finite))
        return sums

    def merge(self, layer, records):
        return _concat_rows(records, "inputs", "outputs")

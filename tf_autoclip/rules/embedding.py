"""The rule for ``keras.layers.Embedding``."""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_autoclip import _keras_compat
from tf_autoclip.rules.base import LayerRule, Record, _not_quantized, layer_rule
from tf_autoclip.rules.numerics import _gram_bound64, batch_rows, f32, scale_rows, to_f32_up


@layer_rule(keras.layers.Embedding)
class EmbeddingRule(LayerRule):
    """``z[i, t] = E[ids[i, t]]``. Norms: ``sum_{t,s} [id_t = id_s] <b_t, b_s>`` (never a
    dense vocab x dim tensor per example); clipped sum: a segment sum over the ids."""

    def unsupported_reason(self, layer):
        return _not_quantized(layer)

    def variables(self, layer):
        return [_keras_compat.embeddings_variable(layer)]

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        outputs = call(inputs, *args, **kwargs)
        ids = inputs if inputs.dtype in (tf.int32, tf.int64) else tf.cast(inputs, tf.int32)
        record.save(ids=ids)
        return record.watch("outputs", outputs)

    def _rows(self, record):
        ids = record.saved["ids"]
        ids = tf.reshape(ids, [tf.shape(ids)[0], -1])
        G = f32(batch_rows(record.grads["outputs"]))
        return ids, G

    def squared_norms(self, layer, record):
        # The ghost form with a_t one-hot: a_t.a_s is the same-id indicator (exact) and
        # |a_t| = 1, so U = (sum_t |g_t|)^2; the segment sum is a float32 sum over rows.
        ids, G = self._rows(record)
        same = tf.cast(tf.equal(ids[:, :, None], ids[:, None, :]), tf.float64)
        ones = tf.ones(tf.shape(ids), tf.float64)
        return [to_f32_up(_gram_bound64(same, ones, G, G.shape[-1]))]

    def clipped_sum(self, layer, record, factors):
        ids, G = self._rows(record)
        rows = tf.reshape(scale_rows(G, factors[0], record.all_finite), [-1, G.shape[-1]])
        return [
            tf.math.unsorted_segment_sum(rows, tf.reshape(ids, [-1]), layer.input_dim),
        ]

    def per_example_gradients(self, layer, record):
        ids, G = self._rows(record)
        onehot = tf.one_hot(ids, layer.input_dim, dtype=tf.float32)
        return [tf.matmul(onehot, G, transpose_a=True)]

    def merge(self, layer, records):
        merged = Record(layer, self, lambda t: None)
        merged.saved["ids"] = tf.concat(
            [tf.reshape(r.saved["ids"], [tf.shape(r.saved["ids"])[0], -1]) for r in records], 1
        )
        merged.grads["outputs"] = tf.concat([batch_rows(r.grads["outputs"]) for r in records], 1)
        return merged

"""Layer rules for KerasHub models (``keras_hub``, optional).

KerasHub's task models are functional models of KerasHub layers. The fast engine
(``"bk"``) needs a rule for every layer that owns a trainable variable directly; this
module has them for the layers the text classifiers (BERT, RoBERTa, DistilBERT, ALBERT),
the causal LMs (GPT-2, Gemma, Llama/Llama 3) and the ViT image classifier are made of:
``keras.layers.ReversibleEmbedding`` (a Keras layer; the token embedding of every
KerasHub text model, tied: ONE per-example gradient from its lookups and its reverse
projection to the logits), ``PositionEmbedding``, KerasHub's and Gemma's
``RMSNormalization``, ``LlamaLayerNorm`` and ``ViTPatchingAndEmbedding`` (its class
token).

The KerasHub rules apply only to the reviewed source of their class (``_reviewed``), and
the layers whose variables all live in ruled Keras sublayers (transformer blocks,
attention, rotary embeddings) are vouched for: both in
:mod:`~tf_autoclip.rules.kerashub_vouching`, which registers them when ``keras_hub`` is
imported. ``keras_hub`` is never imported by these modules.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from tf_autoclip import _keras_compat
from tf_autoclip.rules.base import (
    LayerRule,
    Record,
    _not_quantized,
    layer_rule,
)
from tf_autoclip.rules.embedding import EmbeddingRule

# Imported by tf_autoclip/__init__ after the rules package and layer_safety have loaded.
from tf_autoclip.rules.kerashub_vouching import _reviewed, install, register
from tf_autoclip.rules.normalization import normalized, save_statistics
from tf_autoclip.rules.numerics import (
    _dim,
    _f64,
    _ghost_kappa,
    _gram_bound64,
    _Linear,
    _triangle_sq,
    batch_rows,
    f32,
    keep_per_example,
    linear_clipped_sum,
    norm_bound_sq,
    scale_rows,
    squared_rows,
    squared_rows_up64,
    to_f32_up,
    use_ghost,
    weighted_sum,
)

# ---------------------------------------------------------------------------
# keras.layers.ReversibleEmbedding (Keras itself; KerasHub re-exports it).


# Vocabulary columns of the logit gradients cast to float64 at a time (tied norms).
_VOCAB_CHUNK = 8192


class _Tied:
    """The tied gradient of one record, ``sum_t e(id_t) b_t^T + sum_s g_s h_s^T``
    (``[V, D]`` per example), without one-hot rows.

    It is the linear map of the rows ``A = [e(ids); g]``, ``G = [b; h]`` that the Dense
    rule would see, and its norms follow the same conventions (``_Linear``: ghost norm
    in float64 with :func:`_gram_bound64`, or the explicit per-example gradient, chosen
    by :func:`use_ghost` on ``T + S`` rows of widths ``V`` and ``D``). Only the Gram
    matrix of ``A`` is needed, and its blocks are known without forming ``e(id_t)``:
    ``e(id_t).e(id_u) = [id_t = id_u]``, ``e(id_t).g_s = g_s[id_t]`` (a gather: the cross
    term ``2 <E_i, R_i> = 2 sum_{t,s} g_s[id_t] (b_t.h_s)``), and ``g_s.g_r``; the row
    norms are 1 and ``|g_s|``. All exact or float64 as in ``_gram_bound64``, so the bound
    is the one of the concatenated rows. The clipped sum is the Embedding rule's segment
    sum of the scaled ``b_t`` plus the reverse projection's ``sum_i c_i g_i^T h_i`` (one
    matmul); the explicit gradient scatters the ``b_t`` into ``g^T h``.
    """

    def __init__(self, record, vocab: int, ids, B, H, Gr) -> None:
        self.record, self.vocab = record, vocab
        self.ids, self.B, self.H, self.Gr = ids, B, H, Gr  # [N,T] [N,T,D] [N,S,D] [N,S,V]
        self.explicit = None  # the per-example gradient when the norm formed it

    def _rows(self):
        return _dim(self.B, 1) + _dim(self.H, 1)

    def _a_norms(self, reverse_sq: tf.Tensor | None = None) -> tf.Tensor:
        """Row norms of ``A``: 1 for a lookup, ``|g_s|`` (float64) for a reverse row;
        ``reverse_sq``: the ``|g_s|^2`` if known (the Gram diagonal)."""
        if reverse_sq is None:
            reverse_sq = self._chunked(lambda g: tf.reduce_sum(tf.square(g), -1))
        return tf.concat([tf.ones(tf.shape(self.ids), tf.float64), tf.sqrt(reverse_sq)], 1)

    def _chunked(self, fn) -> tf.Tensor:
        """``sum_k fn(float64(Gr[..., chunk k]))`` over vocabulary chunks, one after the
        other: the float64 copy of the ``[N, S, V]`` logit gradients is never whole.
        Float64 sums over the vocabulary in another order, the rounding bounds of
        ``numerics`` (``gamma_V`` per entry) hold as for one product."""
        total, done = None, []
        for start in range(0, self.vocab, _VOCAB_CHUNK):
            with tf.control_dependencies(done):
                part = fn(_f64(self.Gr[:, :, start : start + _VOCAB_CHUNK]))
            total = part if total is None else total + part
            done = [total]
        return total

    def _out_rows(self) -> tf.Tensor:
        return tf.concat([self.B, self.H], 1)

    def _width(self) -> int:
        return self.vocab + self.B.shape[-1]

    def _ghost_sq64(self) -> tf.Tensor:
        ids, Gr = self.ids, self.Gr
        same = tf.cast(tf.equal(ids[:, :, None], ids[:, None, :]), tf.float64)  # [N,T,T]
        cross = _f64(tf.gather(Gr, ids, axis=2, batch_dims=1))  # [N,S,T]: g_s[id_t]
        reverse = self._chunked(lambda g: tf.matmul(g, g, transpose_b=True))  # [N,S,S]
        aa = tf.concat(
            [
                tf.concat([same, tf.transpose(cross, [0, 2, 1])], 2),
                tf.concat([cross, reverse], 2),
            ],
            1,
        )
        a_norms = self._a_norms(tf.linalg.diag_part(reverse))
        return _gram_bound64(aa, a_norms, self._out_rows(), self._width())

    def per_example(self) -> tf.Tensor:
        """``[N, V, D]``: ``g^T h`` with each ``b_t`` added at row ``id_t``."""
        if self.explicit is not None:
            return self.explicit
        ids, B = self.ids, self.B
        table = tf.matmul(self.Gr, self.H, transpose_a=True)
        n = tf.broadcast_to(tf.range(tf.shape(ids)[0], dtype=ids.dtype)[:, None], tf.shape(ids))
        index = tf.stack([n, ids], -1)  # [N, T, 2]
        return tf.tensor_scatter_nd_add(table, index, B)

    def _explicit_sq64(self, per_example: tf.Tensor) -> tf.Tensor:
        """As ``numerics._explicit_sq64`` (the explicit gradient is not the tensor the
        clipped sum adds: ``products=2``), with the row norms of ``A`` known."""
        rows = self._rows()
        sq = squared_rows_up64(per_example)  # at least the float32 tensor's
        kappa = _ghost_kappa(rows, self.vocab * self.B.shape[-1])
        U = _triangle_sq(self._a_norms(), self._out_rows())
        return norm_bound_sq(sq, U, rows, kappa, products=2)

    def sq_norm(self) -> tf.Tensor:
        ghost = use_ghost(self._rows(), self.vocab, self.B.shape[-1])
        if isinstance(ghost, bool):
            if ghost:
                return to_f32_up(self._ghost_sq64())
            if not keep_per_example():
                # The clipped sum (the segment sum plus matmul below) is not this
                # tensor: the bound of an explicit gradient that is not the clipped sum's.
                return to_f32_up(self._explicit_sq64(self.per_example()))
            self.explicit = self.per_example()
            return squared_rows(self.explicit)
        # Either way the clipped sum is the segment sum plus matmul, not a cached tensor.
        return to_f32_up(
            tf.cond(ghost, self._ghost_sq64, lambda: self._explicit_sq64(self.per_example()))
        )

    def clipped_sum(self, c: tf.Tensor) -> tf.Tensor:
        finite = self.record.all_finite
        if self.explicit is not None:
            return weighted_sum(self.explicit, c, finite)
        D = self.B.shape[-1]
        rows = tf.reshape(scale_rows(self.B, c, finite), [-1, D])
        lookup = tf.math.unsorted_segment_sum(rows, tf.reshape(self.ids, [-1]), self.vocab)
        return lookup + linear_clipped_sum(self.Gr, self.H, c, finite)


@layer_rule(getattr(keras.layers, "ReversibleEmbedding", None))
class ReversibleEmbeddingRule(EmbeddingRule):
    """``z = E[ids]`` (lookup) and ``logits = h E^T`` (``reverse=True``, tied weights) or
    ``h R`` (untied). With tied weights an example's gradient of ``E`` adds both uses:

        sum_t onehot(id_t) b_t^T  +  sum_s g_s h_s^T      ([V, D])

    with ``b_t = dL/dz_t`` and ``g_s = dL/dlogits_s``: one linear map over the rows of
    both calls (``A = [onehot(ids); g]``, ``G = [b; h]``), whose norm (ghost or
    explicit, as for Dense) and clipped sum come from :class:`_Tied` without ever
    forming a one-hot row (``[N, T, V]``): the lookups enter through the same-id
    indicator, a gather ``g_s[id_t]`` and a segment sum. A layer used only for lookups
    (a text classifier) keeps the Embedding rule's segment-sum form. Untied: ``R``'s
    gradient is ``h^T g``, a Dense kernel's.
    """

    def unsupported_reason(self, layer):
        return _not_quantized(layer)

    def variables(self, layer):
        if layer.tie_weights:
            return [_keras_compat.embeddings_variable(layer)]
        return [_keras_compat.embeddings_variable(layer), layer.reverse_embeddings]

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        reverse = kwargs.pop("reverse", args[0] if args else False)
        if not reverse:
            return super().forward(layer, record, call, inputs, **kwargs)
        kernel = ops.transpose(layer.embeddings) if layer.tie_weights else layer.reverse_embeddings
        if layer.reverse_dtype is not None:
            inputs = ops.cast(inputs, layer.reverse_dtype)
            kernel = ops.cast(kernel, layer.reverse_dtype)
        record.save(h=inputs)
        logits = record.watch("logits", ops.matmul(inputs, kernel))
        if layer.logit_soft_cap is not None:
            cap = layer.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    # Rows of one record (one call, or calls merged by ``merge``): lookups under
    # saved["ids"] / grads["outputs"], reverse projections under saved["h"] / grads["logits"].

    def _lookup_rows(self, layer, record):
        if "ids" not in record.saved:
            return None
        ids, B = self._rows(record)  # [N, T], [N, T, D]
        return ids, B

    def _reverse_rows(self, record):
        if "h" not in record.saved:
            return None
        H = f32(batch_rows(record.saved["h"]))  # [N, S, D]
        G = f32(batch_rows(record.grads["logits"]))  # [N, S, V]
        return H, G

    def _tied(self, layer, record) -> _Tied | None:
        """The tied gradient over lookup and reverse rows, or None when the layer is
        only used for lookups (then the Embedding rule's form)."""
        if "tied" in record.cache:
            return record.cache["tied"]
        reverse = self._reverse_rows(record)
        tied = None
        if reverse is not None:
            H, Gr = reverse
            lookup = self._lookup_rows(layer, record)
            if lookup is None:  # reverse projections only: no lookup rows
                ids = tf.zeros([tf.shape(H)[0], 0], tf.int32)
                B = tf.zeros([tf.shape(H)[0], 0, layer.output_dim], tf.float32)
            else:
                ids, B = lookup
            tied = _Tied(record, layer.input_dim, ids, B, H, Gr)
        record.cache["tied"] = tied
        return tied

    def _untied(self, record) -> _Linear | None:
        if "untied" not in record.cache:
            reverse = self._reverse_rows(record)
            record.cache["untied"] = (
                None if reverse is None else _Linear(record, "reverse_per_example", *reverse)
            )
        return record.cache["untied"]

    def _zero_norms(self, record):
        for value in (*record.saved.values(), *record.grads.values()):
            return tf.zeros([tf.shape(value)[0]], tf.float32)
        raise ValueError("empty record")

    def squared_norms(self, layer, record):
        if layer.tie_weights:
            linear = self._tied(layer, record)
            if linear is None:
                return super().squared_norms(layer, record)
            return [linear.sq_norm()]
        norms = [
            super().squared_norms(layer, record)[0]
            if "ids" in record.saved
            else self._zero_norms(record)
        ]
        untied = self._untied(record)
        norms.append(untied.sq_norm() if untied is not None else self._zero_norms(record))
        return norms

    def clipped_sum(self, layer, record, factors):
        if layer.tie_weights:
            linear = self._tied(layer, record)
            if linear is None:
                return super().clipped_sum(layer, record, factors)
            return [linear.clipped_sum(factors[0])]
        sums = [
            super().clipped_sum(layer, record, factors[:1])[0]
            if "ids" in record.saved
            else tf.zeros(_keras_compat.embeddings_variable(layer).shape, tf.float32)
        ]
        untied = self._untied(record)
        sums.append(
            untied.clipped_sum(factors[1])
            if untied is not None
            else tf.zeros(layer.reverse_embeddings.shape, tf.float32)
        )
        return sums

    def per_example_gradients(self, layer, record):
        if layer.tie_weights:
            tied = self._tied(layer, record)
            if tied is None:
                return super().per_example_gradients(layer, record)
            return [tied.per_example()]
        n = tf.shape(self._zero_norms(record))[0]
        if "ids" in record.saved:
            grads = super().per_example_gradients(layer, record)
        else:
            grads = [tf.zeros([n, layer.input_dim, layer.output_dim], tf.float32)]
        untied = self._untied(record)
        if untied is None:
            grads.append(tf.zeros([n, *layer.reverse_embeddings.shape], tf.float32))
        else:
            grads.append(untied.per_example())
        return grads

    def merge(self, layer, records):
        merged = Record(layer, self, lambda t: None)
        lookups = [r for r in records if "ids" in r.saved]
        reverses = [r for r in records if "h" in r.saved]
        if lookups:
            merged.saved["ids"] = tf.concat(
                [tf.reshape(r.saved["ids"], [tf.shape(r.saved["ids"])[0], -1]) for r in lookups],
                1,
            )
            merged.grads["outputs"] = tf.concat(
                [batch_rows(r.grads["outputs"]) for r in lookups], 1
            )
        if reverses:
            merged.saved["h"] = tf.concat([batch_rows(r.saved["h"]) for r in reverses], 1)
            merged.grads["logits"] = tf.concat([batch_rows(r.grads["logits"]) for r in reverses], 1)
        return merged


# ---------------------------------------------------------------------------
# KerasHub layers that own variables.


class PositionEmbeddingRule(LayerRule):
    """KerasHub ``PositionEmbedding``: ``z[i] = P[start : start + T]`` broadcast to the
    batch; example ``i``'s gradient is its output gradient placed at those rows of
    ``P`` (an ``[L, D]`` tensor per example, as small as the layer's weights)."""

    def unsupported_reason(self, layer):
        return _reviewed(layer)

    def variables(self, layer):
        return [layer.position_embeddings]

    def forward(self, layer, record, call, inputs, start_index=0, positions=None):
        if positions is not None:  # vLLM serving only; refused, so the probe falls back
            raise NotImplementedError("PositionEmbedding(positions=...) has no rule")
        outputs = call(inputs, start_index=start_index)
        record.cache["start"] = start_index
        return record.watch("outputs", outputs)

    def per_example_gradients(self, layer, record):
        b = f32(record.grads["outputs"])  # [N, T, D]
        length = layer.sequence_length
        start = tf.cast(record.cache["start"], tf.int32)
        after = length - start - tf.shape(b)[1]
        return [tf.pad(b, [[0, 0], [start, after], [0, 0]])]


class ScaleNormRule(LayerRule):
    """RMS norms over the last axis, ``y = x_hat * (offset + scale)``: per-example
    gradient ``sum over positions of x_hat * b``. ``x_hat`` follows each class's call
    (KerasHub's ``RMSNormalization``: eps 1e-6; Gemma's: ``layer.epsilon``, offset 1;
    ``LlamaLayerNorm``: ``layer.epsilon``)."""

    def __init__(self, epsilon=None) -> None:
        self.epsilon = epsilon

    def unsupported_reason(self, layer):
        return _reviewed(layer)

    def variables(self, layer):
        return [layer.scale]

    def forward(self, layer, record, call, inputs):
        outputs = call(inputs)
        x = tf.stop_gradient(f32(inputs))
        eps = self.epsilon if self.epsilon is not None else layer.epsilon
        rrms = tf.math.rsqrt(tf.reduce_mean(tf.square(x), -1, keepdims=True) + eps)
        save_statistics(record, inputs, None, rrms)
        return record.watch("outputs", outputs)

    def per_example_gradients(self, layer, record):
        g = normalized(record) * f32(record.grads["outputs"])
        g = tf.reduce_sum(batch_rows(g), 1)  # [N, D]
        return [tf.reshape(g, [-1, *layer.scale.shape])]


class ViTPatchingAndEmbeddingRule(LayerRule):
    """``ViTPatchingAndEmbedding``: patches (a ruled Conv2D), a class token tiled over
    the batch, and position embeddings. The layer's own call looks the positions up
    without a batch axis (``[1, N]``), which the Embedding rule cannot split per
    example; this forward is the same computation with the ids tiled to ``[B, N]``,
    so the position Embedding's rule sees batch-major rows. The class token's
    per-example gradient is its tiled copy's output gradient."""

    def unsupported_reason(self, layer):
        return _reviewed(layer)

    def variables(self, layer):
        return [layer.class_token] if layer.use_class_token else []

    def forward(self, layer, record, call, inputs):
        patches = layer.patch_embedding(inputs)
        if layer.data_format == "channels_first":
            patches = ops.transpose(patches, axes=(0, 2, 3, 1))
        shape = ops.shape(patches)
        patches = ops.reshape(patches, [shape[0], -1, shape[-1]])
        ids = ops.tile(layer.position_ids, (shape[0], 1))
        positions = layer.position_embedding(ids)
        if layer.use_class_token:
            token = record.watch("class_token", ops.tile(layer.class_token, (shape[0], 1, 1)))
            patches = ops.concatenate([token, patches], axis=1)
        return ops.add(patches, positions)

    def per_example_gradients(self, layer, record):
        g = f32(record.grads["class_token"])  # [N, 1, D]
        return [tf.reshape(g, [-1, *layer.class_token.shape])]


# ---------------------------------------------------------------------------
# Registration (when keras_hub is imported).

__all__ = [
    "PositionEmbeddingRule",
    "ReversibleEmbeddingRule",
    "ScaleNormRule",
    "ViTPatchingAndEmbeddingRule",
    "register",
]

install(
    {
        "keras_hub.src.layers.modeling.position_embedding:PositionEmbedding": (
            PositionEmbeddingRule
        ),
        "keras_hub.src.layers.modeling.rms_normalization:RMSNormalization": (
            lambda: ScaleNormRule(1e-6)
        ),
        "keras_hub.src.models.gemma.rms_normalization:RMSNormalization": ScaleNormRule,
        "keras_hub.src.models.llama.llama_layernorm:LlamaLayerNorm": ScaleNormRule,
        "keras_hub.src.models.vit.vit_layers:ViTPatchingAndEmbedding": (
            ViTPatchingAndEmbeddingRule
        ),
    }
)

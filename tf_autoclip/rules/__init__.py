"""Per-layer rules for the fast clipping engines (``"bk"`` and ``"ghost"``).

The fast engines run the model once on the whole batch and take ONE backward pass of
``sum_i L_i`` to the outputs ``z`` of the layers that own trainable variables. No layer
mixes examples, so row ``i`` of ``b = d(sum_j L_j)/dz`` is ``dL_i/dz_i``, and together
with the layer's saved inputs it gives, for that layer alone:

- each example's squared gradient norm, per variable: either the *ghost* form
  ``<a_i a_i^T, b_i b_i^T>`` (cost ~T^2 per example, T the rows an example has, e.g.
  sequence positions or conv output pixels) or from the explicit per-example gradient
  ``a_i^T b_i`` (cost and memory ~T*D*P and D*P per example, for D inputs and P
  outputs). ``"mixed"`` (the default, like fastDP's mixed mode) takes the explicit
  gradient where it is no larger than the layer's saved activations and output
  gradients (``D*P <= T*(D+P)``), or at most twice as large from T = 16 rows on (there
  explicit is faster on CPU: ghost adds float64 Gram products; ``numerics.use_ghost``),
  ghost norms elsewhere (e.g. every dense layer on 2-D inputs, where T = 1);
- the clipped sum ``sum_i c_i g_i``, e.g. ``a^T (c * b)`` for a dense kernel.

A rule is a :class:`LayerRule` registered for a layer class with
:func:`register_layer_rule`. Rules here: ``Dense``, ``EinsumDense`` (so
``MultiHeadAttention``), ``Embedding``, ``Conv1D``, ``Conv2D``, ``LayerNormalization``,
``GroupNormalization``, ``RMSNormalization``. A model with a trainable variable that no
rule owns is not supported by the fast engines (:func:`unsupported_reason`), and
``engine="auto"`` then uses the vectorized engine.

Writing a rule for your own layer (``y = x * w``, ``w`` of shape ``[d]``)::

    class ScaleRule(tf_autoclip.layer_rules.LayerRule):
        def forward(self, layer, record, call, x):
            record.save(x=x)                        # batch-major tensors only
            return record.watch("y", call(x))      # the engine takes dL/dy
        def per_example_gradients(self, layer, record):
            x, b = record.saved["x"], record.grads["y"]
            return [tf.reduce_sum(tf.reshape(x * b, [tf.shape(x)[0], -1, x.shape[-1]]), 1)]

    tf_autoclip.layer_rules.register_layer_rule(Scale, ScaleRule())

``per_example_gradients`` returns one ``[B, *variable.shape]`` tensor per variable of
``variables(layer)`` (default: the layer's own trainable variables, in creation order);
the default ``squared_norms`` and ``clipped_sum`` are computed from it. Override them
for speed (ghost norms, no per-example tensor).

Layout: :mod:`~tf_autoclip.rules.base` (the interface and the registry),
:mod:`~tf_autoclip.rules.numerics` (batch-row helpers, norm bounds), and one module per
layer family (``dense``, ``einsum_dense``, ``embedding``, ``conv``, ``normalization``),
whose rules register themselves with the :func:`layer_rule` decorator where they are
defined; importing this package imports them all. ``tf_autoclip.layer_rules`` re-exports
every name for compatibility.
"""

from __future__ import annotations

# Importing the family modules registers their rules.
from tf_autoclip.rules.base import (
    LayerRule,
    Record,
    _version,
    all_layers,
    get_layer_rule,
    layer_rule,
    own_variables,
    register_layer_rule,
    unsupported_reason,
)
from tf_autoclip.rules.conv import ConvRule, tracing_for_xla
from tf_autoclip.rules.dense import DenseRule
from tf_autoclip.rules.einsum_dense import EinsumDenseRule
from tf_autoclip.rules.embedding import EmbeddingRule
from tf_autoclip.rules.normalization import (
    GroupNormalizationRule,
    LayerNormalizationRule,
    RMSNormalizationRule,
)
from tf_autoclip.rules.numerics import (
    NORM_METHODS,
    batch_rows,
    explicit_bound_sq,
    f32,
    keep_rows,
    linear_clipped_sum,
    linear_ghost_sq,
    linear_per_example,
    norm_bound_sq,
    norm_method,
    scale_rows,
    squared_rows,
    to_f32_up,
    use_ghost,
    weighted_sum,
)

__all__ = [
    # The interface and the registry.
    "LayerRule",
    "Record",
    "all_layers",
    "get_layer_rule",
    "layer_rule",
    "own_variables",
    "register_layer_rule",
    "unsupported_reason",
    # How linear layers get per-example norms.
    "NORM_METHODS",
    "norm_method",
    "use_ghost",
    # Helpers for rules.
    "batch_rows",
    "explicit_bound_sq",
    "f32",
    "keep_rows",
    "linear_clipped_sum",
    "linear_ghost_sq",
    "linear_per_example",
    "norm_bound_sq",
    "scale_rows",
    "squared_rows",
    "to_f32_up",
    "tracing_for_xla",
    "weighted_sum",
    # The built-in rules.
    "ConvRule",
    "DenseRule",
    "EinsumDenseRule",
    "EmbeddingRule",
    "GroupNormalizationRule",
    "LayerNormalizationRule",
    "RMSNormalizationRule",
]

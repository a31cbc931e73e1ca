"""Compatibility module: the per-layer rules of the fast clipping engines now live in the
package :mod:`tf_autoclip.rules` (see its docstring). Every name this module had is
re-exported here, e.g. ``tf_autoclip.layer_rules.LayerRule``, ``register_layer_rule``
and ``norm_method``."""

from __future__ import annotations

# Modules and typing names the former module imported, so that they still resolve here.
import contextlib  # noqa: F401
import string  # noqa: F401
from collections.abc import Callable, Sequence  # noqa: F401
from typing import Any  # noqa: F401

import keras  # noqa: F401
import tensorflow as tf  # noqa: F401
from keras import ops  # noqa: F401

from tf_autoclip.rules.base import (  # noqa: F401
    _BATCH_RESHAPING,
    _RULES,
    LayerRule,
    Record,
    _not_quantized,
    _registry_version,
    _version,
    all_layers,
    get_layer_rule,
    layer_rule,
    own_variables,
    register_layer_rule,
    unsupported_reason,
)
from tf_autoclip.rules.conv import _FEW_CHANNELS, ConvRule, _rows_of, tracing_for_xla  # noqa: F401
from tf_autoclip.rules.dense import DenseRule, _concat_rows  # noqa: F401
from tf_autoclip.rules.einsum_dense import (  # noqa: F401
    EinsumDenseRule,
    _einsum_or_reshape,
    _parse_einsum,
)
from tf_autoclip.rules.embedding import EmbeddingRule  # noqa: F401
from tf_autoclip.rules.normalization import (  # noqa: F401
    GroupNormalizationRule,
    LayerNormalizationRule,
    RMSNormalizationRule,
    _reduce_to,
)
from tf_autoclip.rules.numerics import (  # noqa: F401
    _MARGIN,
    _U32,
    _U64,
    NORM_METHODS,
    _dim,
    _explicit_sq64,
    _f64,
    _finite_or_safe,
    _ghost_kappa,
    _gram_bound64,
    _Linear,
    _linear_ghost_sq64,
    _prod,
    _row_norms,
    _row_shape,
    _settings,
    _triangle_sq,
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

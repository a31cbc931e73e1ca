"""Per-example clipping: clip factors, variable groups and the sensitivity they imply.

Every clipping function maps a per-example gradient ``g_i`` to ``c_i * g_i`` with
``||c_i * g_i|| <= S`` (the sensitivity), so that adding or removing one example
changes the clipped sum by at most ``S`` in L2 norm:

=========  ==============================  ====================
mode       clip factor ``c_i``              sensitivity ``S``
=========  ==============================  ====================
auto-s     ``1 / (||g_i|| + gamma)``        1
auto-v     ``1 / ||g_i||`` (0 if g_i = 0)   1
abadi      ``min(1, R / ||g_i||)``          R (``l2_norm_clip``)
global     ``1 if ||g_i|| <= R else 0``     R (``l2_norm_clip``)
=========  ==============================  ====================

``auto-s``/``auto-v`` are the automatic clipping of Bu et al. (2023); ``abadi`` is
the clipping of Abadi et al. (2016); ``global`` is the global clipping of
Bu et al. (2021).

Clipping styles split the budget ``S`` between groups of variables:

- ``"all-layer"``: one group, the norm is over the whole gradient.
- ``"per-layer"``: one group per layer (variables sharing a path prefix).
- a list of groups: each group a list of variables or variable paths.

With ``K`` groups, each group is clipped to ``S / sqrt(K)`` (the factor above is
multiplied by ``1 / sqrt(K)``), so the whole clipped example still has norm at most
``S`` and the noise ``sigma * S`` is the same for every style. For automatic clipping
with an adaptive optimizer the constant ``1/sqrt(K)`` does not matter; with SGD it
folds into the learning rate.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tf_autoclip.rules import numerics

CLIPPING_MODES = ("auto-s", "auto-v", "abadi", "global")
CLIPPING_STYLES = ("all-layer", "per-layer")
DEFAULT_GAMMA = 0.01

ClippingStyle = str | Sequence[Sequence[Any]]


@dataclasses.dataclass(frozen=True)
class ClippingConfig:
    """A validated clipping rule: mode, stability constant, threshold and style.

    Example:

    >>> ClippingConfig("auto-s").sensitivity
    1.0
    >>> ClippingConfig("abadi", l2_norm_clip=0.1).sensitivity
    0.1
    """

    mode: str = "auto-s"
    gamma: float | None = None
    l2_norm_clip: float | None = None
    style: ClippingStyle = "all-layer"

    def __post_init__(self) -> None:
        if self.mode not in CLIPPING_MODES:
            raise ValueError(
                f"Unknown clipping={self.mode!r}. Use one of {CLIPPING_MODES}: 'auto-s' "
                "(automatic clipping, the default) needs no threshold."
            )
        _check_number("gamma", self.gamma)
        _check_number("l2_norm_clip", self.l2_norm_clip)
        gamma = self.gamma
        if gamma is None:
            gamma = DEFAULT_GAMMA if self.mode == "auto-s" else 0.0
        if not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma}.")
        if self.mode == "auto-v" and gamma != 0:
            raise ValueError(
                "clipping='auto-v' is automatic clipping with gamma=0; use clipping='auto-s' "
                f"for gamma={gamma}."
            )
        if self.mode in ("abadi", "global"):
            if self.l2_norm_clip is None:
                raise ValueError(
                    f"clipping={self.mode!r} needs l2_norm_clip (the threshold R). "
                    "Automatic clipping (clipping='auto-s') needs none."
                )
            if not math.isfinite(self.l2_norm_clip) or self.l2_norm_clip <= 0:
                raise ValueError(f"l2_norm_clip must be > 0, got {self.l2_norm_clip}.")
        if isinstance(self.style, str) and self.style not in CLIPPING_STYLES:
            raise ValueError(
                f"Unknown clipping_style={self.style!r}. Use 'all-layer', 'per-layer' or a "
                "list of variable groups (lists of variables or variable paths)."
            )
        if not isinstance(self.style, str):
            groups = [list(group) for group in self.style]
            if not groups or not all(groups):
                raise ValueError(
                    "clipping_style groups must be a non-empty list of non-empty groups "
                    f"(lists of variables or variable paths), got {self.style!r}."
                )
        object.__setattr__(self, "gamma", float(gamma))

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity ``S`` of the clipped sum under add/remove of one example."""
        if self.mode in ("abadi", "global"):
            return float(self.l2_norm_clip)
        return 1.0

    def clip_factors(self, norms: tf.Tensor, num_groups: int = 1) -> tf.Tensor:
        """Clip factors for per-example (per-group) gradient norms.

        Args:
          norms: float32 tensor of L2 norms, any shape.
          num_groups: number of variable groups ``K``; each group gets ``S/sqrt(K)``.

        Returns:
          Factors of the same shape. Non-finite norms give factor 0, so an example
          whose gradient overflowed contributes nothing (the sum stays bounded).

        >>> cfg = ClippingConfig("abadi", l2_norm_clip=1.0)
        >>> cfg.clip_factors(tf.constant([0.5, 4.0])).numpy().tolist()
        [1.0, 0.25]
        """
        norms = tf.convert_to_tensor(norms, tf.float32)
        budget = 1.0 / math.sqrt(num_groups)
        if self.mode == "auto-s":
            factors = budget / (norms + self.gamma)
        elif self.mode == "auto-v":
            factors = tf.math.divide_no_nan(tf.fill(tf.shape(norms), budget), norms)
        elif self.mode == "abadi":
            threshold = self.l2_norm_clip * budget
            factors = tf.minimum(1.0, tf.math.divide_no_nan(threshold, norms))
            factors = tf.where(norms > 0, factors, 1.0)
        else:  # global
            threshold = self.l2_norm_clip * budget
            factors = tf.cast(norms <= threshold, tf.float32)
        return tf.where(tf.math.is_finite(norms), factors, 0.0)


def _check_number(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise ValueError(f"{name} must be a number, got {value!r}.")


def group_variables(variables: Sequence[Any], style: ClippingStyle) -> list[list[int]]:
    """Partition variable indices into clipping groups.

    Args:
      variables: the trainable variables, in the order gradients come in.
      style: ``"all-layer"``, ``"per-layer"`` or a list of groups, each a list of
        variables or variable paths (``variable.path``, e.g. ``"dense/kernel"``).

    Returns:
      A list of groups, each a list of indices into ``variables``; every variable is in
      exactly one group.
    """
    if isinstance(style, str):
        if style == "all-layer":
            return [list(range(len(variables)))]
        by_layer: dict[str, list[int]] = {}
        for index, variable in enumerate(variables):
            by_layer.setdefault(_path(variable).rpartition("/")[0], []).append(index)
        return list(by_layer.values())
    index_of = {_path(v): i for i, v in enumerate(variables)}
    groups, seen = [], set()
    for group in style:
        indices = []
        for member in group:
            key = member if isinstance(member, str) else _path(member)
            if key not in index_of:
                raise ValueError(
                    f"clipping_style names {key!r}, which is not a trainable variable of "
                    f"the model. Trainable variable paths: {sorted(index_of)}."
                )
            if index_of[key] in seen:
                raise ValueError(f"Variable {key!r} appears in more than one clipping group.")
            seen.add(index_of[key])
            indices.append(index_of[key])
        groups.append(indices)
    missing = sorted(set(index_of) - {_path(variables[i]) for i in seen})
    if missing:
        raise ValueError(
            f"Every trainable variable must be in a clipping group; missing: {missing}."
        )
    return groups


def serializable_style(style: ClippingStyle) -> ClippingStyle:
    """The style with variables replaced by their paths, for ``get_config``."""
    if isinstance(style, str):
        return style
    return [[m if isinstance(m, str) else _path(m) for m in group] for group in style]


def _path(variable: Any) -> str:
    return getattr(variable, "path", None) or variable.name


def norms_and_factors(
    squared: Sequence[tf.Tensor], groups: Sequence[Sequence[int]], config: ClippingConfig
) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-unit, per-group norms ``[M, K]`` from per-variable squared norms ``[M]``, and
    their clip factors; a unit with a non-finite norm in any group is dropped (factor 0
    for all its groups). Shared by every engine."""
    norms = tf.stack([tf.sqrt(tf.add_n([squared[i] for i in group])) for group in groups], 1)
    factors = config.clip_factors(norms, num_groups=len(groups))
    finite = tf.reduce_all(tf.math.is_finite(norms), axis=1, keepdims=True)
    return norms, tf.where(finite, factors, 0.0)


def clip_and_sum(
    per_unit_gradients: Sequence[tf.Tensor | None],
    groups: Sequence[Sequence[int]],
    config: ClippingConfig,
    num_units: tf.Tensor | int | None = None,
) -> tuple[list[tf.Tensor | None], tf.Tensor]:
    """Sum of clipped per-unit gradients, ``sum_i c_i g_i``.

    Args:
      per_unit_gradients: one ``[M, *shape]`` float32 tensor per variable, or None for
        a variable whose per-unit gradients are all 0 (its sum is then None).
      groups: variable index groups from ``group_variables``.
      config: the clipping rule.
      num_units: ``M``, needed only when every gradient is None.

    Returns:
      ``(clipped_sum, norms)``: one tensor per variable, and the ``[M, K]`` per-group
      norms before clipping. A unit with a non-finite gradient anywhere is dropped
      (factor 0 for all groups), so the sum stays within the sensitivity.
    """
    present = [g for g in per_unit_gradients if g is not None]
    units = tf.shape(present[0])[0] if present else num_units
    squared = [  # never below the float32 squares
        tf.zeros([units]) if g is None else numerics.squared_rows(g) for g in per_unit_gradients
    ]
    norms, factors = norms_and_factors(squared, groups, config)
    clipped = [None] * len(per_unit_gradients)
    for k, group in enumerate(groups):
        column = factors[:, k]
        for i in group:
            g = per_unit_gradients[i]
            if g is None:
                continue
            c = tf.reshape(column, [-1] + [1] * (len(g.shape) - 1))
            # multiply_no_nan: a dropped unit's NaN/Inf entries become exactly 0.
            clipped[i] = tf.reduce_sum(tf.math.multiply_no_nan(g, c), axis=0)
    return clipped, norms


def zeros_where_missing(sums: Sequence[tf.Tensor | None], variables: Sequence[Any]) -> list:
    """``sums`` with each None (a variable no example's loss depends on) replaced by zeros
    of its variable's shape: the sum every engine returns for it."""
    return [
        tf.zeros(v.shape, tf.float32) if s is None else s
        for s, v in zip(sums, variables, strict=True)
    ]

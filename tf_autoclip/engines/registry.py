"""The engine registry: what an engine takes and returns, and how one is chosen.

An engine is a callable ``engine(request: ClipRequest) -> ClippedBatch``. Engines differ
only in how they get per-example gradient norms and the clipped sum (materialized
per-example gradients, ghost norms, book-keeping); clipping rules, noise and the
optimizer update are shared. ``select_engine("auto", ...)`` picks the first registered
engine, in order of preference, that supports the model; ``"vectorized"`` supports every
model and is the fallback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from tf_autoclip import clipping as clipping_lib

LossFn = Callable[[Any, Any, Any], tuple[tf.Tensor, list[tf.Tensor]]]


@dataclasses.dataclass(frozen=True)
class ClipRequest:
    """Everything an engine needs for one batch."""

    model: keras.Model
    loss_fn: LossFn  # (y, y_pred, sample_weight) -> (loss, per-output losses)
    x: Any
    y: Any
    sample_weight: Any
    num_units: tf.Tensor | int  # examples, or microbatches
    groups: Sequence[Sequence[int]]  # variable index groups (clipping style)
    config: clipping_lib.ClippingConfig
    jit_per_example: bool | None = None


@dataclasses.dataclass
class ClippedBatch:
    """What every engine returns."""

    clipped_sum: list[tf.Tensor]  # one per trainable variable
    norms: tf.Tensor  # [M, K] per-unit, per-group norms before clipping
    losses: tf.Tensor  # [M] each unit's loss
    output_losses: list[tf.Tensor]  # per model output, [M] each
    y_pred: Any  # batch-major model outputs


Engine = Callable[[ClipRequest], ClippedBatch]
# Whether an engine can serve a model: (model, num_microbatches) -> bool.
Supports = Callable[[keras.Model, int | None], bool]

_REGISTRY: dict[str, tuple[Engine, Supports]] = {}
_PREFERENCE: list[str] = []  # "auto" tries these in order


def register_engine(name: str, engine: Engine, supports: Supports, preferred: bool = False) -> None:
    """Add an engine; ``preferred`` engines are tried by ``"auto"`` before the others."""
    _REGISTRY[name] = (engine, supports)
    if name in _PREFERENCE:
        _PREFERENCE.remove(name)
    _PREFERENCE.insert(0 if preferred else len(_PREFERENCE), name)


def engine_names() -> list[str]:
    return ["auto", *_REGISTRY]


def select_engine(name: str, model: keras.Model, num_microbatches: int | None) -> Engine:
    """The engine called ``name``, or for ``"auto"`` the preferred one that supports ``model``."""
    if name == "auto":
        for candidate in _PREFERENCE:
            engine, supports = _REGISTRY[candidate]
            if supports(model, num_microbatches):
                return engine
    if name not in _REGISTRY:
        raise ValueError(f"Unknown engine={name!r}; choose one of {engine_names()}.")
    engine, supports = _REGISTRY[name]
    if not supports(model, num_microbatches):
        explain = getattr(supports, "explain", None)
        why = f" ({explain(model, num_microbatches)})" if explain is not None else ""
        raise ValueError(
            f"engine={name!r} does not support this model (or num_microbatches){why}; use "
            "engine='auto' to fall back to one that does."
        )
    return engine

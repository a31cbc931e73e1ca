"""The engine registry: what an engine takes and returns, and how one is chosen.

An engine is a callable ``engine(request: ClipRequest) -> ClippedBatch``. Engines differ
only in how they get per-example gradient norms and the clipped sum (materialized
per-example gradients, ghost norms, book-keeping); clipping rules, noise and the
optimizer update are shared. ``select_engine("auto", ...)`` picks the first registered
engine, in order of preference, that supports the model; ``"vectorized"`` supports every
model and is the fallback.

User-level clipping (``ClipRequest.user_segments``: ``private_gradients(..., user_ids=...)``)
clips each user's summed gradient ``g_u = sum_{i in u} g_i``; its norm needs the
cross-example terms ``<g_i, g_j>``, which the fast engines (per-example norms only) do not
compute. Only engines marked with ``serves_user_level(engine)`` (the vectorized engine)
are chosen for it: ``"auto"`` skips the others, and naming one is refused.
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
    # User-level clipping: [B] int32, the dense index (0..U-1, ``tf.unique`` of the user
    # ids) of each example's user; ``num_units`` is then U, the users in the batch, and a
    # unit's gradient is the sum of its examples' gradients. None: units are examples or
    # consecutive microbatches.
    user_segments: tf.Tensor | None = None


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

USER_LEVEL_REASON = (
    "user_ids is set: a user's clip factor needs the norm of the user's summed gradient "
    "||sum_i g_i||, whose cross-example terms the fast engines (per-example norms only) do "
    "not compute; the vectorized engine clips per user"
)


def serves_user_level(engine: Engine) -> bool:
    """Whether ``engine`` clips user units (``ClipRequest.user_segments``); engines opt in
    by setting ``engine.serves_user_level = True``."""
    return bool(getattr(engine, "serves_user_level", False))


def register_engine(name: str, engine: Engine, supports: Supports, preferred: bool = False) -> None:
    """Add an engine; ``preferred`` engines are tried by ``"auto"`` before the others."""
    _REGISTRY[name] = (engine, supports)
    if name in _PREFERENCE:
        _PREFERENCE.remove(name)
    _PREFERENCE.insert(0 if preferred else len(_PREFERENCE), name)


def engine_names() -> list[str]:
    return ["auto", *_REGISTRY]


def auto_engine_name(
    model: keras.Model, num_microbatches: int | None, user_level: bool = False
) -> str:
    """The name of the engine ``"auto"`` picks for ``model`` (for user-level clipping:
    among the engines that serve it)."""
    for candidate in _PREFERENCE:
        engine, supports = _REGISTRY[candidate]
        if user_level and not serves_user_level(engine):
            continue
        if supports(model, num_microbatches):
            return candidate
    raise ValueError("no registered engine supports this model")


def select_engine(
    name: str, model: keras.Model, num_microbatches: int | None, user_level: bool = False
) -> Engine:
    """The engine called ``name``, or for ``"auto"`` the preferred one that supports ``model``
    (``user_level``: and clips per user, see the module docstring)."""
    if name == "auto":
        return _REGISTRY[auto_engine_name(model, num_microbatches, user_level)][0]
    if name not in _REGISTRY:
        raise ValueError(f"Unknown engine={name!r}; choose one of {engine_names()}.")
    engine, supports = _REGISTRY[name]
    if user_level and not serves_user_level(engine):
        raise ValueError(
            f"engine={name!r} cannot clip per user ({USER_LEVEL_REASON}); use "
            "engine='auto' or engine='vectorized'."
        )
    if not supports(model, num_microbatches):
        explain = getattr(supports, "explain", None)
        why = f" ({explain(model, num_microbatches)})" if explain is not None else ""
        raise ValueError(
            f"engine={name!r} does not support this model (or num_microbatches){why}; use "
            "engine='auto' to fall back to one that does."
        )
    return engine

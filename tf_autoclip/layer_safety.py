"""Which layers treat each example of a batch independently ("vouched" layers).

The one-pass engines (``"bk"``, ``"ghost"``) and the tf-keras path run the whole batch
through the model at once and read example ``i``'s gradient from row ``i``. That is
private only if no layer lets example ``j`` change row ``i``: a Lambda standardizing by
batch statistics, ``UnitNormalization(axis=0)`` or the sign of a batch mean would make
each example's clipped gradient depend on the others, and the clipped sum's sensitivity
is no longer bounded. So these paths serve a model only if EVERY layer (and every
``keras.ops`` node of a functional model) is vouched for:

- a Keras built-in in the table ``LAYERS`` of :mod:`tf_autoclip._layer_table` (one
  table for Keras 3 and tf_keras, by class name), whose check of its arguments
  (``axis``, ``stateful``, ...) passes;
- a class registered with :func:`register_per_example_layer`;
- a class with a layer rule (``layer_rules.register_layer_rule``) that serves it.

Vouching is for the class's own computation (its ``call``): a subclass that overrides
``call`` is not vouched, and sublayers are checked one by one. Containers
(``Sequential``, functional models) are vouched through their contents; a subclassed
``keras.Model`` is not, unless registered. Anything else (``Lambda``, ``TFSMLayer``,
unknown layers) is not vouched: ``engine="auto"`` then uses the vectorized engine (each
example alone), and tf-keras refuses the model. ``BatchNormalization`` is refused by
every engine (its moving statistics are updated from the data without noise).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tf_autoclip import _keras_compat
from tf_autoclip import rules as layer_rules
from tf_autoclip._layer_table import LAYERS, NEVER_VOUCHED, OPS, Check

_COMPUTE_METHODS = ("call", "convolution_op")
_BUILTIN_MODULES = ("keras.", "tf_keras.")
_user_checks: dict[type, Check | None] = {}
_UNKNOWN = object()
_registry_version = [0]  # bumped by every (un)registration: cached decisions are stale


# -- public API ---------------------------------------------------------------------------
def register_per_example_layer(layer_class: type, check: Check | None = None) -> None:
    """Vouch that ``layer_class`` treats every example of a batch independently.

    Row ``i`` of its outputs must depend on row ``i`` of its inputs only (and on
    weights and randomness that do not depend on the data): no batch statistics, no
    reduction, reshape or sort over the batch axis 0. Then the one-pass engines
    (``"bk"``, ``"ghost"``) and the tf-keras path may serve models that contain it.
    Subclasses that override ``call`` are not vouched; sublayers are still checked.

    Args:
      layer_class: a Keras 3 or tf_keras layer class (or model class); not
        ``BatchNormalization`` (moving statistics) nor ``Lambda`` (every Lambda).
      check: optional ``check(layer) -> str | None``, why this instance (given its
        arguments) mixes examples, or None when it does not.

    >>> import keras, tf_autoclip as ac
    >>> class Double(keras.layers.Layer):
    ...     def call(self, x):
    ...         return 2.0 * x
    >>> model = keras.Sequential([keras.Input((3,)), Double(), keras.layers.Dense(2)])
    >>> ac.unvouched_reason(model) is None
    False
    >>> ac.register_per_example_layer(Double)
    >>> ac.unvouched_reason(model) is None
    True
    """
    if not isinstance(layer_class, type):
        raise TypeError(
            f"register_per_example_layer takes a layer class, got {layer_class!r}; pass "
            "type(layer) or the class itself."
        )
    name = layer_class.__name__
    if name in NEVER_VOUCHED and layer_class.__module__.startswith(_BUILTIN_MODULES):
        raise ValueError(f"{name} cannot be vouched for: {NEVER_VOUCHED[name]}")
    _user_checks[layer_class] = check
    _registry_version[0] += 1


def unregister_per_example_layer(layer_class: type) -> None:
    """Withdraw :func:`register_per_example_layer` for ``layer_class`` (no-op if absent)."""
    _user_checks.pop(layer_class, None)
    _registry_version[0] += 1


def registry_version() -> int:
    """Changes whenever a layer class is registered or unregistered."""
    return _registry_version[0]


def unvouched_reason(model: Any) -> str | None:
    """Why ``model`` may mix examples within a batch, or None if every layer and op is
    vouched for (see the module docstring). Names the first offending layer or op.

    >>> import keras
    >>> inputs = keras.Input((4,))
    >>> ok = keras.Model(inputs, keras.layers.UnitNormalization(axis=-1)(inputs))
    >>> unvouched_reason(ok) is None
    True
    >>> bad = keras.Model(inputs, keras.layers.UnitNormalization(axis=0, name="un")(inputs))
    >>> print(unvouched_reason(bad))  # doctest: +ELLIPSIS
    layer 'un' (UnitNormalization): axis=0 includes the batch axis 0. ...
    """
    for item, why in _walk(model, set()):
        if why is not None:
            kind = "layer" if _is_layer(item) else "op"
            name = getattr(item, "name", "?")
            return f"{kind} {name!r} ({type(item).__name__}): {why}. {_advice(item)}"
    return None


def decided_layer_names() -> frozenset[str]:
    """Class names the table decides (vouched, vouched with a check, or not vouched)."""
    return frozenset(LAYERS)


# -- the walk -------------------------------------------------------------------------------
def _is_layer(item: Any) -> bool:
    return _keras_compat.is_layer(item)


def _advice(item: Any) -> str:
    """What to do about an item that is not vouched for."""
    cls = type(item).__name__
    if cls in ("BatchNormalization", "SyncBatchNormalization"):
        return "Use GroupNormalization or LayerNormalization instead."
    if _is_layer(item) and not type(item).__module__.startswith(_BUILTIN_MODULES):
        return (
            f"If {cls} treats every example independently, vouch for it with "
            f"`tf_autoclip.register_per_example_layer({cls})`."
        )
    return (
        "Compute it per example (never over the batch axis 0), or move it into a "
        "custom layer that does and vouch for that with "
        "`tf_autoclip.register_per_example_layer(YourLayer)`."
    )


def _walk(layer: Any, seen: set[int]) -> Iterable[tuple[Any, str | None]]:
    """(layer or op, why it is not vouched or None) for ``layer`` and all it contains."""
    if id(layer) in seen:
        return
    seen.add(id(layer))
    yield layer, _layer_reason(layer)
    for op in getattr(layer, "operations", []) if _is_functional(layer) else []:
        if not _is_layer(op) and id(op) not in seen:
            seen.add(id(op))
            yield op, _op_reason(op)
    pipeline = input_pipeline_layer(layer)
    for sub in _keras_compat.direct_sublayers(layer):
        if sub is not pipeline:
            yield from _walk(sub, seen)


def input_pipeline_layer(layer: Any) -> Any:
    """The preprocessor of a KerasHub task, or None: its ``fit``/``evaluate``/``predict``
    map it over the batched ``tf.data`` pipeline before a batch reaches the model, whose
    ``call`` never runs it; so it is not part of the per-example computation (see
    :func:`input_pipeline_reason` for what it must still not do)."""
    if any(
        c.__name__ == "PipelineModel" and c.__module__.startswith("keras_hub.")
        for c in type(layer).__mro__
    ):
        return getattr(layer, "preprocessor", None)
    return None


def input_pipeline_reason(model: Any) -> str | None:
    """Why ``model``'s input pipeline mixes examples, or None. A KerasHub preprocessor
    with ``sequence_length=None`` pads every batch to its longest example: one example
    then changes the others' inputs (and a loss averaged over positions)."""
    preprocessor = input_pipeline_layer(model)
    if preprocessor is not None and getattr(preprocessor, "sequence_length", 0) is None:
        return (
            f"its preprocessor {preprocessor.name!r} pads each batch to the batch's longest "
            "example (sequence_length=None), so one example changes the others' inputs. "
            "Set a fixed length, e.g. model.preprocessor.sequence_length = 128."
        )
    return None


def _is_functional(layer: Any) -> bool:
    return any(c.__name__ == "Functional" for c in type(layer).__mro__)


def _computing_classes(cls: type) -> list[type]:
    """``cls`` and its bases up to the first one that defines the computation (``call``)."""
    chain = []
    for base in cls.__mro__:
        chain.append(base)
        if any(name in vars(base) for name in _COMPUTE_METHODS):
            break
    return chain


def _layer_reason(layer: Any) -> str | None:
    decision = _decision(type(layer))
    if decision is _UNKNOWN:  # a layer rule vouches for its layer's own math
        rule = layer_rules.get_layer_rule(layer)  # Keras 3 classes only
        if rule is None:
            return "is not known to treat examples independently"
        return rule.unsupported_reason(layer)
    if isinstance(decision, str):
        return decision
    return decision(layer) if decision is not None else None


def _decision(cls: type) -> Any:
    """The user's registration or the table's entry for the class whose ``call`` runs."""
    for base in _computing_classes(cls):
        if base in _user_checks:
            return _user_checks[base]
        if base.__module__.startswith(_BUILTIN_MODULES) and base.__name__ in LAYERS:
            return LAYERS[base.__name__]
    return _UNKNOWN


def _op_reason(op: Any) -> str | None:
    name = type(op).__name__
    if name not in OPS:
        return "is a keras.ops call that is not known to act on each example alone"
    check = OPS[name]
    return None if check is None else check(op)

"""The rule interface (:class:`Record`, :class:`LayerRule`), the registry of rules by
layer class, and the model-level check :func:`unsupported_reason`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from tf_autoclip import _keras_compat
from tf_autoclip.rules.numerics import squared_rows, weighted_sum


class Record:
    """What a rule's ``forward`` keeps from one call of its layer.

    ``saved``: batch-major tensors the rule needs later (e.g. the layer's inputs).
    ``watched``: tensors whose batch gradient the engine computes into ``grads``
    (same keys). ``cache``: scratch space shared by the rule's methods.
    """

    def __init__(self, layer: keras.layers.Layer, rule: LayerRule, watch: Callable) -> None:
        self.layer = layer
        self.rule = rule
        self.saved: dict[str, Any] = {}
        self.watched: dict[str, tf.Tensor] = {}
        self.grads: dict[str, tf.Tensor] = {}
        self.cache: dict[str, Any] = {}
        # Set by the engine before clipped_sum: a scalar bool tensor, True when no example
        # is dropped for a non-finite gradient (rules may then skip zeroing NaN rows).
        self.all_finite: tf.Tensor | None = None
        # Set by the engine: True when the loss depends on none of the watched tensors.
        self.unconnected = False
        self._watch = watch

    def save(self, **tensors: Any) -> None:
        self.saved.update(tensors)

    def watch(self, name: str, tensor: Any) -> tf.Tensor:
        """Ask for ``d(sum_i L_i)/d tensor``; returns ``tensor`` (use it downstream)."""
        tensor = tf.convert_to_tensor(tensor)
        self._watch(tensor)
        self.watched[name] = tensor
        return tensor


class LayerRule:
    """How one layer class gives per-example gradient norms and the clipped sum.

    Subclasses implement ``forward`` and ``per_example_gradients``, and may override
    ``squared_norms``, ``clipped_sum``, ``merge`` and ``unsupported_reason``. All lists
    are aligned with ``variables(layer)``.
    """

    def unsupported_reason(self, layer: keras.layers.Layer) -> str | None:
        """Why this rule cannot serve ``layer`` (e.g. a quantized layer), or None."""
        return None

    def variables(self, layer: keras.layers.Layer) -> list[Any]:
        """The variables this rule computes gradients for (trainable or not)."""
        return own_variables(layer)

    def forward(self, layer, record: Record, call: Callable, *args, **kwargs) -> Any:
        """Run the layer (``call`` is its own ``call``) on the whole batch, saving into
        ``record`` what the gradients need; return the layer's outputs."""
        raise NotImplementedError

    def per_example_gradients(self, layer, record: Record) -> list[tf.Tensor]:
        """One ``[B, *variable.shape]`` float32 tensor per variable."""
        raise NotImplementedError

    def squared_norms(self, layer, record: Record) -> list[tf.Tensor]:
        """Each example's squared gradient norm, ``[B]`` float32, per variable."""
        return [squared_rows(g) for g in self._per_example(layer, record)]

    def clipped_sum(self, layer, record: Record, factors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """``sum_i c_i g_i`` per variable, given ``[B]`` factors per variable (0 for
        dropped examples, whose gradient may be NaN: the result must stay finite)."""
        grads = self._per_example(layer, record)
        return [weighted_sum(g, c, record.all_finite) for g, c in zip(grads, factors, strict=True)]

    def merge(self, layer, records: Sequence[Record]) -> Record | None:
        """One record equivalent to several calls of the same layer, or None (the
        engine then adds the calls' per-example gradients)."""
        return None

    def _per_example(self, layer, record: Record) -> list[tf.Tensor]:
        if "per_example" not in record.cache:
            grads = self.per_example_gradients(layer, record)
            record.cache["per_example"] = [tf.cast(g, tf.float32) for g in grads]
        return record.cache["per_example"]


_RULES: dict[type, LayerRule] = {}
_registry_version = [0]


def _version() -> int:
    """Changes whenever a rule is registered (engines cache per-model checks on it)."""
    return _registry_version[0]


def register_layer_rule(layer_class: type, rule: LayerRule) -> None:
    """Use ``rule`` for layers of ``layer_class`` (and subclasses that do not override
    ``call``). Replaces an earlier rule for the same class."""
    if not isinstance(rule, LayerRule):
        raise TypeError(f"rule must be a LayerRule, got {type(rule).__name__}.")
    _RULES[layer_class] = rule
    _registry_version[0] += 1


def layer_rule(*layer_classes: type | None) -> Callable[[type[LayerRule]], type[LayerRule]]:
    """Class decorator: register the decorated :class:`LayerRule` subclass (a new instance
    per layer class, as :func:`register_layer_rule` does) for each of ``layer_classes``
    where it is defined; ``None`` entries (a class this Keras lacks) are skipped::

        @layer_rule(keras.layers.Conv1D, keras.layers.Conv2D)
        class ConvRule(LayerRule): ...
    """

    def register(rule_class: type[LayerRule]) -> type[LayerRule]:
        for layer_class in layer_classes:
            if layer_class is not None:
                register_layer_rule(layer_class, rule_class())
        return rule_class

    return register


def get_layer_rule(layer: keras.layers.Layer) -> LayerRule | None:
    """The rule for ``layer``: registered for its class, or for a base class whose
    ``call`` (and ``convolution_op``) it does not override."""
    for cls in type(layer).__mro__:
        rule = _RULES.get(cls)
        if rule is None:
            continue
        if cls is type(layer):
            return rule
        same = all(
            getattr(type(layer), name, None) is getattr(cls, name, None)
            for name in ("call", "convolution_op", "quantized_call")
        )
        return rule if same else None
    return None


def own_variables(layer: keras.layers.Layer) -> list[Any]:
    """The variables a layer created itself (not those of its sublayers)."""
    return _keras_compat.own_variables(layer)


def all_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    return _keras_compat.all_layers(model)


# Wrappers that reshape the batch before calling their inner layer.
_BATCH_RESHAPING = (keras.layers.TimeDistributed,)


def unsupported_reason(model: keras.Model) -> str | None:
    """Why the fast engines cannot serve ``model``, or None if they can."""
    trainable = {id(v) for v in model.trainable_variables}
    owned: set[int] = set()
    for layer in all_layers(model):
        if isinstance(layer, _BATCH_RESHAPING):
            inner = [sub for sub in all_layers(layer) if sub is not layer]
            if any(id(v) in trainable for sub in inner for v in own_variables(sub)):
                return f"layer {layer.name!r} ({type(layer).__name__}) reshapes the batch"
        if getattr(layer, "activity_regularizer", None) is not None:
            return f"layer {layer.name!r} has an activity regularizer (a batch-level loss)"
        mine = [v for v in own_variables(layer) if id(v) in trainable]
        if not mine:
            continue
        rule = get_layer_rule(layer)
        if rule is None:
            return f"no layer rule for layer {layer.name!r} ({type(layer).__name__})"
        reason = rule.unsupported_reason(layer)
        if reason is not None:
            return f"layer {layer.name!r} ({type(layer).__name__}): {reason}"
        covered = {id(v) for v in rule.variables(layer)}
        missing = [v.path for v in mine if id(v) not in covered]
        if missing:
            return f"the rule for layer {layer.name!r} does not cover {missing}"
        owned.update(id(v) for v in mine)
    missing = [v.path for v in model.trainable_variables if id(v) not in owned]
    if missing:
        return f"trainable variables not owned by a layer with a rule: {missing}"
    return None


def _not_quantized(layer, lora: bool = False) -> str | None:
    """Why a (Dense, EinsumDense, Embedding, Conv) layer's rule cannot serve it, or None.
    ``lora``: the rule handles ``enable_lora`` (its variables are then the LoRA factors)."""
    if getattr(layer, "quantization_mode", None) is not None:
        return "quantized layers are not supported"
    if getattr(layer, "lora_enabled", False) and not lora:
        return "LoRA layers are not supported"
    return None

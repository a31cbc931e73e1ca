"""The fast engines' plan of a model: decided once, read by every step of a trace.

Whether the fast engines (``bk``, ``ghost``) may serve a model, and which layers run
through which rule, used to be decided separately by the engine choice, the fallback
check, the probe trace and the batched forward pass. :func:`plan_for` decides it once
per model (and again only when the model's layers or trainable variables, or the rule
or layer-safety registries, change) and everything else reads the answer.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from typing import Any

import keras

from tf_autoclip import layer_safety
from tf_autoclip import rules as layer_rules


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the fast engines do with one model.

    ``unsupported``: why they cannot serve it (a layer not vouched to treat examples
    independently, a trainable variable without a rule, ...), or None. ``ruled``: the
    layers whose ``call`` runs through their rule (those with a rule that own a
    trainable variable), with the rule. ``owners``: for each trainable variable a rule
    covers, ``id(variable)`` -> the layer whose rule gives its per-example gradient.
    ``probes``: the probe trace's verdict per input signature (``bk_forward._probe``).
    """

    unsupported: str | None
    ruled: tuple[tuple[keras.layers.Layer, layer_rules.LayerRule], ...]
    owners: Mapping[int, keras.layers.Layer]
    probes: dict[Any, str | None] = dataclasses.field(default_factory=dict, compare=False)


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_for(model: keras.Model) -> Plan:
    """The plan of ``model``, computed on first use and when the model changes."""
    layers = layer_rules.all_layers(model)
    trainable = model.trainable_variables
    key = (
        layer_rules._version(),
        layer_safety.registry_version(),
        tuple(id(layer) for layer in layers),
        tuple(id(v) for v in trainable),
    )
    cached = _plans.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = _make_plan(model, layers, {id(v) for v in trainable})
    _plans[model] = (key, plan)
    return plan


def _make_plan(model: keras.Model, layers: list[Any], trainable: set[int]) -> Plan:
    ruled, owners = [], {}
    for layer in layers:
        rule = layer_rules.get_layer_rule(layer)
        if rule is None:
            continue
        if any(id(v) in trainable for v in layer_rules.own_variables(layer)):
            ruled.append((layer, rule))
        for v in rule.variables(layer):
            if id(v) in trainable:
                owners[id(v)] = layer
    unsupported = layer_safety.unvouched_reason(model) or layer_rules.unsupported_reason(model)
    return Plan(unsupported, tuple(ruled), owners)


def describe(model: keras.Model, num_microbatches: int | None = None) -> str:
    """What the engines will do with ``model``: the engine ``"auto"`` picks (and, if not
    a fast one, why), then each layer that owns trainable variables with its rule. The
    first batch is also traced once more at another batch size; if that finds a layer
    that sees several examples' rows at once, training warns and uses the vectorized
    engine.

    >>> import keras, tf_autoclip as ac
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="out")], name="m")
    >>> print(ac.describe_engine(model))
    engine "auto" picks: bk
      out (Dense): DenseRule for m/out/kernel, m/out/bias
    """
    from tf_autoclip.engines import registry  # the registry's engines import this module

    name = registry.auto_engine_name(model, num_microbatches)
    lines = [f'engine "auto" picks: {name}']
    plan = plan_for(model)
    if plan.unsupported is not None:
        lines.append(f"  (the fast engines cannot serve it: {plan.unsupported})")
    trainable = {id(v) for v in model.trainable_variables}
    for layer, rule in plan.ruled:
        paths = [v.path for v in rule.variables(layer) if id(v) in trainable]
        lora = " (LoRA factors)" if getattr(layer, "lora_enabled", False) else ""
        lines.append(
            f"  {layer.name} ({type(layer).__name__}): {type(rule).__name__}{lora} for "
            + ", ".join(paths)
        )
    return "\n".join(lines)

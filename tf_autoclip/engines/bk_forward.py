"""The batched forward pass of the fast engines (``bk``, ``ghost``) through the layer
rules, and the probe trace that checks, before the first batch, that the rules see every
example's rows (see ``engines/bk.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from tf_autoclip import _keras_compat
from tf_autoclip import rules as layer_rules
from tf_autoclip.engines.plan import Plan

# Batch size of the probe trace: a prime that no other axis is likely to equal.
_PROBE_BATCH = 1031


class _ReadTracker(keras.StatelessScope):
    """A StatelessScope that notes trainable variables read outside their own layer."""

    def __init__(self, state_mapping, owners: dict[int, Any], stack: list[Any]) -> None:
        super().__init__(state_mapping=state_mapping, collect_losses=True)
        self.owners, self.stack = owners, stack
        self.foreign: list[str] = []

    def get_current_value(self, variable):
        owner = self.owners.get(id(variable))
        if owner is not None and (not self.stack or self.stack[-1] is not owner):
            self.foreign.append(getattr(variable, "path", variable.name))
        return super().get_current_value(variable)


@contextlib.contextmanager
def _ruled_calls(plan: Plan, on_call: Callable):
    """Route ``layer.call`` of every ruled layer with trainable variables through
    ``on_call(layer, rule, call, args, kwargs)`` while tracing."""
    swapped = []
    for layer, rule in plan.ruled:
        had = "call" in layer.__dict__
        original = layer.call

        def call(*args, _layer=layer, _rule=rule, _original=original, **kwargs):
            return on_call(_layer, _rule, _original, args, kwargs)

        swapped.append((layer, had, original))
        object.__setattr__(layer, "call", call)
    try:
        yield
    finally:
        for layer, had, original in swapped:
            if had:
                object.__setattr__(layer, "call", original)
            else:
                object.__delattr__(layer, "call")


class _Forward:
    """One batched forward pass through the rules, recording every ruled call."""

    def __init__(self, model: keras.Model, watch: Callable, plan: Plan) -> None:
        self.model = model
        self.watch = watch
        self.records: list[layer_rules.Record] = []
        self.stack: list[Any] = []
        self.plan = plan
        self.owners = plan.owners

    def _on_call(self, layer, rule, call, args, kwargs):
        record = layer_rules.Record(layer, rule, self.watch)
        self.stack.append(layer)
        try:
            outputs = rule.forward(layer, record, call, *args, **kwargs)
        finally:
            self.stack.pop()
        self.records.append(record)
        return outputs

    def run(self, x: Any, state_mapping) -> tuple[Any, _ReadTracker]:
        model = self.model
        scope = _ReadTracker(state_mapping, self.owners, self.stack)
        with scope, _ruled_calls(self.plan, self._on_call):
            if _keras_compat.call_has_training_arg(model):
                y_pred = model(x, training=True)
            else:
                y_pred = model(x)
        return y_pred, scope

    def problem(self, scope: _ReadTracker, batch: int | None) -> str | None:
        """Why these records cannot give per-example gradients, or None."""
        if scope.foreign:
            return f"variables read outside their layer (e.g. tied weights): {scope.foreign[:3]}"
        if scope.losses:
            return "the model adds batch-level losses (add_loss / activity regularizers)"
        if batch is None:
            return None
        for record in self.records:
            tensors = [*record.saved.values(), *record.watched.values()]
            for t in tensors:
                if not isinstance(t, tf.Tensor):
                    continue
                if len(t.shape) == 0 or t.shape[0] != batch:
                    return (
                        f"layer {record.layer.name!r} is applied to a tensor of shape "
                        f"{t.shape} whose first axis is not the batch (e.g. positions "
                        "without a batch axis)"
                    )
        return None


def _probe(model: keras.Model, x: Any, plan: Plan) -> str | None:
    """Trace the forward pass with a batch of ``_PROBE_BATCH`` (never run) and check
    that every ruled layer sees batch-major tensors and no variable is read elsewhere.
    Cached per model and input signature."""
    flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten(x)]
    key = tuple((tuple(t.shape[1:]), t.dtype.name) for t in flat)
    cache = plan.probes  # a new plan (the model changed) probes again
    if key in cache:
        return cache[key]
    specs = [tf.TensorSpec([_PROBE_BATCH, *t.shape[1:]], t.dtype) for t in flat]
    found: list[str | None] = []

    def trace(*args):
        forward = _Forward(model, lambda t: None, plan)
        seeds = _keras_compat.seed_generators(model)
        mapping = [(sg.state, tf.zeros(sg.state.shape, sg.state.dtype)) for sg in seeds]
        _, scope = forward.run(tf.nest.pack_sequence_as(x, list(args)), mapping)
        found.append(forward.problem(scope, _PROBE_BATCH))
        return tf.constant(0)

    try:
        tf.function(trace, autograph=False).get_concrete_function(*specs)
        reason = found[0] if found else "probe trace failed"
    except Exception as error:  # noqa: BLE001 - any failure means: do not use the rules
        reason = f"tracing with another batch size failed ({type(error).__name__}: {error})"
    cache[key] = reason
    return reason

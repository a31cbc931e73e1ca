"""Fast clipping engines: book-keeping (``"bk"``) and ghost clipping (``"ghost"``).

Both run the model ONCE on the whole batch, with the layers that own trainable
variables run through their rules (``layer_rules``), which save the layer inputs and
mark the layer outputs ``z``. Each example's loss ``L_i`` comes from the batched
predictions (the unit loss vectorized over the examples, masks and sample weights
kept), and one backward pass of ``sum_i L_i`` gives ``b = dL/dz`` for every such layer;
row ``i`` of ``b`` is example ``i``'s, since no layer mixes examples. Then:

- ``"bk"`` (book-keeping, Bu et al. 2023): per-example norms AND the clipped sum
  ``sum_i c_i g_i`` come from ``a`` and ``b`` layer by layer (e.g. ``a^T (c * b)``). No
  second backward pass.
- ``"ghost"`` (ghost clipping, Li et al. 2022): per-example norms from ``a`` and ``b``,
  then a second backward pass of ``sum_i c_i L_i`` with ``c`` held constant (one pass per
  clipping group). Slower than ``"bk"``; kept as an independent check.

Dropout and other randomness: the batched forward draws one mask per example, as
Keras does; the seed generators advance as in a normal training step. Non-trainable
state updates are discarded, as in the vectorized engine.

``"bk"`` is the preferred engine of ``engine="auto"``. It serves a model when every
layer and functional op is vouched to treat examples independently
(``layer_safety.unvouched_reason``: the one batched forward pass must not mix them),
every trainable variable belongs to a layer with a rule
(``layer_rules.unsupported_reason``), and there are no microbatches. When tracing
finds something the rules cannot see (a variable read outside its layer, e.g. tied
weights; a batch-level ``add_loss``; a layer applied to a tensor without the batch axis,
e.g. positions), the engine warns and computes that batch with the vectorized engine
instead: never a wrong answer.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf
from keras.src.backend import get_keras_mask, set_keras_mask

from tf_autoclip import engines, layer_safety, per_example
from tf_autoclip import rules as layer_rules

# Batch size of the probe trace: a prime that no other axis is likely to equal.
_PROBE_BATCH = 1031
_probe_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_warned: set[tuple[int, str]] = set()


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
def _ruled_calls(model: keras.Model, on_call: Callable):
    """Route ``layer.call`` of every ruled layer with trainable variables through
    ``on_call(layer, rule, call, args, kwargs)`` while tracing."""
    trainable = {id(v) for v in model.trainable_variables}
    swapped = []
    for layer in layer_rules.all_layers(model):
        if not any(id(v) in trainable for v in layer_rules.own_variables(layer)):
            continue
        rule = layer_rules.get_layer_rule(layer)
        if rule is None:
            continue
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

    def __init__(self, model: keras.Model, watch: Callable) -> None:
        self.model = model
        self.watch = watch
        self.records: list[layer_rules.Record] = []
        self.stack: list[Any] = []
        self.owners: dict[int, Any] = {}
        trainable = {id(v) for v in model.trainable_variables}
        for layer in layer_rules.all_layers(model):
            rule = layer_rules.get_layer_rule(layer)
            if rule is None:
                continue
            for v in rule.variables(layer):
                if id(v) in trainable:
                    self.owners[id(v)] = layer

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
        with scope, _ruled_calls(model, self._on_call):
            if getattr(model, "_call_has_training_arg", True):
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


def _probe(model: keras.Model, x: Any) -> str | None:
    """Trace the forward pass with a batch of ``_PROBE_BATCH`` (never run) and check
    that every ruled layer sees batch-major tensors and no variable is read elsewhere.
    Cached per model and input signature."""
    flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten(x)]
    key = (
        layer_rules._version(),
        tuple((tuple(t.shape[1:]), t.dtype.name) for t in flat),
    )
    cache = _probe_cache.setdefault(model, {})
    if key in cache:
        return cache[key]
    specs = [tf.TensorSpec([_PROBE_BATCH, *t.shape[1:]], t.dtype) for t in flat]
    found: list[str | None] = []

    def trace(*args):
        forward = _Forward(model, lambda t: None)
        seeds = per_example._seed_generators(model)
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


def per_example_losses(
    loss_fn: per_example.LossFn,
    y: Any,
    y_pred: Any,
    sample_weight: Any,
    batch_size: Any,
    scale: float = 1.0,
) -> tuple[tf.Tensor, list[tf.Tensor], list[tf.Tensor]]:
    """Each example's loss and per-output losses from batched predictions, and
    ``d(scale * L_i)/d y_pred_i`` for every flat output: the unit loss on a batch of one and its
    gradient, vectorized over the examples, with Keras masks kept.

    The gradient is taken inside the vectorized function: differentiating through
    ``vectorized_map``'s converted ops from outside makes XLA treat the inputs and the
    weights as compile-time constants (a recompilation every step)."""
    flat = tf.nest.flatten(y_pred)
    masks = [get_keras_mask(t) for t in flat]
    slots = [i for i, m in enumerate(masks) if m is not None]
    data = {"y_pred": flat, "masks": [masks[i] for i in slots]}
    if y is not None:
        data["y"] = y
    if sample_weight is not None:
        data["sample_weight"] = sample_weight
    units = per_example.split_into_units(data, batch_size)

    def one(unit):
        preds = list(unit["y_pred"])
        with tf.GradientTape() as tape:
            tape.watch(preds)
            for slot, mask in zip(slots, unit["masks"], strict=True):
                set_keras_mask(preds[slot], mask)
            structured = tf.nest.pack_sequence_as(y_pred, preds)
            loss, output_losses = loss_fn(unit.get("y"), structured, unit.get("sample_weight"))
            loss = tf.reshape(tf.cast(loss, tf.float32), [])
            scaled = loss * scale if scale != 1.0 else loss
        grads = tape.gradient(scaled, preds, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        output_losses = [tf.reshape(tf.cast(o, tf.float32), []) for o in output_losses]
        return loss, output_losses, grads

    losses, output_losses, grads = tf.vectorized_map(one, units)
    grads = [tf.reshape(g, tf.shape(t)) for g, t in zip(grads, flat, strict=True)]
    return losses, list(output_losses), grads


def _fallback(request: engines.ClipRequest, name: str, reason: str) -> engines.ClippedBatch:
    key = (id(request.model), reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"engine={name!r} cannot give per-example gradients for this model ({reason}); "
            "using the vectorized engine instead.",
            stacklevel=4,
        )
    return engines.vectorized_engine(request)


def _run(request: engines.ClipRequest, mode: str) -> engines.ClippedBatch:
    model = request.model
    if not model.built:
        return _fallback(request, mode, "the model is not built")
    reason = layer_safety.unvouched_reason(model) or layer_rules.unsupported_reason(model)
    if reason is None:
        reason = _probe(model, request.x)
    if reason is not None:
        return _fallback(request, mode, reason)

    variables = list(model.trainable_variables)
    index = {id(v): i for i, v in enumerate(variables)}
    seeds = per_example._seed_generators(model)
    mapping = [(sg.state, tf.convert_to_tensor(sg.state.value)) for sg in seeds]
    ghost = mode == "ghost"
    scale = _loss_scale(model)
    with tf.GradientTape(persistent=ghost, watch_accessed_variables=ghost) as tape:
        forward = _Forward(model, tape.watch)
        y_pred, scope = forward.run(request.x, mapping)
    losses, output_losses, output_grads = per_example_losses(
        request.loss_fn, request.y, y_pred, request.sample_weight, request.num_units, scale
    )
    outputs = tf.nest.flatten(y_pred)
    static_batch = tf.get_static_value(request.num_units)
    reason = forward.problem(scope, None if static_batch is None else int(static_batch))
    if reason is not None:
        return _fallback(request, mode, reason)

    records = forward.records
    watched = [t for r in records for t in r.watched.values()]
    grads = tape.gradient(
        outputs,
        watched,
        output_gradients=output_grads,
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    position = 0
    for record in records:
        for name in record.watched:
            grad = grads[position]
            record.grads[name] = grad if scale == 1.0 else tf.cast(grad, tf.float32) / scale
            position += 1

    # Norms, per variable, then per group.
    batch = tf.shape(losses)[0]
    squared: list[tf.Tensor | None] = [None] * len(variables)
    plans = []  # (layer, rule, record or None, per-example sums or None)
    by_layer: dict[int, list[layer_rules.Record]] = {}
    for record in records:
        by_layer.setdefault(id(record.layer), []).append(record)
    for layer_records in by_layer.values():
        layer, rule = layer_records[0].layer, layer_records[0].rule
        record = layer_records[0] if len(layer_records) == 1 else rule.merge(layer, layer_records)
        if record is not None:
            norms = rule.squared_norms(layer, record)
            plans.append((layer, rule, record, None))
        else:
            per_layer = [rule._per_example(layer, r) for r in layer_records]
            summed = [tf.add_n(list(gs)) for gs in zip(*per_layer, strict=True)]
            norms = [layer_rules.squared_rows(g) for g in summed]
            plans.append((layer, rule, None, summed))
        for v, n in zip(rule.variables(layer), norms, strict=True):
            if id(v) in index:
                squared[index[id(v)]] = tf.cast(n, tf.float32)
    squared = [tf.zeros([batch]) if s is None else s for s in squared]
    groups = request.groups
    norms = tf.stack([tf.sqrt(tf.add_n([squared[i] for i in g])) for g in groups], axis=1)
    factors = request.config.clip_factors(norms, num_groups=len(groups))
    finite = tf.reduce_all(tf.math.is_finite(norms), axis=1, keepdims=True)
    factors = tf.where(finite, factors, 0.0)
    group_of = {i: k for k, g in enumerate(groups) for i in g}

    all_finite = tf.reduce_all(finite)

    def bk_sums() -> list[tf.Tensor]:
        sums: list[tf.Tensor | None] = [None] * len(variables)
        for layer, rule, record, summed in plans:
            layer_vars = rule.variables(layer)
            c = [
                factors[:, group_of[index[id(v)]]] if id(v) in index else tf.zeros([batch])
                for v in layer_vars
            ]
            if record is not None:
                record.all_finite = all_finite
                parts = rule.clipped_sum(layer, record, c)
            else:
                parts = [
                    layer_rules.weighted_sum(g, ci, all_finite)
                    for g, ci in zip(summed, c, strict=True)
                ]
            for v, s in zip(layer_vars, parts, strict=True):
                if id(v) in index:
                    sums[index[id(v)]] = tf.reshape(tf.cast(s, tf.float32), v.shape)
        return [tf.zeros(v.shape, tf.float32) if s is None else s for s, v in zip(sums, variables)]

    if not ghost:
        clipped = bk_sums()
    else:

        def second_pass() -> list[tf.Tensor]:
            sums: list[tf.Tensor | None] = [None] * len(variables)
            for k, group in enumerate(groups):
                c = tf.stop_gradient(factors[:, k])
                grads_k = tape.gradient(
                    outputs,
                    [variables[i] for i in group],
                    output_gradients=[
                        tf.cast(layer_rules.scale_rows(g, c, all_finite), g.dtype)
                        for g in output_grads
                    ],
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
                for i, g in zip(group, grads_k, strict=True):
                    sums[i] = tf.cast(tf.convert_to_tensor(g), tf.float32) / scale
            return sums

        # A dropped example (NaN/Inf) would poison the second pass with 0 * NaN: then
        # take the book-keeping sums, which zero its rows exactly.
        clipped = tf.cond(all_finite, second_pass, bk_sums)
        del tape

    for sg in seeds:  # advance as a normal forward pass would
        new = scope.get_current_value(sg.state)
        if new is not None:
            sg.state.assign(new)
    return engines.ClippedBatch(clipped, norms, losses, output_losses, y_pred)


def _loss_scale(model: keras.Model) -> float:
    """The vectorized engine's static loss scale for float16 models (else 1): the
    backward pass runs in float16, and small output gradients would underflow. Norms
    and sums are unscaled in float32, so gamma and R never see the scale."""
    if not any(
        getattr(layer, "compute_dtype", None) == "float16"
        for layer in layer_rules.all_layers(model)
    ):
        return 1.0
    scale_fn = getattr(per_example, "float16_loss_scale", None)
    return float(scale_fn()) if scale_fn is not None else 2.0**8


def bk_engine(request: engines.ClipRequest) -> engines.ClippedBatch:
    """Book-keeping: norms and clipped sum from one forward and one backward pass."""
    return _run(request, "bk")


def ghost_engine(request: engines.ClipRequest) -> engines.ClippedBatch:
    """Ghost clipping: ghost norms, then a second backward pass of ``sum_i c_i L_i``."""
    return _run(request, "ghost")


def supports(model: keras.Model, num_microbatches: int | None) -> bool:
    """Whether the fast engines serve ``model``: per-example (no microbatches), every
    layer and op vouched to treat examples independently (``layer_safety``; the one
    batched forward pass would otherwise mix them), and every trainable variable owned
    by a layer with a rule."""
    return unsupported_reason(model, num_microbatches) is None


def unsupported_reason(model: keras.Model, num_microbatches: int | None) -> str | None:
    """Why the fast engines cannot serve ``model``, or None (see :func:`supports`)."""
    if num_microbatches is not None:
        return "num_microbatches is set (the fast engines clip single examples)"
    return layer_safety.unvouched_reason(model) or layer_rules.unsupported_reason(model)


supports.explain = unsupported_reason  # engines.select_engine says why it refuses


engines.register_engine("ghost", ghost_engine, supports, preferred=False)
engines.register_engine("bk", bk_engine, supports, preferred=True)

"""Fast clipping engines: book-keeping (``"bk"``) and ghost norms (``"ghost"``, a mode of bk).

Both run the model ONCE on the whole batch, with the layers that own trainable
variables run through their rules (``layer_rules``), which save the layer inputs and
mark the layer outputs ``z``. Each example's loss ``L_i`` comes from the batched
predictions (the unit loss vectorized over the examples, masks and sample weights
kept), and one backward pass of ``sum_i L_i`` gives ``b = dL/dz`` for every such layer;
row ``i`` of ``b`` is example ``i``'s, since no layer mixes examples. Then per-example
norms AND the clipped sum ``sum_i c_i g_i`` come from ``a`` and ``b`` layer by layer
(e.g. ``a^T (c * b)``; book-keeping, Bu et al. 2023). No second backward pass.

- ``"bk"``: each linear layer takes ghost or explicit norms, whichever costs less
  (``rules.numerics.use_ghost``).
- ``"ghost"``: ghost norms (the Gram form of Li et al. 2022) wherever a rule has one.
  Slower than ``"bk"``; kept as an independent check of the Gram norms. It no longer
  takes its clipped sum by a second backward pass of ``sum_i c_i L_i`` (ghost clipping's
  second pass): that pass rounds differently from the one whose output gradients set
  the norms, and an example whose gradient cancels to 0 in the first could add far
  more than its sensitivity in the second (``norm_bounds_test.BackwardRoundingTest``).

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
import dataclasses
import warnings
from typing import Any

import keras
import tensorflow as tf

from tf_autoclip import _keras_compat
from tf_autoclip import clipping as clipping_lib
from tf_autoclip import rules as layer_rules
from tf_autoclip.engines import registry, vectorized
from tf_autoclip.engines.bk_forward import _Forward, _probe, _ReadTracker
from tf_autoclip.engines.plan import Plan, plan_for
from tf_autoclip.rules import numerics

_warned: set[tuple[int, str]] = set()


@dataclasses.dataclass
class _Pass:
    """The one batched forward pass, and each example's loss on top of it."""

    forward: _Forward
    scope: _ReadTracker
    tape: tf.GradientTape
    seeds: list[keras.random.SeedGenerator]
    y_pred: Any
    outputs: list[tf.Tensor]  # tf.nest.flatten(y_pred)
    losses: tf.Tensor
    output_losses: list[tf.Tensor]
    output_grads: list[tf.Tensor]  # d(scale * L_i)/d outputs
    scale: float


def _run(request: registry.ClipRequest, mode: str) -> registry.ClippedBatch:
    plan = plan_for(request.model)  # read by every step below
    reason = _fallback_reason(request, plan)
    if reason is None:
        variables = list(request.model.trainable_variables)
        run = _forward_pass(request, plan)
        reason = _fallback_reason(request, plan, run)
    if reason is not None:
        return _fallback(request, mode, reason)

    _layer_output_grads(run)
    index = {id(v): i for i, v in enumerate(variables)}
    batch = tf.shape(run.losses)[0]
    method = numerics.norm_method("ghost") if mode == "ghost" else contextlib.nullcontext()
    with numerics.low_memory(getattr(request.model, "_dp_low_memory", False)), method:
        squared, plans = _layer_norms(run.forward.records, variables, index, batch)
    groups = request.groups
    norms, factors = clipping_lib.norms_and_factors(squared, groups, request.config)
    all_finite = tf.reduce_all(tf.math.is_finite(norms))
    clipped = _bk_sums(plans, variables, index, groups, factors, all_finite, batch)
    for sg in run.seeds:  # advance as a normal forward pass would
        new = run.scope.get_current_value(sg.state)
        if new is not None:
            sg.state.assign(new)
    return registry.ClippedBatch(clipped, norms, run.losses, run.output_losses, run.y_pred)


def _fallback_reason(
    request: registry.ClipRequest, plan: Plan, run: _Pass | None = None
) -> str | None:
    """Why this batch must be computed by the vectorized engine, or None. Without
    ``run``: what the model itself rules out (checked before any forward pass); with
    it: what tracing that batched forward pass found."""
    model = request.model
    if run is None:
        if not model.built:
            return "the model is not built"
        return plan.unsupported or _probe(model, request.x, plan)
    static_batch = tf.get_static_value(request.num_units)
    return run.forward.problem(run.scope, None if static_batch is None else int(static_batch))


def _fallback(request: registry.ClipRequest, name: str, reason: str) -> registry.ClippedBatch:
    key = (id(request.model), reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"engine={name!r} cannot give per-example gradients for this model ({reason}); "
            "using the vectorized engine instead.",
            stacklevel=4,
        )
    return vectorized.vectorized_engine(request)


def _forward_pass(request: registry.ClipRequest, plan: Plan) -> _Pass:
    """Run the model once on the batch through the rules, then each example's loss."""
    model = request.model
    seeds = _keras_compat.seed_generators(model)
    mapping = [(sg.state, tf.convert_to_tensor(sg.state.value)) for sg in seeds]
    scale = _loss_scale(model)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        forward = _Forward(model, tape.watch, plan)
        y_pred, scope = forward.run(request.x, mapping)
    losses, output_losses, output_grads = per_example_losses(
        request.loss_fn, request.y, y_pred, request.sample_weight, request.num_units, scale
    )
    outputs = tf.nest.flatten(y_pred)
    return _Pass(
        forward, scope, tape, seeds, y_pred, outputs, losses, output_losses, output_grads, scale
    )


def _layer_output_grads(run: _Pass) -> None:
    """One backward pass of ``sum_i L_i`` to every watched layer output: ``record.grads``."""
    records = run.forward.records
    watched = [t for r in records for t in r.watched.values()]
    grads = run.tape.gradient(run.outputs, watched, output_gradients=run.output_grads)
    position = 0
    for record in records:
        mine = grads[position : position + len(record.watched)]
        position += len(record.watched)
        # A call whose outputs the loss does not depend on adds nothing: it is left out
        # (a [B, ...] tensor of zeros would be folded by grappler into a constant that
        # the step's graph holds for its lifetime).
        record.unconnected = all(g is None for g in mine)
        for (name, tensor), grad in zip(record.watched.items(), mine, strict=True):
            if grad is None:
                grad = tf.zeros_like(tensor)
            record.grads[name] = grad if run.scale == 1.0 else tf.cast(grad, tf.float32) / run.scale


def _layer_norms(
    records: list[layer_rules.Record],
    variables: list[Any],
    index: dict[int, int],
    batch: tf.Tensor,
) -> tuple[list[tf.Tensor], list[tuple]]:
    """Each variable's squared per-example norms ``[B]``, and per layer a plan for the
    clipped sum: ``(layer, rule, record or None, per-example sums or None)``."""
    squared: list[tf.Tensor | None] = [None] * len(variables)
    plans = []
    by_layer: dict[int, list[layer_rules.Record]] = {}
    for record in records:
        if not record.unconnected:
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
    return [tf.zeros([batch]) if s is None else s for s in squared], plans


def _bk_sums(plans, variables, index, groups, factors, all_finite, batch) -> list[tf.Tensor]:
    """Book-keeping: the clipped sum of every variable from its layer's saved tensors."""
    group_of = {i: k for k, g in enumerate(groups) for i in g}
    # One slice per group, not per variable (fewer ops in the step's graph).
    columns = [factors[:, k] for k in range(len(groups))]
    sums: list[tf.Tensor | None] = [None] * len(variables)
    for layer, rule, record, summed in plans:
        layer_vars = rule.variables(layer)
        c = [
            columns[group_of[index[id(v)]]] if id(v) in index else tf.zeros([batch])
            for v in layer_vars
        ]
        if record is not None:
            record.all_finite = all_finite
            parts = rule.clipped_sum(layer, record, c)
        else:
            parts = [
                layer_rules.weighted_sum(g, ci, all_finite) for g, ci in zip(summed, c, strict=True)
            ]
        for v, s in zip(layer_vars, parts, strict=True):
            if id(v) in index:
                s = tf.cast(s, tf.float32)
                sums[index[id(v)]] = s if s.shape == v.shape else tf.reshape(s, v.shape)
    return clipping_lib.zeros_where_missing(sums, variables)


def _loss_scale(model: keras.Model) -> float:
    """The vectorized engine's static loss scale for float16 models (else 1): the
    backward pass runs in float16, and small output gradients would underflow. Norms
    and sums are unscaled in float32, so gamma and R never see the scale."""
    if not any(
        getattr(layer, "compute_dtype", None) == "float16"
        for layer in layer_rules.all_layers(model)
    ):
        return 1.0
    return float(vectorized.float16_loss_scale())


def per_example_losses(
    loss_fn: registry.LossFn,
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
    masks = [_keras_compat.get_mask(t) for t in flat]
    slots = [i for i, m in enumerate(masks) if m is not None]
    data = {"y_pred": flat, "masks": [masks[i] for i in slots]}
    if y is not None:
        data["y"] = y
    if sample_weight is not None:
        data["sample_weight"] = sample_weight
    units = vectorized.split_into_units(data, batch_size)

    def one(unit):
        preds = list(unit["y_pred"])
        with tf.GradientTape() as tape:
            tape.watch(preds)
            for slot, mask in zip(slots, unit["masks"], strict=True):
                _keras_compat.set_mask(preds[slot], mask)
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


def bk_engine(request: registry.ClipRequest) -> registry.ClippedBatch:
    """Book-keeping: norms and clipped sum from one forward and one backward pass."""
    return _run(request, "bk")


def ghost_engine(request: registry.ClipRequest) -> registry.ClippedBatch:
    """Book-keeping with ghost norms wherever a rule has them (see the module docstring)."""
    return _run(request, "ghost")


def supports(model: keras.Model, num_microbatches: int | None) -> bool:
    """Whether the fast engines serve ``model``: per-example (no microbatches), every
    layer and op vouched to treat examples independently (``layer_safety``; the one
    batched forward pass would otherwise mix them), and every trainable variable owned
    by a layer with a rule."""
    return unsupported_reason(model, num_microbatches) is None


def unsupported_reason(
    model: keras.Model, num_microbatches: int | None, user_level: bool = False
) -> str | None:
    """Why the fast engines cannot serve ``model``, or None (see :func:`supports`).

    ``user_level``: clipping per user (``user_ids``) is never served by them
    (``registry.USER_LEVEL_REASON``: per-user norms need cross-example terms)."""
    if user_level:
        return registry.USER_LEVEL_REASON
    if num_microbatches is not None:
        return "num_microbatches is set (the fast engines clip single examples)"
    return plan_for(model).unsupported


supports.explain = unsupported_reason  # registry.select_engine says why it refuses


registry.register_engine("ghost", ghost_engine, supports, preferred=False)
registry.register_engine("bk", bk_engine, supports, preferred=True)

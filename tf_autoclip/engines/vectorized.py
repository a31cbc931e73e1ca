"""The vectorized per-example gradient engine (``"vectorized"``, ``tf.vectorized_map``).

The batch is split into ``M`` units (one example each, or ``num_microbatches``
microbatches; for user-level clipping, examples whose gradients are then summed per
user, see ``vectorized_engine``); for every unit the model's forward pass, loss and gradient run on
that unit alone, vectorized over the units by ``tf.vectorized_map``. Each unit sees
only its own examples, so its gradient depends on nothing else in the batch.

Four details make this correct for real Keras models:

- Randomness (Dropout, GaussianNoise, ...): the model's seed generators are read
  through a ``keras.StatelessScope`` that gives unit ``m`` its own seed, so every
  example gets its own dropout mask, and the generators advance once per step.
  State updates made inside the per-example pass (e.g. normalization statistics) are
  discarded: they would release data without noise.
- Activity regularizers and ``add_loss`` terms depend on the example, so they are
  part of the unit's loss (and clipped). Weight regularizers are not: see
  ``training.py``. A unit whose sample weights are all 0 drops them too, so it
  contributes nothing: the padding rows of Poisson batches (weight 0, their number
  depends on the sample) would otherwise add up to one unit of sensitivity each.
- oneDNN hazard: on x86 TensorFlow builds with oneDNN, the batched matrix products
  that ``vectorized_map`` makes from the backward pass of ``EinsumDense`` (so also
  ``MultiHeadAttention``) abort the process (``dnnl::error: could not create a
  primitive`` / ``free(): invalid pointer``, seen with TF 2.21). XLA compiles these
  products itself, without oneDNN, so for such models the per-example computation is
  compiled with XLA (``jit_per_example=None`` decides this automatically).
- Channels-first bias adds: TensorFlow's ``pfor`` converter for ``BiasAddGrad`` with
  ``data_format="NCHW"`` sums the vectorized gradient over the fixed axes ``[1, 3, 4]``,
  i.e. it assumes a rank-4 ``[N, C, H, W]`` gradient. Keras emits NCHW ``BiasAdd`` of
  any rank >= 3 (``keras.ops.add`` turns ``x + bias`` into ``tf.nn.bias_add`` whenever
  the bias lies on axis 1: ``Conv1D(data_format="channels_first")``, ``EinsumDense``
  with an early bias axis, ...). For rank 3 the reduction fails (``Invalid reduction
  dimension 4 for input with 4 dimensions``), for rank 5 it leaves a spatial axis in the
  bias gradient. While the unit pass is vectorized, ``rank_general_pfor_converters``
  installs a converter that sums over the batch and every spatial axis, whatever the
  rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from tf_autoclip import _keras_compat
from tf_autoclip import clipping as clipping_lib
from tf_autoclip.engines.registry import ClippedBatch, ClipRequest, LossFn

# Under their former names, which ``per_example`` re-exports.
_all_layers = _keras_compat.all_layers
_seed_generators = _keras_compat.seed_generators

# Layers whose per-example backward pass hits the oneDNN batch-matmul abort.
_ONEDNN_HAZARD_LAYERS = (keras.layers.EinsumDense, keras.layers.MultiHeadAttention)
# Seeds drawn inside one unit step s1 by 1 per draw; units are spaced this far apart.
_DRAWS_PER_UNIT = 1 << 16


@dataclasses.dataclass
class PerUnitResult:
    """What the engine returns: one row per unit (example or microbatch)."""

    # Each [M, *variable.shape], float32; None for a variable the loss does not depend on
    # (its per-unit gradients are 0): a [M, *shape] tensor of zeros would be folded by
    # grappler into a constant that the step's graph holds for its lifetime.
    gradients: list[tf.Tensor | None]
    losses: tf.Tensor  # [M], the loss of each unit (weighted, with activity terms)
    output_losses: list[tf.Tensor]  # per model output, [M] each (for loss metrics)
    y_pred: Any  # model outputs, batch-major as in a normal forward pass


def split_into_units(data: Any, num_units: tf.Tensor | int) -> Any:
    """Reshape every tensor in ``data`` from ``[B, ...]`` to ``[M, B // M, ...]``."""

    def split(t):
        if t is None:
            return None
        t = tf.convert_to_tensor(t)
        return tf.reshape(t, tf.concat([[num_units, -1], tf.shape(t)[1:]], axis=0))

    return tf.nest.map_structure(split, data)


def merge_units(data: Any) -> Any:
    """Inverse of ``split_into_units``: ``[M, k, ...]`` back to ``[M * k, ...]``."""

    def merge(t):
        shape = tf.shape(t)
        return tf.reshape(t, tf.concat([[shape[0] * shape[1]], shape[2:]], axis=0))

    return tf.nest.map_structure(merge, data)


def needs_xla(model: keras.Model) -> bool:
    """Whether the per-example pass of ``model`` must avoid oneDNN (see module doc)."""
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() in ("0", "false"):
        return False
    return any(isinstance(layer, _ONEDNN_HAZARD_LAYERS) for layer in _all_layers(model))


def per_unit_gradients(
    model: keras.Model,
    loss_fn: LossFn,
    x: Any,
    y: Any,
    sample_weight: Any,
    num_units: tf.Tensor | int,
    jit: bool | None = None,
) -> PerUnitResult:
    """Gradients of each unit's loss, vectorized over the units.

    Args:
      model: a built Keras model.
      loss_fn: ``(y_true, y_pred, sample_weight) -> (loss, per_output_losses)`` for
        one unit; ``loss`` a scalar.
      x, y, sample_weight: the batch (nested structures, batch-major).
      num_units: ``M``; the batch size for per-example gradients.
      jit: compile the per-example computation with XLA; ``None`` decides by
        ``needs_xla(model)``.
    """
    seed_generators = _keras_compat.seed_generators(model)
    base_seeds = [tf.convert_to_tensor(sg.state.value) for sg in seed_generators]
    # vectorized_map takes no None: carry only the parts that are present.
    present = {
        k: v for k, v in (("x", x), ("y", y), ("sample_weight", sample_weight)) if v is not None
    }
    units = split_into_units(present, num_units)
    indices = tf.range(tf.shape(tf.nest.flatten(units["x"])[0])[0], dtype=tf.int64)
    one_unit, unconnected = _unit_step(model, loss_fn, seed_generators, base_seeds)

    def vectorized(indices, units):
        return _map_over_units(model, one_unit, indices, units)

    if jit is None:
        jit = needs_xla(model)
    if jit:
        vectorized = tf.function(vectorized, jit_compile=True, autograph=False)
    with rank_general_pfor_converters():  # pfor converts while `vectorized` is traced
        grads, losses, output_losses, y_pred = vectorized(indices, units)
    grads = [None if i in unconnected else g for i, g in enumerate(grads)]
    for sg in seed_generators:  # advance once per step, as a normal forward pass would
        sg.next()
    return PerUnitResult(grads, losses, list(output_losses), merge_units(y_pred))


def _unit_step(
    model: keras.Model,
    loss_fn: LossFn,
    seed_generators: list[keras.random.SeedGenerator],
    base_seeds: list[tf.Tensor],
) -> tuple[Callable, set[int]]:
    """The function vectorized over the units:
    ``(index, unit) -> (grads, loss, output_losses, y_pred)`` of that unit alone, and the
    indices of the variables the loss does not depend on (filled while it is traced)."""
    variables = list(model.trainable_variables)
    call_has_training = _keras_compat.call_has_training_arg(model)
    loss_scale = float16_loss_scale() if _computes_in_float16(model) else 1.0
    unconnected: set[int] = set()  # while tracing: variables the loss does not depend on

    def one_unit(args):
        index, unit = args
        xs, ys, sws = unit["x"], unit.get("y"), unit.get("sample_weight")
        # Unit m draws from seed (s0 + m + 1, s1 * 2^16 + draw): distinct per unit and step.
        offset = tf.stack([index + 1, tf.zeros_like(index)])
        mapping = [
            (
                sg.state,
                seed * tf.constant([1, _DRAWS_PER_UNIT], seed.dtype) + tf.cast(offset, seed.dtype),
            )
            for sg, seed in zip(seed_generators, base_seeds, strict=True)
        ]
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            with tf.GradientTape() as tape:
                y_pred = model(xs, training=True) if call_has_training else model(xs)
                loss, output_losses = loss_fn(ys, y_pred, sws)
                loss = tf.cast(loss, tf.float32)
                for extra in scope.losses:
                    loss += _unless_weightless(tf.cast(tf.reduce_sum(extra), tf.float32), sws)
                scaled_loss = loss * loss_scale
            grads = tape.gradient(scaled_loss, variables)
        unconnected.update(i for i, g in enumerate(grads) if g is None)
        # Unscaled in float32 before any norm: gamma and R never see the loss scale. An
        # unconnected variable gets an empty placeholder (vectorized_map takes no None).
        grads = [
            tf.zeros([0], tf.float32)
            if g is None
            else tf.cast(tf.convert_to_tensor(g), tf.float32) / loss_scale
            for g in grads
        ]
        output_losses = [tf.cast(tf.reshape(o, []), tf.float32) for o in output_losses]
        return grads, loss, output_losses, y_pred

    return one_unit, unconnected


def _unless_weightless(term: tf.Tensor, sample_weight: Any) -> tf.Tensor:
    """``term``, or 0 for a unit whose sample weights are all 0 (e.g. a padding row)."""
    flat = [w for w in tf.nest.flatten(sample_weight) if w is not None]
    weights = [tf.reshape(tf.convert_to_tensor(w), [-1]) for w in flat]
    if not weights:
        return term
    any_weight = tf.reduce_any(tf.not_equal(tf.concat(weights, 0), 0))
    return tf.where(any_weight, term, tf.zeros_like(term))


def _map_over_units(model: keras.Model, one_unit: Callable, indices: tf.Tensor, units: Any):
    """``tf.vectorized_map(one_unit, (indices, units))`` with recurrent layers unrolled."""
    with _unrolled_recurrent_layers(model):
        try:
            return tf.vectorized_map(one_unit, (indices, units))
        except ValueError as error:
            if "Cannot unroll a RNN" not in str(error):
                raise
            raise ValueError(
                "Per-example gradients of recurrent layers need a sequence length fixed "
                "when the model is traced: pad sequences to one length (e.g. "
                "`padded_batch(..., padded_shapes=...)` or Input((T,))) and mask the padding."
            ) from error


def float16_loss_scale() -> float:
    """The static loss scale of per-example gradients under ``mixed_float16``.

    Static on purpose: a dynamic loss scale would depend on whether earlier examples
    overflowed, and through it on the data, outside the sensitivity bound. An example
    whose scaled gradient overflows is dropped from the sum like any non-finite one.
    Per-example losses are not averaged over the batch, so a moderate scale suffices.
    """
    return 2.0**8


def _computes_in_float16(model: keras.Model) -> bool:
    return any(getattr(layer, "compute_dtype", None) == "float16" for layer in _all_layers(model))


@contextlib.contextmanager
def _unrolled_recurrent_layers(model: keras.Model):
    """Trace recurrent layers unrolled: ``vectorized_map`` cannot differentiate
    through the ``tf.while_loop`` they otherwise use (a ``variant`` TypeError, or an
    XLA compile failure). The unrolled loop computes the same function; it needs a
    sequence length known when the model is traced."""
    rnns = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.RNN)]
    saved = [layer.unroll for layer in rnns]
    for layer in rnns:
        layer.unroll = True
    try:
        yield
    finally:
        for layer, unroll in zip(rnns, saved, strict=True):
            layer.unroll = unroll


def _bias_add_grad_any_rank(pfor_input: Any) -> Any:
    """pfor converter for ``BiasAddGrad`` of any rank (TensorFlow's assumes NCHW is 4-D).

    The vectorized ``out_backprop`` is ``[units, N, C, *spatial]`` (NCHW) or
    ``[units, N, *spatial, C]`` (NHWC); the bias gradient of each unit sums over ``N``
    and every spatial axis, leaving ``[units, C]``.
    """
    grad = pfor_input.stacked_input(0)
    shape = tf.shape(grad)
    if pfor_input.get_attr("data_format") == b"NCHW":
        # [units, N, C, *spatial] -> [units, N, C, prod(spatial)] (1 if no spatial axis).
        grad = tf.reshape(grad, tf.concat([shape[:3], [-1]], axis=0))
        output = tf.reduce_sum(grad, axis=[1, 3])
    else:
        grad = tf.reshape(grad, tf.stack([shape[0], -1, shape[-1]]))
        output = tf.reduce_sum(grad, axis=1)
    return _keras_compat.pfor_wrap(output, True)


# Converters of TensorFlow's pfor that are wrong for some ranks, and their replacements.
_PFOR_CONVERTER_FIXES = {"BiasAddGrad": _bias_add_grad_any_rank}
_pfor_fix_lock = threading.Lock()
_pfor_fix_users = 0
_pfor_fix_saved: dict[str, Any] = {}


@contextlib.contextmanager
def rank_general_pfor_converters():
    """Install ``_PFOR_CONVERTER_FIXES`` in pfor's registry while the block runs.

    Scoped (and reference-counted across threads), so the rest of the process keeps
    TensorFlow's converters; the replacements agree with them wherever those are right.
    Without the private registry (another TensorFlow version) this does nothing.
    """
    global _pfor_fix_users
    registry = _keras_compat.pfor_converter_registry()
    if registry is None:
        yield
        return
    with _pfor_fix_lock:
        if _pfor_fix_users == 0:
            for op_type, converter in _PFOR_CONVERTER_FIXES.items():
                _pfor_fix_saved[op_type] = registry.get(op_type)
                registry[op_type] = converter
        _pfor_fix_users += 1
    try:
        yield
    finally:
        with _pfor_fix_lock:
            _pfor_fix_users -= 1
            if _pfor_fix_users == 0:
                for op_type, saved in _pfor_fix_saved.items():
                    if saved is None:
                        registry.pop(op_type, None)
                    else:
                        registry[op_type] = saved
                _pfor_fix_saved.clear()


def vectorized_engine(request: ClipRequest) -> ClippedBatch:
    """Materialize per-unit gradients with ``tf.vectorized_map``, then clip and sum.

    User-level (``request.user_segments`` set): per-example gradients, summed per user
    (``user_gradients``), then clipped per user; ``losses`` stay per example.
    """
    user_level = request.user_segments is not None
    units = per_unit_gradients(
        request.model, request.loss_fn, request.x, request.y, request.sample_weight,
        _batch_rows(request.x) if user_level else request.num_units,
        jit=request.jit_per_example,
    )  # fmt: skip
    gradients = units.gradients
    if user_level:
        gradients = user_gradients(gradients, request.user_segments, request.num_units)
    clipped_sum, norms = clipping_lib.clip_and_sum(
        gradients, request.groups, request.config, num_units=request.num_units
    )
    clipped_sum = clipping_lib.zeros_where_missing(clipped_sum, request.model.trainable_variables)
    return ClippedBatch(clipped_sum, norms, units.losses, units.output_losses, units.y_pred)


vectorized_engine.serves_user_level = True  # registry.serves_user_level


def user_gradients(
    per_example: list[tf.Tensor | None], user_segments: tf.Tensor, num_users: tf.Tensor | int
) -> list[tf.Tensor | None]:
    """Each user's summed gradient ``g_u = sum_{i in u} g_i``: ``[B, ...] -> [U, ...]``.

    A non-finite example makes its user's sum non-finite, so clipping drops the whole
    user (factor 0), which keeps the user's contribution within the sensitivity.

    >>> g = [tf.constant([[1.0], [2.0], [4.0]])]
    >>> user_gradients(g, tf.constant([0, 1, 0]), 2)[0].numpy().ravel().tolist()
    [5.0, 2.0]
    """
    return [
        None if g is None else tf.math.unsorted_segment_sum(g, user_segments, num_users)
        for g in per_example
    ]


def _batch_rows(x: Any) -> tf.Tensor:
    return tf.shape(tf.nest.flatten(x)[0])[0]

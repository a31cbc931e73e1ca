"""Per-layer rules for the fast clipping engines (``"bk"`` and ``"ghost"``).

The fast engines run the model once on the whole batch and take ONE backward pass of
``sum_i L_i`` to the outputs ``z`` of the layers that own trainable variables. No layer
mixes examples, so row ``i`` of ``b = d(sum_j L_j)/dz`` is ``dL_i/dz_i``, and together
with the layer's saved inputs it gives, for that layer alone:

- each example's squared gradient norm, per variable: either the *ghost* form
  ``<a_i a_i^T, b_i b_i^T>`` (cost ~T^2 per example, T the rows an example has, e.g.
  sequence positions or conv output pixels) or from the explicit per-example gradient
  ``a_i^T b_i`` (cost and memory ~T*D*P and D*P per example, for D inputs and P
  outputs). ``"mixed"`` (the default, like fastDP's mixed mode) takes the explicit
  gradient where it is no larger than the layer's saved activations and output
  gradients (``D*P <= T*(D+P)``; then it is also fewer operations), ghost norms
  elsewhere (e.g. every dense layer on 2-D inputs, where T = 1);
- the clipped sum ``sum_i c_i g_i``, e.g. ``a^T (c * b)`` for a dense kernel.

A rule is a :class:`LayerRule` registered for a layer class with
:func:`register_layer_rule`. Rules here: ``Dense``, ``EinsumDense`` (so
``MultiHeadAttention``), ``Embedding``, ``Conv1D``, ``Conv2D``, ``LayerNormalization``,
``GroupNormalization``, ``RMSNormalization``. A model with a trainable variable that no
rule owns is not supported by the fast engines (:func:`unsupported_reason`), and
``engine="auto"`` then uses the vectorized engine.

Writing a rule for your own layer (``y = x * w``, ``w`` of shape ``[d]``)::

    class ScaleRule(tf_autoclip.layer_rules.LayerRule):
        def forward(self, layer, record, call, x):
            record.save(x=x)                        # batch-major tensors only
            return record.watch("y", call(x))      # the engine takes dL/dy
        def per_example_gradients(self, layer, record):
            x, b = record.saved["x"], record.grads["y"]
            return [tf.reduce_sum(tf.reshape(x * b, [tf.shape(x)[0], -1, x.shape[-1]]), 1)]

    tf_autoclip.layer_rules.register_layer_rule(Scale, ScaleRule())

``per_example_gradients`` returns one ``[B, *variable.shape]`` tensor per variable of
``variables(layer)`` (default: the layer's own trainable variables, in creation order);
the default ``squared_norms`` and ``clipped_sum`` are computed from it. Override them
for speed (ghost norms, no per-example tensor).
"""

from __future__ import annotations

import contextlib
import string
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import ops

NORM_METHODS = ("mixed", "ghost", "explicit")
_settings = {"norm_method": "mixed"}


@contextlib.contextmanager
def norm_method(method: str):
    """Force how linear layers get per-example norms while tracing: ``"mixed"`` (per
    layer, the cheaper in memory), ``"ghost"`` or ``"explicit"``. For tests and
    benchmarks; the result is the same up to rounding."""
    if method not in NORM_METHODS:
        raise ValueError(f"norm method must be one of {NORM_METHODS}, got {method!r}.")
    saved = _settings["norm_method"]
    _settings["norm_method"] = method
    try:
        yield
    finally:
        _settings["norm_method"] = saved


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
    seen, found = set(), []
    for v in list(layer._trainable_variables) + list(layer._non_trainable_variables):
        if id(v) not in seen:
            seen.add(id(v))
            found.append(v)
    return found


def all_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    return list(model._flatten_layers(include_self=True, recursive=True))


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


# ---------------------------------------------------------------------------
# Helpers for rules.


def f32(t: Any) -> tf.Tensor:
    return tf.cast(t, tf.float32)


def batch_rows(t: tf.Tensor, last: int = 1) -> tf.Tensor:
    """``[B, ..., *last dims]`` -> ``[B, T, prod(last dims)]`` (T: the middle dims, 1 if none)."""
    t = tf.convert_to_tensor(t)
    rank = len(t.shape)
    middle, tail = t.shape[1 : rank - last], t.shape[rank - last :]
    rows = _prod(middle) if None not in middle else None
    width = _prod(tail) if None not in tail else None
    if rows is not None and width is not None:
        return tf.reshape(t, [-1, rows, width])
    dyn = tf.shape(t)
    rows = rows if rows is not None else tf.reduce_prod(dyn[1 : rank - last])
    width = width if width is not None else tf.reduce_prod(dyn[rank - last :])
    return tf.reshape(t, tf.stack([dyn[0], rows, width]))


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _row_shape(c: tf.Tensor, rank: int) -> tf.Tensor:
    return tf.reshape(c, [-1] + [1] * (rank - 1))


def _finite_or_safe(finite: Any, fast: Callable, safe: Callable) -> tf.Tensor:
    """``fast()`` when every example is finite (``finite``: a scalar bool tensor), else
    ``safe()``, which zeroes dropped rows exactly; ``safe()`` when ``finite`` is None."""
    if finite is None:
        return safe()
    return tf.cond(finite, fast, safe)


def scale_rows(t: tf.Tensor, c: tf.Tensor, finite: Any = None) -> tf.Tensor:
    """Row ``i`` of ``t`` times ``c_i``, exactly 0 where ``c_i = 0`` (even for NaN rows)."""
    t = f32(t)
    c = _row_shape(c, len(t.shape))
    return _finite_or_safe(finite, lambda: t * c, lambda: tf.math.multiply_no_nan(t, c))


def keep_rows(t: tf.Tensor, c: tf.Tensor, finite: Any = None) -> tf.Tensor:
    """``t`` with the rows of dropped examples (``c_i = 0``) set to 0."""
    t = f32(t)
    return _finite_or_safe(
        finite, lambda: t, lambda: tf.where(_row_shape(c, len(t.shape)) != 0, t, tf.zeros_like(t))
    )


def squared_rows(g: tf.Tensor) -> tf.Tensor:
    """``[B, ...]`` -> ``[B]`` sums of squares."""
    g = f32(g)
    return tf.reduce_sum(tf.square(tf.reshape(g, [tf.shape(g)[0], -1])), axis=1)


def weighted_sum(per_example: tf.Tensor, c: tf.Tensor, finite: Any = None) -> tf.Tensor:
    """``sum_i c_i g_i`` with dropped (NaN) rows contributing exactly 0."""
    g = f32(per_example)

    def fast():
        flat = tf.reshape(g, [tf.shape(g)[0], -1])
        return tf.reshape(tf.linalg.matvec(flat, c, transpose_a=True), tf.shape(g)[1:])

    return _finite_or_safe(finite, fast, lambda: tf.reduce_sum(scale_rows(g, c), axis=0))


def use_ghost(rows: Any, in_dim: int, out_dim: int) -> Any:
    """Ghost norms for a linear map ``in_dim -> out_dim`` applied to ``rows`` rows per
    example? ``"mixed"``: when the explicit per-example gradient (``in*out`` numbers)
    would be larger than the layer's activations and output gradients
    (``rows*(in+out)``). A bool, or a boolean tensor when ``rows`` is dynamic."""
    method = _settings["norm_method"]
    if method != "mixed":
        return method == "ghost"
    return in_dim * out_dim > rows * (in_dim + out_dim)


# Norms that set clip factors must never underestimate what the clipped sum adds.
# Unit roundoffs: ghost norms are computed in float64, clipped sums in float32.
_U64 = 2.0**-53
_U32 = 2.0**-24
# Relative margin on every bound: covers the float64 -> float32 cast of the result and
# the engine's few float32 operations on it (sum over variables, sqrt, 1 / (n + gamma)).
_MARGIN = 1.0 + 2.0**-20


def _dim(t: tf.Tensor, axis: int) -> Any:
    """A static dimension as an int, else a dynamic one as a scalar tensor."""
    return t.shape[axis] if t.shape[axis] is not None else tf.shape(t)[axis]


def _f64(x: Any) -> tf.Tensor:
    return tf.cast(x, tf.float64)


def _row_norms(t: tf.Tensor) -> tf.Tensor:
    """``[N, T, K]`` -> ``[N, T]`` float64 row norms (exact inputs, float64 sums)."""
    return tf.sqrt(tf.reduce_sum(tf.square(_f64(t)), -1))


def norm_bound_sq(
    sq: tf.Tensor, U: tf.Tensor, rows: Any, kappa: Any, products: int = 1
) -> tf.Tensor:
    """Per-example squared norms (``[N]`` float64) that bound, from above, what the
    clipped sum adds for an example whose gradient is ``sum_t a_t g_t^T``.

    ``sq``: an estimate of the true squared norm, with ``|sq - true| <= kappa * U``;
    ``U = (sum_t |a_t| |g_t|)^2`` (float64; ``true <= U``). The clipped sum is another
    float32 computation of ``sum_t a_t (c g_t)`` (one matmul, or the ghost engine's
    backward pass): per entry a dot product over ``rows`` terms, whose rounding error
    is at most ``(rows + 1) * 2^-24 * sum_t |a_td| |c g_tp|``, so at most
    ``eta * c * sqrt(U)`` in norm with ``eta = (rows + 4) * 2^-24``. When rows cancel
    this is large next to the true norm, so it is added to the norm. ``products``
    counts such float32 products in the norm itself (1: an explicit gradient).
    """
    U = U * (1.0 + kappa)  # U itself was rounded
    sq = tf.maximum(tf.minimum(sq + kappa * U, U), 0.0)
    eta = (_f64(rows) + 4.0) * _U32
    bound = (tf.sqrt(sq) + products * eta * tf.sqrt(U)) * _MARGIN
    return tf.square(bound)


def to_f32_up(sq: tf.Tensor) -> tf.Tensor:
    """float64 -> float32, never rounding below (rounding is at most 2^-24 relative)."""
    return tf.cast(sq * (1.0 + 2.0**-22), tf.float32)


def _ghost_kappa(rows: Any, width: Any) -> tf.Tensor:
    """Rounding bound, in units of ``U``, of a float64 ghost norm over ``rows`` rows
    with ``width = D + P`` inner numbers: Gram entries err by ``gamma_D |a_t||a_s|`` and
    ``gamma_P |g_t||g_s|``, their products by one more rounding, and the sum of the
    ``T^2`` products by ``gamma_{T^2}`` of their absolute sum, which is ``<= U``; the
    ``2T + 8`` covers computing ``U`` and second-order terms. (A float64 sum of ``width``
    squares, e.g. an explicit gradient's, is covered too.)"""
    T = _f64(rows)
    return (_f64(width) + T * T + 2.0 * T + 8.0) * _U64


def _triangle_sq(a_norms: tf.Tensor, G: tf.Tensor) -> tf.Tensor:
    """``U = (sum_t |a_t| |g_t|)^2`` (float64 ``[N]``): the triangle inequality's bound
    of the squared norm of ``sum_t a_t g_t^T``, a sum of non-negative terms."""
    return tf.square(tf.reduce_sum(a_norms * _row_norms(G), 1))


def _gram_bound64(aa: tf.Tensor, a_norms: tf.Tensor, G: tf.Tensor, width: int) -> tf.Tensor:
    """:func:`norm_bound_sq` of the ghost form ``sum_{t,s} aa_ts (g_t.g_s)``, from the
    float64 Gram matrix ``aa [N,T,T]`` of the rows ``a_t`` and their norms ``[N,T]``."""
    G64 = _f64(G)
    ghost = tf.reduce_sum(aa * tf.matmul(G64, G64, transpose_b=True), [1, 2])
    rows = _dim(G, 1)
    return norm_bound_sq(ghost, _triangle_sq(a_norms, G), rows, _ghost_kappa(rows, width))


def linear_ghost_sq(A: tf.Tensor, G: tf.Tensor) -> tf.Tensor:
    """Upper bound of ``||A_i^T G_i||_F^2`` (float32 ``[B]``) from ``A [B,T,D]``,
    ``G [B,T,P]`` in O(T^2 (D+P)): the Gram form in float64 plus its rounding bound,
    and the rounding of the float32 clipped sum (:func:`norm_bound_sq`)."""
    return to_f32_up(_linear_ghost_sq64(A, G))


def _linear_ghost_sq64(A: tf.Tensor, G: tf.Tensor) -> tf.Tensor:
    A64 = _f64(A)  # exact; float64 Gram entries cannot cancel catastrophically
    aa = tf.matmul(A64, A64, transpose_b=True)
    return _gram_bound64(aa, _row_norms(A), G, A.shape[-1] + G.shape[-1])


def explicit_bound_sq(per_example: tf.Tensor, A: tf.Tensor, G: tf.Tensor) -> tf.Tensor:
    """Upper bound (float32 ``[B]``) for an explicit per-example gradient ``A_i^T G_i``
    that is NOT the tensor the clipped sum adds (see :func:`_explicit_sq64`)."""
    return to_f32_up(_explicit_sq64(per_example, A, G))


def _explicit_sq64(per_example: tf.Tensor, A: tf.Tensor, G: tf.Tensor) -> tf.Tensor:
    """The explicit gradient and the clipped sum are two float32 products, each off the
    true gradient by up to ``eta * sqrt(U)``: hence ``products=2``."""
    rows = _dim(A, 1)
    flat = tf.reshape(_f64(per_example), [tf.shape(per_example)[0], -1])
    sq = tf.reduce_sum(tf.square(flat), 1)  # float64 sum of D*P squares
    kappa = _ghost_kappa(rows, A.shape[-1] * G.shape[-1])
    return norm_bound_sq(sq, _triangle_sq(_row_norms(A), G), rows, kappa, products=2)


def linear_per_example(A: tf.Tensor, G: tf.Tensor) -> tf.Tensor:
    """``A_i^T G_i`` for every example: ``[B, D, P]``."""
    return tf.matmul(A, G, transpose_a=True)


def linear_clipped_sum(A: tf.Tensor, G: tf.Tensor, c: tf.Tensor, finite: Any = None) -> tf.Tensor:
    """``sum_i c_i A_i^T G_i`` as one matmul: ``[D, P]``."""
    D, P = A.shape[-1], G.shape[-1]

    def product(A2, G2):
        return tf.matmul(tf.reshape(A2, [-1, D]), tf.reshape(G2, [-1, P]), transpose_a=True)

    def fast():  # scale the smaller operand
        if D < P:
            return product(A * _row_shape(c, 3), G)
        return product(A, G * _row_shape(c, 3))

    return _finite_or_safe(finite, fast, lambda: product(keep_rows(A, c), scale_rows(G, c)))


class _Linear:
    """Norms and clipped sum of a kernel whose per-example gradient is ``A_i^T G_i``
    (``A [B,T,D]``, ``G [B,T,P]``), choosing ghost or explicit norms per layer."""

    def __init__(self, record: Record, key: str, A: tf.Tensor, G: tf.Tensor) -> None:
        self.record, self.key, self.A, self.G = record, key, A, G

    def sq_norm(self) -> tf.Tensor:
        A, G = self.A, self.G
        rows = A.shape[1] if A.shape[1] is not None else tf.shape(A)[1]
        ghost = use_ghost(rows, A.shape[-1], G.shape[-1])
        if isinstance(ghost, bool):
            if ghost:
                return linear_ghost_sq(A, G)
            per_example = linear_per_example(A, G)
            self.record.cache[self.key] = per_example
            return squared_rows(per_example)
        # Either way the clipped sum is linear_clipped_sum, not a cached tensor.
        return tf.cond(
            ghost,
            lambda: linear_ghost_sq(A, G),
            lambda: explicit_bound_sq(linear_per_example(A, G), A, G),
        )

    def clipped_sum(self, c: tf.Tensor) -> tf.Tensor:
        finite = self.record.all_finite
        per_example = self.record.cache.get(self.key)
        if per_example is not None:
            return weighted_sum(per_example, c, finite)
        return linear_clipped_sum(self.A, self.G, c, finite)


def _concat_rows(records: Sequence[Record], saved_key: str, grad_key: str, last: int = 1):
    """Merge calls of a layer whose per-example gradient sums over rows: concatenate the
    rows of every call (``[B, T_call, ...]``) along T."""
    merged = Record(records[0].layer, records[0].rule, lambda t: None)
    merged.saved[saved_key] = tf.concat(
        [batch_rows(r.saved[saved_key], last) for r in records], axis=1
    )
    merged.grads[grad_key] = tf.concat([batch_rows(r.grads[grad_key], 1) for r in records], 1)
    return merged


def _not_quantized(layer) -> str | None:
    if getattr(layer, "quantization_mode", None) is not None:
        return "quantized layers are not supported"
    if getattr(layer, "lora_enabled", False):
        return "LoRA layers are not supported"
    return None


# ---------------------------------------------------------------------------
# Dense


class DenseRule(LayerRule):
    """``z = a W + b`` on ``a [B, ..., D]``; rows are all positions of an example."""

    def unsupported_reason(self, layer):
        return _not_quantized(layer)

    def variables(self, layer):
        return [v for v in (layer._kernel, layer.bias) if v is not None]

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        z = ops.matmul(inputs, layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        record.save(inputs=inputs)
        z = record.watch("outputs", z)
        return layer.activation(z) if layer.activation is not None else z

    def _parts(self, record):
        if "linear" not in record.cache:
            A = f32(batch_rows(record.saved["inputs"]))
            G = f32(batch_rows(record.grads["outputs"]))
            record.cache["linear"] = _Linear(record, "kernel_per_example", A, G)
        return record.cache["linear"]

    def per_example_gradients(self, layer, record):
        parts = self._parts(record)
        grads = [linear_per_example(parts.A, parts.G)]
        if layer.bias is not None:
            grads.append(self._bias_per_example(record))
        return grads

    def _bias_per_example(self, record):
        if "bias" not in record.cache:
            record.cache["bias"] = tf.reduce_sum(self._parts(record).G, 1)
        return record.cache["bias"]

    def squared_norms(self, layer, record):
        norms = [self._parts(record).sq_norm()]
        if layer.bias is not None:
            norms.append(squared_rows(self._bias_per_example(record)))
        return norms

    def clipped_sum(self, layer, record, factors):
        sums = [self._parts(record).clipped_sum(factors[0])]
        if layer.bias is not None:
            sums.append(weighted_sum(self._bias_per_example(record), factors[1], record.all_finite))
        return sums

    def merge(self, layer, records):
        return _concat_rows(records, "inputs", "outputs")


# ---------------------------------------------------------------------------
# EinsumDense (and so MultiHeadAttention's projections)


def _parse_einsum(equation: str, input_rank: int | None = None):
    """``(inputs, kernel, outputs)`` specs with ``...`` spelled out (uppercase letters)."""
    lhs, out = equation.replace(" ", "").split("->")
    ins, ker = lhs.split(",")
    if "..." in ins:
        n = 1 if input_rank is None else input_rank - (len(ins) - 3)
        fill = string.ascii_uppercase[:n]
        ins, out = ins.replace("...", fill), out.replace("...", fill)
    return ins, ker, out


def _einsum_or_reshape(equation: str, t: tf.Tensor) -> tf.Tensor:
    """A one-operand einsum, skipped when it changes nothing (no copy)."""
    src, dst = equation.split("->")
    return t if src == dst else tf.einsum(equation, t)


class EinsumDenseRule(LayerRule):
    """``z = einsum(eq, a, W) + b``. The example index is the first input letter; the
    per-example kernel gradient is ``einsum(a, b -> example + kernel letters)``."""

    def unsupported_reason(self, layer):
        reason = _not_quantized(layer)
        if reason:
            return reason
        if "..." in layer.equation.split("->")[0].split(",")[1]:
            return "an ellipsis in the kernel spec"
        ins, ker, out = _parse_einsum(layer.equation)
        batch = ins[0]
        if batch in ker or batch not in out:
            return f"equation {layer.equation!r} does not keep the batch axis first"
        if any(ch not in ins and ch not in out for ch in ker):
            return f"equation {layer.equation!r} has kernel axes in neither input nor output"
        return None

    def variables(self, layer):
        return [v for v in (layer._kernel, layer.bias) if v is not None]

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        z = ops.einsum(layer.equation, inputs, layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        record.save(inputs=inputs)
        z = record.watch("outputs", z)
        return layer.activation(z) if layer.activation is not None else z

    def _specs(self, layer, record):
        return _parse_einsum(layer.equation, len(record.saved["inputs"].shape))

    def _kernel_per_example(self, layer, record):
        ins, ker, out = self._specs(layer, record)
        a, g = f32(record.saved["inputs"]), f32(record.grads["outputs"])
        return tf.einsum(f"{ins},{out}->{ins[0]}{ker}", a, g)

    def _bias_per_example(self, layer, record):
        if "bias" not in record.cache:
            ins, ker, out = self._specs(layer, record)
            chars = "".join(ch for ch in out if ch in layer.bias_axes)
            g = _einsum_or_reshape(f"{out}->{ins[0]}{chars}", f32(record.grads["outputs"]))
            record.cache["bias"] = tf.reshape(g, [-1, *layer.bias.shape])
        return record.cache["bias"]

    def _ghost_parts(self, layer, record):
        """``A [B,T,Dc]``, ``G [B,T,Do]`` and the kernel letters in their order, if the
        equation is a matrix product per example (no kernel letter in both input and
        output), else None."""
        ins, ker, out = self._specs(layer, record)
        b = ins[0]
        if any(ch in ins and ch in out for ch in ker):
            return None
        tok = "".join(ch for ch in ins if ch in out and ch not in ker and ch != b)
        con = "".join(ch for ch in ins if ch in ker)
        free = "".join(ch for ch in out if ch in ker)
        a = _einsum_or_reshape(f"{ins}->{b}{tok}{con}", f32(record.saved["inputs"]))
        g = _einsum_or_reshape(f"{out}->{b}{tok}{free}", f32(record.grads["outputs"]))
        return batch_rows(a, len(con)), batch_rows(g, len(free)), con + free

    def per_example_gradients(self, layer, record):
        grads = [self._kernel_per_example(layer, record)]
        if layer.bias is not None:
            grads.append(self._bias_per_example(layer, record))
        return grads

    def squared_norms(self, layer, record):
        parts = self._ghost_parts(layer, record)
        if parts is None:
            return super().squared_norms(layer, record)
        A, G, order = parts
        linear = _Linear(record, "kernel_per_example", A, G)
        record.cache["linear"] = (linear, order)
        norms = [linear.sq_norm()]
        if layer.bias is not None:
            norms.append(squared_rows(self._bias_per_example(layer, record)))
        return norms

    def clipped_sum(self, layer, record, factors):
        if "linear" not in record.cache:
            return super().clipped_sum(layer, record, factors)
        linear, order = record.cache["linear"]
        _, ker, _ = self._specs(layer, record)
        size = dict(zip(ker, layer.kernel.shape, strict=True))
        kernel = tf.reshape(linear.clipped_sum(factors[0]), [size[ch] for ch in order])
        kernel = tf.transpose(kernel, [order.index(ch) for ch in ker])
        sums = [kernel]
        if layer.bias is not None:
            bias = self._bias_per_example(layer, record)
            sums.append(weighted_sum(bias, factors[1], record.all_finite))
        return sums


# ---------------------------------------------------------------------------
# Embedding


class EmbeddingRule(LayerRule):
    """``z[i, t] = E[ids[i, t]]``. Norms: ``sum_{t,s} [id_t = id_s] <b_t, b_s>`` (never a
    dense vocab x dim tensor per example); clipped sum: a segment sum over the ids."""

    def unsupported_reason(self, layer):
        return _not_quantized(layer)

    def variables(self, layer):
        return [layer._embeddings]

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        outputs = call(inputs, *args, **kwargs)
        ids = inputs if inputs.dtype in (tf.int32, tf.int64) else tf.cast(inputs, tf.int32)
        record.save(ids=ids)
        return record.watch("outputs", outputs)

    def _rows(self, record):
        ids = record.saved["ids"]
        ids = tf.reshape(ids, [tf.shape(ids)[0], -1])
        G = f32(batch_rows(record.grads["outputs"]))
        return ids, G

    def squared_norms(self, layer, record):
        # The ghost form with a_t one-hot: a_t.a_s is the same-id indicator (exact) and
        # |a_t| = 1, so U = (sum_t |g_t|)^2; the segment sum is a float32 sum over rows.
        ids, G = self._rows(record)
        same = tf.cast(tf.equal(ids[:, :, None], ids[:, None, :]), tf.float64)
        ones = tf.ones(tf.shape(ids), tf.float64)
        return [to_f32_up(_gram_bound64(same, ones, G, G.shape[-1]))]

    def clipped_sum(self, layer, record, factors):
        ids, G = self._rows(record)
        rows = tf.reshape(scale_rows(G, factors[0], record.all_finite), [-1, G.shape[-1]])
        return [
            tf.math.unsorted_segment_sum(rows, tf.reshape(ids, [-1]), layer.input_dim),
        ]

    def per_example_gradients(self, layer, record):
        ids, G = self._rows(record)
        onehot = tf.one_hot(ids, layer.input_dim, dtype=tf.float32)
        return [tf.matmul(onehot, G, transpose_a=True)]

    def merge(self, layer, records):
        merged = Record(layer, self, lambda t: None)
        merged.saved["ids"] = tf.concat(
            [tf.reshape(r.saved["ids"], [tf.shape(r.saved["ids"])[0], -1]) for r in records], 1
        )
        merged.grads["outputs"] = tf.concat([batch_rows(r.grads["outputs"]) for r in records], 1)
        return merged


# ---------------------------------------------------------------------------
# Conv1D / Conv2D


class ConvRule(LayerRule):
    """``z = conv(a, W) + b``. The per-example kernel gradient is ``P_i^T b_i`` with
    ``P_i`` the patches of example i (``tf.image.extract_patches``), per group."""

    def unsupported_reason(self, layer):
        reason = _not_quantized(layer)
        if reason:
            return reason
        if layer.rank not in (1, 2):
            return "only 1-D and 2-D convolutions have a rule"
        if layer.padding not in ("valid", "same", "causal"):
            return f"padding {layer.padding!r}"
        return None

    def variables(self, layer):
        return [v for v in (layer._kernel, layer.bias) if v is not None]

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        padding = layer.padding
        if padding == "causal":
            inputs = ops.pad(inputs, layer._compute_causal_padding())
            padding = "valid"
        z = ops.conv(
            inputs,
            layer.kernel,
            strides=list(layer.strides),
            padding=padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
        if layer.use_bias:
            if layer.data_format == "channels_last":
                bias_shape = (1,) * (layer.rank + 1) + (layer.filters,)
            else:
                bias_shape = (1, layer.filters) + (1,) * layer.rank
            z = ops.add(z, ops.reshape(layer.bias, bias_shape))
        record.save(inputs=inputs, padding=padding)
        z = record.watch("outputs", z)
        return layer.activation(z) if layer.activation is not None else z

    def _geometry(self, layer, record):
        """Channels-last 2-D views: inputs ``a [B,H,W,cin]``, output gradients
        ``g [B,H',W',cout]`` (float32), and kernel size, strides, dilations, padding."""
        if "geometry" in record.cache:
            return record.cache["geometry"]
        a, g = f32(record.saved["inputs"]), f32(record.grads["outputs"])
        if layer.data_format == "channels_first":
            perm = [0, *range(2, layer.rank + 2), 1]
            a, g = tf.transpose(a, perm), tf.transpose(g, perm)
        kernel = list(layer.kernel_size)
        strides, rates = list(layer.strides), list(layer.dilation_rate)
        if layer.rank == 1:
            a, g = a[:, None], g[:, None]
            kernel, strides, rates = [1, *kernel], [1, *strides], [1, *rates]
        padding = record.saved["padding"].upper()
        record.cache["geometry"] = (a, g, kernel, strides, rates, padding)
        return record.cache["geometry"]

    def _parts(self, layer, record):
        """``A [B, T, groups, k*cin/groups]`` patches, ``G [B, T, groups, cout/groups]``."""
        if "parts" in record.cache:
            return record.cache["parts"]
        a, g, kernel, strides, rates, padding = self._geometry(layer, record)
        cin = a.shape[-1]
        if cin <= _FEW_CHANNELS:
            # Few channels: a convolution with a one-hot filter gives the same patches
            # several times faster than ExtractImagePatches (measured on x86 CPUs).
            size = _prod(kernel) * cin
            eye = tf.reshape(tf.eye(size, dtype=a.dtype), [*kernel, cin, size])
            patches = tf.nn.conv2d(a, eye, [1, *strides, 1], padding, dilations=[1, *rates, 1])
        else:
            patches = tf.image.extract_patches(
                a, [1, *kernel, 1], [1, *strides, 1], [1, *rates, 1], padding
            )
        groups = layer.groups
        cout = layer.filters
        k, cg = _prod(kernel), cin // groups
        batch = tf.shape(g)[0]
        rows = _rows_of(g)
        if rows == -1:
            rows = tf.reduce_prod(tf.shape(g)[1:-1])
        A = tf.reshape(patches, tf.stack([batch, rows, k, groups, cg]))
        A = tf.reshape(tf.transpose(A, [0, 1, 3, 2, 4]), tf.stack([batch, rows, groups, k * cg]))
        G = tf.reshape(g, tf.stack([batch, rows, groups, cout // groups]))
        record.cache["parts"] = (A, G)
        return A, G

    def _grouped_per_example(self, layer, record) -> tf.Tensor:
        """Per-example kernel gradients ``[B, k*cin, cout]`` without patches: one filter
        gradient of a convolution whose channels are (example, channel) pairs, grouped by
        example (for few input channels, faster than patches + batched matmul)."""
        a, g, kernel, strides, rates, padding = self._geometry(layer, record)
        cin, cout = a.shape[-1], g.shape[-1]
        shape_a, shape_g = tf.shape(a), tf.shape(g)
        batch = shape_a[0]
        folded_a = tf.reshape(
            tf.transpose(a, [1, 2, 0, 3]), tf.stack([1, shape_a[1], shape_a[2], batch * cin])
        )
        folded_g = tf.reshape(
            tf.transpose(g, [1, 2, 0, 3]), tf.stack([1, shape_g[1], shape_g[2], batch * cout])
        )
        grads = tf.raw_ops.Conv2DBackpropFilter(
            input=folded_a,
            filter_sizes=tf.stack([*kernel, cin, batch * cout]),
            out_backprop=folded_g,
            strides=[1, *strides, 1],
            padding=padding,
            dilations=[1, *rates, 1],
        )
        grads = tf.reshape(grads, tf.stack([_prod(kernel) * cin, batch, cout]))
        return tf.transpose(grads, [1, 0, 2])

    def _bias_per_example(self, layer, record) -> tf.Tensor:
        if "bias" not in record.cache:  # read by both squared_norms and clipped_sum
            record.cache["bias"] = tf.reduce_sum(self._geometry(layer, record)[1], [1, 2])
        return record.cache["bias"]

    def _kernel_layout(self, layer, grad, batched: bool):
        """``[(B,) groups, k*cg, og]`` -> the kernel's ``[kh, (kw,) cg, groups*og]``."""
        groups = layer.groups
        kshape = list(layer.kernel.shape)
        k = _prod(kshape[:-2])
        cg, og = kshape[-2], kshape[-1] // groups
        lead = [-1] if batched else []
        off = 1 if batched else 0
        grad = tf.reshape(grad, [*lead, groups, k, cg, og])
        perm = [*range(off), off + 1, off + 2, off, off + 3]
        grad = tf.transpose(grad, perm)
        return tf.reshape(grad, [*lead, *kshape])

    def _kernel_sq(self, layer, record):
        a, g = self._geometry(layer, record)[:2]
        rows = _rows_of(g)
        few_channels = a.shape[-1] <= _FEW_CHANNELS
        if layer.groups == 1 and few_channels and rows != -1 and not tracing_for_xla():
            kernel_size = _prod(layer.kernel_size) * a.shape[-1]
            if use_ghost(rows, kernel_size, layer.filters) is False:
                per_example = self._grouped_per_example(layer, record)
                record.cache["kernel_per_example"] = per_example
                return squared_rows(per_example)
        A, G = self._parts(layer, record)
        rows = _dim(A, 1)
        ghost = use_ghost(rows, A.shape[-1] * layer.groups, G.shape[-1])
        if layer.groups == 1:
            linear = _Linear(record, "kernel_per_example", A[:, :, 0], G[:, :, 0])
            record.cache["linear"] = linear
            return linear.sq_norm()
        # Groups: one linear map per (example, group); fold the groups into the batch
        # and add the groups' bounds (in float64, so the sum cannot round below).
        batch = tf.shape(A)[0]
        A_r = tf.reshape(tf.transpose(A, [0, 2, 1, 3]), tf.stack([-1, rows, A.shape[-1]]))
        G_r = tf.reshape(tf.transpose(G, [0, 2, 1, 3]), tf.stack([-1, rows, G.shape[-1]]))

        def per_example():
            return tf.einsum("btrd,btrp->brdp", A, G)

        def by_example(sq):  # [B * groups] -> [B], summed before the float32 cast
            return to_f32_up(tf.reduce_sum(tf.reshape(sq, [batch, layer.groups]), 1))

        def ghost_fn():
            return by_example(_linear_ghost_sq64(A_r, G_r))

        def explicit_fn():  # not the tensor the clipped sum adds (see clipped_sum)
            E = tf.reshape(per_example(), tf.stack([-1, A.shape[-1], G.shape[-1]]))
            return by_example(_explicit_sq64(E, A_r, G_r))

        if ghost is True:
            return ghost_fn()
        if ghost is False:  # the clipped sum adds this very tensor
            record.cache["grouped_per_example"] = per_example()
            return squared_rows(record.cache["grouped_per_example"])
        return tf.cond(ghost, ghost_fn, explicit_fn)

    def per_example_gradients(self, layer, record):
        A, G = self._parts(layer, record)
        kernel = self._kernel_layout(layer, tf.einsum("btrd,btrp->brdp", A, G), batched=True)
        grads = [kernel]
        if layer.use_bias:
            grads.append(self._bias_per_example(layer, record))
        return grads

    def squared_norms(self, layer, record):
        norms = [self._kernel_sq(layer, record)]
        if layer.use_bias:
            norms.append(squared_rows(self._bias_per_example(layer, record)))
        return norms

    def clipped_sum(self, layer, record, factors):
        c, finite = factors[0], record.all_finite
        linear = record.cache.get("linear")
        if "kernel_per_example" in record.cache:
            kernel = weighted_sum(record.cache["kernel_per_example"], c, finite)[None]
        elif linear is not None:
            kernel = linear.clipped_sum(c)[None]
        elif "grouped_per_example" in record.cache:
            kernel = weighted_sum(record.cache["grouped_per_example"], c, finite)
        else:
            A, G = self._parts(layer, record)
            kernel = tf.einsum("btrd,btrp->rdp", keep_rows(A, c, finite), scale_rows(G, c, finite))
        sums = [self._kernel_layout(layer, kernel, batched=False)]
        if layer.use_bias:
            bias = self._bias_per_example(layer, record)
            sums.append(weighted_sum(bias, factors[1], finite))
        return sums


def tracing_for_xla() -> bool:
    """True while a function compiled with XLA (``jit_compile=True``) is being traced.

    XLA on CPU runs the grouped filter gradient of ``_grouped_per_example`` ~150x slower
    than TensorFlow's kernel (measured: W1 of benchmarks/engines.py), so rules pick their
    XLA-friendly form there. TensorFlow has no public API for this; its private helper is
    what ``tf.function`` itself uses to enter the XLA context.
    """
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a TensorFlow without the helper
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


# Input channels up to which patches come from a one-hot convolution and explicit
# per-example kernel gradients from one grouped filter gradient (not under XLA).
_FEW_CHANNELS = 4


def _rows_of(g: tf.Tensor) -> int:
    spatial = g.shape[1:-1]
    if None in spatial:
        return -1
    return _prod(spatial)


# ---------------------------------------------------------------------------
# Normalization layers: per-example gradients are small (a vector per example).


def _reduce_to(t: tf.Tensor, keep_axes: Sequence[int]) -> tf.Tensor:
    """Sum ``t`` over every axis except 0 and ``keep_axes``."""
    rank = len(t.shape)
    keep = {a % rank for a in keep_axes}
    axes = [a for a in range(1, rank) if a not in keep]
    return tf.reduce_sum(t, axes) if axes else t


class LayerNormalizationRule(LayerRule):
    """``y = x_hat * gamma + beta``: per-example ``sum x_hat * b`` and ``sum b``."""

    def unsupported_reason(self, layer):
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        if 0 in axes:
            return "normalization over the batch axis"
        return None

    def variables(self, layer):
        return [v for v in (layer.gamma, layer.beta) if v is not None]

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        outputs = call(inputs, *args, **kwargs)
        x = tf.stop_gradient(f32(inputs))
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        mean, variance = tf.nn.moments(x, axes=axes, keepdims=True)
        inv = tf.math.rsqrt(variance + layer.epsilon)
        x_hat = x * inv if layer.rms_scaling else (x - mean) * inv
        record.save(x_hat=x_hat)
        return record.watch("outputs", outputs)

    def per_example_gradients(self, layer, record):
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        b = f32(record.grads["outputs"])
        grads = []
        if layer.gamma is not None:
            grads.append(_reduce_to(record.saved["x_hat"] * b, axes))
        if layer.beta is not None:
            g = _reduce_to(b, axes)
            grads.append(tf.zeros_like(g) if layer.rms_scaling else g)
        return [tf.reshape(g, [-1, *v.shape]) for g, v in zip(grads, self.variables(layer))]


class GroupNormalizationRule(LayerRule):
    """Like LayerNormalization, with ``x_hat`` normalized per group of channels."""

    def variables(self, layer):
        return [v for v in (layer.gamma, layer.beta) if v is not None]

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        outputs = call(inputs, *args, **kwargs)
        x = tf.stop_gradient(f32(inputs))
        grouped = layer._reshape_into_groups(x)
        axes = list(range(1, len(grouped.shape)))
        axes.pop(-2 if layer.axis == -1 else layer.axis - 1)
        mean, variance = tf.nn.moments(grouped, axes=axes, keepdims=True)
        x_hat = tf.reshape((grouped - mean) * tf.math.rsqrt(variance + layer.epsilon), tf.shape(x))
        record.save(x_hat=x_hat)
        return record.watch("outputs", outputs)

    def per_example_gradients(self, layer, record):
        b = f32(record.grads["outputs"])
        grads = []
        if layer.gamma is not None:
            grads.append(_reduce_to(record.saved["x_hat"] * b, [layer.axis]))
        if layer.beta is not None:
            grads.append(_reduce_to(b, [layer.axis]))
        return grads


class RMSNormalizationRule(LayerRule):
    """``y = x * rsqrt(mean(x^2) + eps) * scale``."""

    def variables(self, layer):
        return [layer.scale]

    def unsupported_reason(self, layer):
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        return "normalization over the batch axis" if 0 in axes else None

    def forward(self, layer, record, call, inputs, *args, **kwargs):
        outputs = call(inputs, *args, **kwargs)
        x = tf.stop_gradient(f32(inputs))
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        rrms = tf.math.rsqrt(tf.reduce_mean(tf.square(x), axes, keepdims=True) + layer.epsilon)
        record.save(x_hat=x * rrms)
        return record.watch("outputs", outputs)

    def per_example_gradients(self, layer, record):
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        g = _reduce_to(record.saved["x_hat"] * f32(record.grads["outputs"]), axes)
        return [tf.reshape(g, [-1, *layer.scale.shape])]


register_layer_rule(keras.layers.Dense, DenseRule())
register_layer_rule(keras.layers.EinsumDense, EinsumDenseRule())
register_layer_rule(keras.layers.Embedding, EmbeddingRule())
register_layer_rule(keras.layers.Conv1D, ConvRule())
register_layer_rule(keras.layers.Conv2D, ConvRule())
register_layer_rule(keras.layers.LayerNormalization, LayerNormalizationRule())
register_layer_rule(keras.layers.GroupNormalization, GroupNormalizationRule())
if hasattr(keras.layers, "RMSNormalization"):
    register_layer_rule(keras.layers.RMSNormalization, RMSNormalizationRule())

"""Numerics shared by the rules: batch-row helpers (rows of dropped examples stay exactly
0) and the rounding-aware per-example norm bounds of linear maps (ghost or explicit).

Also the norm-method setting (:func:`norm_method`, :func:`use_ghost`), which picks ghost
or explicit norms for linear maps and is read here (``_Linear``) and by the conv rule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from tf_autoclip import _keras_compat

if TYPE_CHECKING:
    from tf_autoclip.rules.base import Record

NORM_METHODS = ("mixed", "ghost", "explicit")

_settings = {"norm_method": "mixed", "low_memory": False}


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


@contextlib.contextmanager
def low_memory(enabled: bool = True):
    """While tracing: never keep an explicit per-example gradient until the clip factors
    exist (:func:`keep_per_example`). The book-keeping engine enters it for models made
    private with ``low_memory=True``."""
    saved = _settings["low_memory"]
    _settings["low_memory"] = bool(enabled)
    try:
        yield
    finally:
        _settings["low_memory"] = saved


def keep_per_example() -> bool:
    """Keep an explicit per-example gradient (formed for its norm) until the clipped sum,
    which is then a weighted sum of it? Every kept tensor is alive at the step's memory
    peak (all of them wait for the clip factors, which need every layer's norm). Under
    :func:`low_memory` it is not kept: the clipped sum is one more matmul, about the
    cost of the layer's weight gradient in Keras' step."""
    return not _settings["low_memory"]


# ---------------------------------------------------------------------------
# Rows of a batch (rows of dropped examples stay exactly 0).


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
    # A scalar 0, not zeros_like(t): with static shapes, grappler folds zeros_like into a
    # constant as large as t, held in memory for as long as the step's graph exists.
    return _finite_or_safe(
        finite, lambda: t, lambda: tf.where(_row_shape(c, len(t.shape)) != 0, t, 0.0)
    )


def squared_rows(g: tf.Tensor) -> tf.Tensor:
    """``[B, ...]`` -> ``[B]`` sums of squares, never below those of the float32 rows
    (:func:`squared_rows_up64`, cast up)."""
    return to_f32_up(squared_rows_up64(g))


# Most terms squared_rows_up64 adds in float32 (a relative error of at most about
# 256 * 2^-24 = 1.5e-5, which it adds to the sum).
_F32_BLOCK = 256


def _block_width(width: int) -> int:
    """The largest divisor of ``width`` that is at most ``_F32_BLOCK``."""
    return next(b for b in range(min(width, _F32_BLOCK), 0, -1) if width % b == 0)


def squared_rows_up64(g: tf.Tensor, batch_axis: int = 0) -> tf.Tensor:
    """``[B, ...]`` -> ``[B]`` float64 upper bounds of the rows' sums of squares (the
    examples on ``batch_axis``, which is not the last axis).

    A float32 sum of ``n`` non-negative terms can lose up to ``(n-1) 2^-24`` of it (e.g.
    many tiny squares added to a large one round away), which a norm read off a large
    per-example tensor must not. So the squares are summed in float32 along the last
    axis, in blocks of ``L <= 256`` terms (each loses at most ``gamma_L``), each block's
    sum is raised by ``(2 L + 4) 2^-24``, more than ``gamma_L / (1 - gamma_L)`` and the
    roundings of its square root and square, and the blocks are added in float64; no
    copy of the tensor (float64 or squared) is made. Blocks of fewer than 16 terms, or
    an unknown last axis: float64 throughout (squares of float32 numbers are exact)."""
    g = f32(g)
    rank = len(g.shape)
    others = [axis for axis in range(rank) if axis != batch_axis]
    # Underflow: CPU kernels flush float32 results below 2^-126 to zero, so each square
    # and each addition may lose up to 2^-126 whatever its relative error: without this
    # term, many squares just under it beside one just over give AUTO-V (1 / norm) a
    # norm sqrt(n) times too small (a test measured 1.35 S with 4 entries).
    underflow = 2.0 * _per_row_count(g, batch_axis) * 2.0**-126
    width = g.shape[-1] if rank > 1 else None
    block = _block_width(int(width)) if width else 0
    if block < 16:
        return tf.reduce_sum(tf.square(_f64(g)), others) + underflow
    g = tf.reshape(g, _blocked_shape(g, block, batch_axis))
    if _keras_compat.in_xla_context():  # XLA has no EuclideanNorm, and fuses these
        blocks = _f64(tf.reduce_sum(tf.square(g), axis=-1))
    else:
        # A Euclidean-norm reduction accumulates the squares in float32 without a tensor
        # of them (memory); its sqrt, and squaring that in float64, add 3 roundings.
        blocks = tf.square(_f64(tf.math.reduce_euclidean_norm(g, axis=-1)))
    sq = tf.reduce_sum(blocks * (1.0 + (2.0 * block + 4.0) * _U32), others)
    return sq + underflow


def _blocked_shape(g: tf.Tensor, block: int, batch_axis: int) -> Any:
    """``g``'s shape with the last axis split into ``[-1, block]``: a constant when only
    the batch axis is unknown (fewer ops in the step's graph), else computed."""
    dims = g.shape.as_list()
    if all(d is not None for axis, d in enumerate(dims) if axis != batch_axis):
        lead = [-1 if axis == batch_axis else d for axis, d in enumerate(dims[:-1])]
        return [*lead, dims[-1] // block, block]
    return tf.concat([tf.shape(g)[:-1], [-1, block]], 0)


def _per_row_count(g: tf.Tensor, batch_axis: int) -> Any:
    """Entries per example of ``g`` (a float, or a float64 scalar tensor if dynamic)."""
    dims = [d for axis, d in enumerate(g.shape) if axis != batch_axis]
    if None not in dims:
        return float(_prod(dims))
    size = tf.cast(tf.size(g, out_type=tf.int64), tf.float64)
    return tf.math.divide_no_nan(size, tf.cast(tf.shape(g)[batch_axis], tf.float64))


def weighted_sum(per_example: tf.Tensor, c: tf.Tensor, finite: Any = None) -> tf.Tensor:
    """``sum_i c_i g_i`` with dropped (NaN) rows contributing exactly 0."""
    g = f32(per_example)

    def fast():
        flat = tf.reshape(g, [tf.shape(g)[0], -1])
        return tf.reshape(tf.linalg.matvec(flat, c, transpose_a=True), tf.shape(g)[1:])

    return _finite_or_safe(finite, fast, lambda: tf.reduce_sum(scale_rows(g, c), axis=0))


# "mixed" takes explicit per-example gradients up to this many times the numbers of the
# layer's saved inputs and output gradients (see use_ghost) ...
_EXPLICIT_MEMORY_FACTOR = 2
# ... for layers with at least this many rows per example (fewer: up to 1x).
_EXPLICIT_BAND_ROWS = 16


def use_ghost(rows: Any, in_dim: int, out_dim: int) -> Any:
    """Ghost norms for a linear map ``in_dim -> out_dim`` applied to ``rows`` rows per
    example? ``"mixed"``: when the explicit per-example gradient (``in*out`` numbers)
    would be larger than the layer's activations and output gradients
    (``rows*(in+out)``); from 16 rows per example, only when more than twice as large.
    A bool, or a boolean tensor when ``rows`` is dynamic.

    In that band explicit is the faster form: both forms do the float32 product
    ``sum_t a_t g_t^T`` once (explicit per example, then only squares and a weighted sum;
    ghost as the clipped sum), and ghost adds the float64 Gram products,
    ``rows^2 * (in+out)`` multiply-adds per example, at least ``rows * in * out / 2``
    there, in float64 matmuls that ran about 9x slower than float32 ones on this CPU
    (profile of W2, benchmarks/engines.py --profile). Measured in docs/benchmarks.md
    (2026-12-07): W1's second convolution and W2's feed-forward layers move to explicit.
    Below 16 rows the Gram is small and the memory rule alone decides."""
    method = _settings["norm_method"]
    if method != "mixed":
        return method == "ghost"
    if not isinstance(rows, (tf.Tensor, tf.Variable)):
        rows = int(rows)
        size, saved = in_dim * out_dim, rows * (in_dim + out_dim)
        factor = _EXPLICIT_MEMORY_FACTOR if rows >= _EXPLICIT_BAND_ROWS else 1
        return size > factor * saved
    size, saved = in_dim * out_dim, rows * (in_dim + out_dim)
    return tf.where(
        rows >= _EXPLICIT_BAND_ROWS, size > _EXPLICIT_MEMORY_FACTOR * saved, size > saved
    )


# ---------------------------------------------------------------------------
# Per-example norm bounds of linear maps (ghost or explicit).

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


def _f64_or_float(x: Any) -> Any:
    """A Python number as a Python float (exact float64 arithmetic with no graph ops: the
    bounds' constants for static shapes), else a float64 tensor."""
    return float(x) if isinstance(x, (int, float)) else _f64(x)


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
    float32 computation of ``sum_t a_t (c g_t)`` (one matmul): per entry a dot product
    over ``rows`` terms, whose rounding error is at most
    ``(rows + 1) * 2^-24 * sum_t |a_td| |c g_tp|``, so at most ``eta * c * sqrt(U)`` in
    norm with ``eta = (rows + 4) * 2^-24``. When rows cancel this is large next to the
    true norm, so it is added to the norm. ``products`` counts such float32 products in
    the norm itself (1: an explicit gradient).
    """
    U = U * (1.0 + kappa)  # U itself was rounded
    sq = tf.maximum(tf.minimum(sq + kappa * U, U), 0.0)
    eta = (_f64_or_float(rows) + 4.0) * _U32
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
    T = _f64_or_float(rows)
    return (_f64_or_float(width) + T * T + 2.0 * T + 8.0) * _U64


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
    # From G64: another cast of G would be another float64 copy, alive beside this one.
    return norm_bound_sq(ghost, _triangle_sq(a_norms, G64), rows, _ghost_kappa(rows, width))


def linear_ghost_sq(A: tf.Tensor, G: tf.Tensor) -> tf.Tensor:
    """Upper bound of ``||A_i^T G_i||_F^2`` (float32 ``[B]``) from ``A [B,T,D]``,
    ``G [B,T,P]`` in O(T^2 (D+P)): the Gram form in float64 plus its rounding bound,
    and the rounding of the float32 clipped sum (:func:`norm_bound_sq`)."""
    return to_f32_up(_linear_ghost_sq64(A, G))


def _linear_ghost_sq64(A: tf.Tensor, G: tf.Tensor) -> tf.Tensor:
    # Not before the output gradients exist: A is ready in the forward pass, and its
    # Gram, formed then, would stay alive through the backward pass (memory peak).
    with tf.control_dependencies([G]):
        A64 = _f64(A)  # exact; float64 Gram entries cannot cancel catastrophically
    aa = tf.matmul(A64, A64, transpose_b=True)
    return _gram_bound64(aa, _row_norms(A64), G, A.shape[-1] + G.shape[-1])


def explicit_bound_sq(per_example: tf.Tensor, A: tf.Tensor, G: tf.Tensor) -> tf.Tensor:
    """Upper bound (float32 ``[B]``) for an explicit per-example gradient ``A_i^T G_i``
    that is NOT the tensor the clipped sum adds (see :func:`_explicit_sq64`)."""
    return to_f32_up(_explicit_sq64(per_example, A, G))


def _explicit_sq64(per_example: tf.Tensor, A: tf.Tensor, G: tf.Tensor) -> tf.Tensor:
    """The explicit gradient and the clipped sum are two float32 products, each off the
    true gradient by up to ``eta * sqrt(U)``: hence ``products=2``."""
    rows = _dim(A, 1)
    sq = squared_rows_up64(per_example)  # at least the float32 tensor's squared norm
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

    def per_example(self) -> tf.Tensor:
        """``A_i^T G_i`` for every example (the one the norm formed, if it did)."""
        cached = self.record.cache.get(self.key)
        return cached if cached is not None else linear_per_example(self.A, self.G)

    def sq_norm(self) -> tf.Tensor:
        A, G = self.A, self.G
        rows = A.shape[1] if A.shape[1] is not None else tf.shape(A)[1]
        ghost = use_ghost(rows, A.shape[-1], G.shape[-1])
        if isinstance(ghost, bool):
            if ghost:
                return linear_ghost_sq(A, G)
            per_example = linear_per_example(A, G)
            if not keep_per_example():
                # The clipped sum is then one matmul, another float32 product than
                # this tensor: the bound covers both.
                return explicit_bound_sq(per_example, A, G)
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

"""The Gaussian mechanism's randomness: a secret key, and noise that is a pure function of it.

The noise of a release is ONE stream of TensorFlow's counter-based Philox generator,
from a seed derived from ``(key, step, draw)``; it is drawn a chunk of variables at a
time, each chunk from its own offset in the stream (the numbers one draw of everything
would give):

- ``key``: 128 bits from the operating system's entropy (``secrets``) when ``seed=None``,
  never from a random generator a user can seed (``keras.utils.set_random_seed`` fixes
  Python's and NumPy's). It lives in an untracked variable: no checkpoint, saved model or
  config holds it, so nothing a user saves lets its reader predict noise not yet drawn.
  A fixed ``seed`` makes the noise reproducible, and therefore predictable by anyone who
  knows the seed: use it for tests and debugging only.
- ``step``: the optimizer's step counter (saved with the optimizer): after
  ``load_model`` or a restart the steps continue, so even a fixed seed draws fresh noise.
- ``draw``: a per-process count of releases, so two releases at the same step (e.g.
  ``private_gradients`` called twice before ``apply_gradients``) never share noise.

Philox is not a cryptographic RNG, as in tensorflow-privacy and Opacus' default mode.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

_INT64_MIN = -(2**63)


class NoiseKey:
    """The noise key and release counter of one DP optimizer (never saved).

    Held by the optimizer inside this plain object, which Keras and ``tf.train.Checkpoint``
    do not track. Under ``tf.distribute`` the variables are mirrored: every replica reads
    the same key (a multi-worker strategy broadcasts the chief's initial value), so every
    replica draws the same noise.

    >>> a, b = NoiseKey(None), NoiseKey(None)
    >>> bool(tf.reduce_any(a.key != b.key))
    True
    >>> NoiseKey(7).key.numpy().tolist() == NoiseKey(7).key.numpy().tolist()
    True
    """

    def __init__(self, seed: int | None) -> None:
        if seed is None:
            words = [secrets.randbits(64) + _INT64_MIN for _ in range(2)]
        else:
            words = [int(seed) % 2**63, int(seed) // 2**63]
        self.key = tf.Variable(words, dtype=tf.int64, trainable=False, name="dp_noise_key")
        self.draws = tf.Variable(
            0,
            dtype=tf.int64,
            trainable=False,
            name="dp_noise_draws",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )

    def next_seed(self, step: tf.Tensor) -> tf.Tensor:
        """The seed of this release, ``[2]`` int64; advances the draw counter."""
        draw = self.draws.read_value()
        with tf.control_dependencies([draw]):
            advance = self.draws.assign_add(1)
        with tf.control_dependencies([advance]):
            seed = fold_in(tf.identity(self.key), tf.cast(step, tf.int64))
            return fold_in(seed, draw)


# Philox-4x32, TensorFlow's algorithm number 1 (explicitly: "auto_select" is ~30x slower
# under XLA on CPU, 1.7M normals: 1085 ms against 35 ms, measured on this project's
# machine). Every 4 float32 normals use one increment of its 128-bit counter.
_PHILOX = 1
_NORMALS_PER_COUNT = 4


# TensorFlow's Philox seed scramble (core/kernels/stateless_random_ops.cc): a seed's key
# and counter are four Philox words of the seed under this fixed key.
_SCRAMBLE_KEY = 0x02461E293EC8F720


def _key_counter(seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Philox key ``[1]`` and counter ``[2]`` (uint64) of a ``[2]`` int64 ``seed``: the
    numbers ``tf.random.stateless_*(alg="philox")`` derives, in a few ops.

    Not TensorFlow's op for this (``StatelessRandomGetKeyCounter``): under XLA (TF 2.21)
    it keeps only the low 32 bits of each seed word, so seeds ``[1, 2]`` and
    ``[1 + 2**40, 2]`` gave the same noise (the step's noise then depended on 32 bits of
    the secret key), and the draws fed from it ran 30 times slower.
    """
    mix = tf.raw_ops.StatelessRandomUniformFullIntV2(
        shape=tf.constant([4], tf.int32),
        key=tf.constant([_SCRAMBLE_KEY], tf.uint64),
        counter=tf.cast(seed, tf.uint64),
        alg=_PHILOX,
        dtype=tf.uint32,
    )
    # Words (w0, w1, w2, w3) -> key w0 | w1 << 32, counter (0, w2 | w3 << 32).
    mix = tf.cast(mix, tf.uint64)
    pairs = tf.bitwise.bitwise_or(
        mix[0::2], tf.bitwise.left_shift(mix[1::2], tf.constant(32, tf.uint64))
    )
    return pairs[:1], tf.stack([tf.constant(0, tf.uint64), pairs[1]])


def fold_in(seed: tf.Tensor, data: Any) -> tf.Tensor:
    """``tf.random.experimental.stateless_fold_in(seed, data, alg="philox")`` for int64
    ``data`` (the same seed) in about 10 ops instead of ~46: a random int64 from ``seed``, then
    ``data``.

    >>> seed = tf.constant([3, 4], tf.int64)
    >>> data = tf.constant(5, tf.int64)
    >>> ours = fold_in(seed, data)
    >>> theirs = tf.random.experimental.stateless_fold_in(seed, data, alg="philox")
    >>> ours.numpy().tolist() == theirs.numpy().tolist()
    True
    """
    key, counter = _key_counter(seed)
    word = tf.raw_ops.StatelessRandomUniformFullIntV2(
        shape=tf.constant([], tf.int32), key=key, counter=counter, alg=_PHILOX, dtype=tf.int64
    )
    return tf.stack([word, tf.cast(data, tf.int64)])


def noisy_average(
    clipped_sum: Sequence[tf.Tensor],
    stddev: tf.Tensor | float,
    denominator: tf.Tensor | float,
    seed: tf.Tensor,
    correlate: Callable[[list[tf.Tensor]], list[tf.Tensor]] | None = None,
) -> list[tf.Tensor]:
    """``(clipped_sum + N(0, stddev^2 I)) / denominator``, independent noise everywhere.

    ``seed`` (``[2]`` int64, e.g. from ``NoiseKey.next_seed``) fixes all the noise: the
    numbers :func:`standard_normals` would draw for all the variables at once, drawn a
    chunk of variables at a time (:func:`_chunks`), each from its offset in the stream.
    ``correlate`` maps the fresh draws to the noise actually added (BandMF,
    ``tf_autoclip.correlated_noise``).

    >>> sums = [tf.zeros([2])]
    >>> seed = tf.constant([1, 2], tf.int64)
    >>> noisy_average(sums, 0.0, 4.0, seed)[0].numpy().tolist()
    [0.0, 0.0]
    >>> a = noisy_average(sums, 1.0, 1.0, seed)[0]
    >>> b = noisy_average(sums, 1.0, 1.0, seed)[0]
    >>> bool(tf.reduce_all(a == b))
    True
    """
    stddev = tf.cast(stddev, tf.float32)
    denominator = tf.cast(denominator, tf.float32)
    # Draw after every clipped sum exists: drawn earlier (it depends on nothing else),
    # the noise would be alive alongside the per-example tensors at the memory peak.
    with tf.control_dependencies([s for s in clipped_sum if isinstance(s, tf.Tensor)]):
        seed = tf.identity(seed)
    shapes = [s.shape if s.shape.is_fully_defined() else tf.shape(s) for s in clipped_sum]

    def release(indices: list[int], noise: list[tf.Tensor]) -> list[tf.Tensor]:
        return [
            (tf.cast(clipped_sum[i], tf.float32) + z) / denominator
            for i, z in zip(indices, noise, strict=True)
        ]

    if correlate is not None:  # it maps all fresh draws at once
        return release(list(range(len(shapes))), correlate(standard_normals(shapes, seed, stddev)))
    key, counter = _key_counter(seed)
    out: list[tf.Tensor | None] = [None] * len(shapes)
    previous: list[tf.Tensor] = []
    offset = 0  # of the chunk in the stream, in numbers (several chunks: shapes are static)
    for indices in _chunks(shapes):
        chunk = [shapes[i] for i in indices]
        # Chunk k is drawn once chunk k-1 is added: drawn together (they depend on
        # nothing else), the chunks would all be alive beside the clipped sums.
        with tf.control_dependencies(previous):
            noise = _normals(chunk, key, counter, offset, stddev)
        if len(indices) < len(shapes):
            offset += sum(_padded(_size(shape)) for shape in chunk)
        previous = release(indices, noise)
        for i, result in zip(indices, previous, strict=True):
            out[i] = result
    return out


# Most floats drawn at once (16 MB) unless one variable is larger: the noise of a model
# is drawn in chunks of consecutive variables, each added before the next is drawn, so
# no more than a chunk of noise is alive beside the clipped sums.
_CHUNK = 1 << 22


def _chunks(shapes: Sequence[Any]) -> list[list[int]]:
    """Indices of ``shapes`` in consecutive groups of at most ``_CHUNK`` numbers (a larger
    tensor alone); one group if any shape is dynamic.

    >>> _chunks([[3], [2, 2]])
    [[0, 1]]
    >>> _chunks([[_CHUNK], [1], [_CHUNK - 1], [5]])
    [[0], [1, 2], [3]]
    """
    sizes = [_size(shape) for shape in shapes]
    if not all(isinstance(size, int) for size in sizes):
        return [list(range(len(shapes)))]
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if not groups or total + size > _CHUNK:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


# Parts of the flat draw start at multiples of this many floats (64 bytes): TensorFlow
# slices an aligned part along axis 0 without copying it. A multiple of
# _NORMALS_PER_COUNT, so that every part starts at a whole counter.
_ALIGN = 16


def _padded(size: Any) -> Any:
    return (size + _ALIGN - 1) // _ALIGN * _ALIGN


def standard_normals(
    shapes: Sequence[Any], seed: tf.Tensor, scale: tf.Tensor | float | None = None
) -> list[tf.Tensor]:
    """Standard normal float32 tensors of ``shapes`` (static ``TensorShape`` / lists, or
    ``[rank]`` int tensors), all from ONE Philox draw of their total size, each part
    starting aligned, so that slicing it out copies nothing; times ``scale`` if given.

    One draw rather than one per tensor: the graph holds a few ops instead of ~50 per
    variable (a fold-in and a draw each), which cost trace memory and per-op time.
    ``scale`` multiplies the flat draw, in place (its only reader), before the parts
    are sliced: scaling each part instead would allocate a second parameter-sized buffer
    while the first is alive (the parts are views of it).

    >>> seed = tf.constant([1, 2], tf.int64)
    >>> a, b = standard_normals([[3], [2, 2]], seed)
    >>> a.shape.as_list(), b.shape.as_list()
    ([3], [2, 2])
    >>> bool(tf.reduce_all(standard_normals([[3]], seed)[0] == a))
    True
    """
    key, counter = _key_counter(seed)
    return _normals(shapes, key, counter, 0, scale)


def _normals(
    shapes: Sequence[Any], key: tf.Tensor, counter: tf.Tensor, offset: int, scale: Any
) -> list[tf.Tensor]:
    """The parts of ``shapes`` from number ``offset`` (a multiple of ``_ALIGN``) on of the
    Philox stream ``(key, counter)``: the counter's low word advances one per
    ``_NORMALS_PER_COUNT`` numbers, and Philox gives the same numbers from there on as a
    draw that started earlier (on CPU and under XLA)."""
    sizes = [_size(shape) for shape in shapes]
    padded = [_padded(size) for size in sizes]
    first_count = tf.constant(offset // _NORMALS_PER_COUNT, tf.uint64)
    flat = tf.raw_ops.StatelessRandomNormalV2(
        shape=_as_index(sum(padded)),
        key=key,
        counter=tf.stack([first_count, counter[1]]),
        alg=_PHILOX,
        dtype=tf.float32,
    )
    if scale is not None:
        flat = tf.cast(scale, tf.float32) * flat
    if all(isinstance(size, int) for size in sizes):
        # One split into aligned parts (and the padding after each): 1 op, not ~6 per part.
        pieces = [n for size, step in zip(sizes, padded, strict=True) for n in (size, step - size)]
        parts = tf.split(flat, pieces)[::2]
        return [tf.reshape(part, shape) for part, shape in zip(parts, shapes, strict=True)]
    out, start = [], 0
    for shape, size, step in zip(shapes, sizes, padded, strict=True):
        part = tf.slice(flat, _as_index(start), _as_index(size))
        out.append(tf.reshape(part, shape))
        start = start + step
    return out


def _as_index(n: Any) -> tf.Tensor:
    if isinstance(n, int):
        return tf.constant([n], tf.int64)
    return tf.reshape(tf.cast(n, tf.int64), [1])


def _size(shape: Any) -> Any:
    """Number of elements: an int for a static shape, else an int64 scalar tensor."""
    static = tf.TensorShape(None) if isinstance(shape, tf.Tensor) else tf.TensorShape(shape)
    if static.is_fully_defined():
        return static.num_elements()
    return tf.cast(tf.reduce_prod(shape), tf.int64)

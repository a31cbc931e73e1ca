"""The Gaussian mechanism's randomness: a secret key, and noise that is a pure function of it.

The noise of a release is drawn from TensorFlow's counter-based Philox generator with a
seed derived from ``(key, step, draw, variable)``:

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
            seed = tf.random.experimental.stateless_fold_in(
                tf.identity(self.key), tf.cast(step, tf.int64), alg="philox"
            )
            return tf.random.experimental.stateless_fold_in(seed, draw, alg="philox")


def noisy_average(
    clipped_sum: Sequence[tf.Tensor],
    stddev: tf.Tensor | float,
    denominator: tf.Tensor | float,
    seed: tf.Tensor,
    correlate: Callable[[list[tf.Tensor]], list[tf.Tensor]] | None = None,
) -> list[tf.Tensor]:
    """``(clipped_sum + N(0, stddev^2 I)) / denominator``, an independent draw per variable.

    ``seed`` (``[2]`` int64, e.g. from ``NoiseKey.next_seed``) fixes all the noise: the
    draw for variable ``j`` uses the seed folded with ``j``. ``correlate`` maps the fresh
    draws to the noise actually added (BandMF, ``tf_autoclip.correlated_noise``).

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
    noise = [stddev * _standard_normal(tf.shape(s), seed, j) for j, s in enumerate(clipped_sum)]
    if correlate is not None:
        noise = correlate(noise)
    return [
        (tf.cast(s, tf.float32) + z) / denominator for s, z in zip(clipped_sum, noise, strict=True)
    ]


def _standard_normal(shape: tf.Tensor, seed: tf.Tensor, index: int) -> tf.Tensor:
    # Philox explicitly: the "auto_select" algorithm is ~30x slower under XLA on CPU
    # (1.7M normals: 1085 ms against 35 ms, measured on this project's machine).
    seed = tf.random.experimental.stateless_fold_in(seed, index, alg="philox")
    return tf.random.stateless_normal(shape, seed=seed, dtype=tf.float32, alg="philox")

"""The Gaussian mechanism: noise on the clipped sum, then normalization by the batch size."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf


def noisy_average(
    clipped_sum: Sequence[tf.Tensor],
    stddev: tf.Tensor | float,
    denominator: tf.Tensor | float,
    seed_generator: keras.random.SeedGenerator,
) -> list[tf.Tensor]:
    """``(clipped_sum + N(0, stddev^2 I)) / denominator``, one fresh draw per variable.

    Noise is drawn in float32 from TensorFlow's counter-based Philox generator, seeded
    by ``seed_generator``, like tensorflow-privacy's; it is not a cryptographic RNG.

    >>> sums = [tf.zeros([2])]
    >>> out = noisy_average(sums, 0.0, 4.0, keras.random.SeedGenerator(1))
    >>> out[0].numpy().tolist()
    [0.0, 0.0]
    """
    stddev = tf.cast(stddev, tf.float32)
    denominator = tf.cast(denominator, tf.float32)
    return [
        (tf.cast(s, tf.float32) + stddev * _standard_normal(s.shape, seed_generator)) / denominator
        for s in clipped_sum
    ]


def _standard_normal(
    shape: tf.TensorShape, seed_generator: keras.random.SeedGenerator
) -> tf.Tensor:
    # Philox explicitly: keras.random.normal's "auto_select" algorithm is ~30x slower under
    # XLA on CPU (1.7M normals: 1085 ms against 35 ms, measured on this project's machine).
    seed = tf.cast(seed_generator.next(), tf.int64)
    return tf.random.stateless_normal(shape, seed=seed, dtype=tf.float32, alg="philox")

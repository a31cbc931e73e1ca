"""The Gaussian mechanism of a DP step, as pure functions of data-independent settings.

A private step releases

    (sum_i c_i g_i + N(0, (sigma * S)^2 I)) / B

where ``sum_i c_i g_i`` is the clipped sum (``clipping.py``, the engines) and everything
else is fixed before the data is seen:

- ``S``, the sensitivity of the clipped sum: 1 for automatic clipping, R for Abadi; with
  microbatches of more than one example, 2S (one example moves a clipped microbatch mean
  by up to 2S, so ``noise_multiplier`` keeps its meaning for the accountant);
- ``B``, the divisor: ``expected_batch_size``, or the batch size fixed at the first batch
  (``batch_size.FixedBatchSize``); never the size of the batch at hand, which would
  release it;
- the noise seed, from ``noise.NoiseKey`` (never replayed, never saved);
- with BandMF (``correlated_noise.py``), the noise of earlier releases, which the fresh
  draw is correlated with (held in buffers that are never saved).

``calibrate`` turns the settings into the noise std and divisor; ``release`` applies them.
Neither reads the data: their only data-dependent input is ``clipped_sum``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import tensorflow as tf

from tf_autoclip import noise
from tf_autoclip.correlated_noise import NoiseCorrelator


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Noise std on this replica's clipped sum, and the divisor of the release."""

    stddev: tf.Tensor
    divisor: tf.Tensor
    is_update_step: tf.Tensor | bool = True  # noise (and BandMF's buffers) only then


def calibrate(
    *,
    noise_multiplier: float,
    sensitivity: float,
    fixed_rows: tf.Tensor | None,
    expected_batch_size: float | None,
    num_units: tf.Tensor | None = None,
    accumulation_steps: int = 1,
    is_update_step: tf.Tensor | bool = True,
    replicas: int = 1,
) -> Calibration:
    """The noise std and divisor of one release (pure; see the module docstring).

    Args:
      noise_multiplier: sigma.
      sensitivity: S of a per-example clipped sum.
      fixed_rows: rows of the (global) batch, fixed at the first batch; needed when
        ``expected_batch_size`` is None or with microbatches.
      expected_batch_size: the expected examples of a logical batch, or None.
      num_units: the number of microbatches of the (global) batch, or None per example.
      accumulation_steps: k of ``gradient_accumulation_steps``: noise enters once per
        logical batch, on its update step; Keras divides the accumulated sum by k, so
        the divisor returned here is the logical one over k.
      is_update_step: whether this step applies the logical batch (noise only then).
      replicas: replicas in sync. Every replica adds the same draw z / replicas (the key
        and step are mirrored) and Keras sums the replicas, so z enters the global sum once.

    >>> c = calibrate(noise_multiplier=2.0, sensitivity=1.0, fixed_rows=None,
    ...     expected_batch_size=8.0)
    >>> float(c.stddev), float(c.divisor)
    (2.0, 8.0)
    >>> c = calibrate(noise_multiplier=2.0, sensitivity=1.0, fixed_rows=tf.constant(8.0),
    ...     expected_batch_size=None, num_units=tf.constant(4.0), replicas=2)
    >>> float(c.stddev), float(c.divisor)  # microbatches of 2: 2S, over 2 replicas
    (2.0, 4.0)
    """
    if expected_batch_size is None:
        logical_rows = fixed_rows * accumulation_steps
    else:
        logical_rows = tf.constant(expected_batch_size, tf.float32)
    divisor = logical_rows  # expected examples in the logical (global) batch
    if num_units is not None:
        # Units are microbatches of the fixed size fixed_rows / num_units; single-example
        # microbatches keep S.
        divisor = logical_rows * num_units / fixed_rows
        sensitivity = sensitivity * tf.where(fixed_rows > num_units, 2.0, 1.0)
    stddev = noise_multiplier * sensitivity / replicas
    stddev = stddev * tf.cast(is_update_step, tf.float32)
    return Calibration(
        tf.cast(stddev, tf.float32),
        tf.cast(divisor / accumulation_steps, tf.float32),
        is_update_step,
    )


def release(
    clipped_sum: Sequence[tf.Tensor],
    calibration: Calibration,
    seed: tf.Tensor,
    correlator: NoiseCorrelator | None = None,
) -> list[tf.Tensor]:
    """``(clipped_sum + noise) / divisor``, the noise fixed by ``seed``: ``N(0, stddev^2 I)``,
    or with a BandMF ``correlator`` that draw correlated with the previous releases'.

    >>> c = Calibration(tf.constant(0.0), tf.constant(2.0))
    >>> release([tf.ones([2])], c, tf.constant([0, 1], tf.int64))[0].numpy().tolist()
    [0.5, 0.5]
    """
    correlate = None
    if correlator is not None:

        def correlate(noise: list[tf.Tensor]) -> list[tf.Tensor]:
            return correlator.correlate(noise, calibration.is_update_step)

    return noise.noisy_average(
        clipped_sum, calibration.stddev, calibration.divisor, seed, correlate
    )


def checked_num_microbatches(batch_size: tf.Tensor, num_microbatches: int) -> tf.Tensor:
    """``num_microbatches`` as a tensor, after checking that it divides the batch.

    >>> int(checked_num_microbatches(tf.constant(6), 3))
    3
    """
    message = f"The batch size must be a multiple of num_microbatches={num_microbatches}."
    static = tf.get_static_value(batch_size)
    if static is not None and static % num_microbatches:
        raise ValueError(f"{message} Got a batch of {static}.")
    check = tf.debugging.assert_equal(batch_size % num_microbatches, 0, message=message)
    with tf.control_dependencies([check]):
        return tf.identity(tf.constant(num_microbatches))

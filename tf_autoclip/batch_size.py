"""The batch size a private step divides by when ``expected_batch_size=None``.

Dividing each batch's clipped sum by that batch's own size would release the size (a
partial last batch releases ``n mod B``; variable batches their sizes), so the divisor is
fixed at the first batch and a batch of another size is refused with the fix.
"""

from __future__ import annotations

import tensorflow as tf


class FixedBatchSize:
    """The batch size fixed at the first private step (also with microbatches, whose size
    must not vary). Under XLA, which drops assertions, the divisor still stays the first
    size (never a later batch's). Not saved: a reloaded optimizer fixes it again.

    >>> fixed = FixedBatchSize()
    >>> float(fixed.check(tf.constant(8.0))), float(fixed.check(tf.constant(8.0)))
    (8.0, 8.0)
    >>> fixed.check(tf.constant(3.0))
    Traceback (most recent call last):
    ...
    ValueError: This batch has a different size than the first one, ... 8, 3.
    """

    _MESSAGE = (
        "This batch has a different size than the first one, and a DP optimizer with "
        "expected_batch_size=None divides every batch by the first batch's size (dividing "
        "by each batch's own size would release it). Set the optimizer's "
        "expected_batch_size=B (then every batch, a partial last one included, is divided "
        "by B), batch a tf.data.Dataset with drop_remainder=True, or sample batches with "
        "tf_autoclip.poisson_sample. First batch size, this batch size:"
    )
    _EMPTY = (
        "Empty batch: a DP optimizer with expected_batch_size=None fixes its divisor at the "
        "first batch's size. Set expected_batch_size (e.g. under Poisson sampling)."
    )

    def __init__(self) -> None:
        self.variable = tf.Variable(
            0.0,
            trainable=False,
            name="dp_batch_size",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        self.static: float | None = None  # the first size seen while tracing, if static

    def check(self, rows: tf.Tensor) -> tf.Tensor:
        """The first batch's size (float32), recording ``rows`` if this is the first."""
        static = tf.get_static_value(rows)
        if static is not None and static > 0:
            if self.static is not None and float(static) != self.static:
                raise ValueError(f"{self._MESSAGE} {self.static:g}, {float(static):g}.")
            self.static = float(static)
        current = self.variable.read_value()
        first = tf.equal(current, 0.0)
        same = tf.logical_or(first, tf.equal(current, rows))
        checks = [
            tf.debugging.Assert(rows > 0, [self._EMPTY]),
            tf.debugging.Assert(same, [self._MESSAGE, current, rows]),
        ]
        with tf.control_dependencies(checks):
            # max(., 1): under XLA (assertions dropped) an empty first batch fixes nothing.
            fixed = tf.where(first, tf.maximum(rows, 1.0), current)
            update = self.variable.assign(tf.where(first & (rows > 0), rows, current))
        with tf.control_dependencies([update]):
            return tf.identity(fixed)

"""The mechanism's calibration: the noise std and divisor follow the README's table.

Pure functions of data-independent settings (tf_autoclip/mechanism.py); the end-to-end
noise statistics are in noise_test.py.
"""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_autoclip import mechanism


def calibrate(**kwargs):
    settings = {"noise_multiplier": 1.5, "sensitivity": 0.5, "fixed_rows": None}
    settings.update(kwargs)
    c = mechanism.calibrate(**settings)
    return float(c.stddev), float(c.divisor)


class CalibrateTest(tf.test.TestCase, parameterized.TestCase):
    def test_expected_batch_size_is_the_divisor(self):
        self.assertAllClose(calibrate(expected_batch_size=64.0), (0.75, 64.0))

    def test_first_batch_size_is_the_divisor(self):
        fixed = tf.constant(32.0)
        self.assertAllClose(calibrate(fixed_rows=fixed, expected_batch_size=None), (0.75, 32.0))

    @parameterized.parameters((8.0, 2.0), (8.0, 1.0))
    def test_microbatches(self, rows, per_unit):
        units = rows / per_unit
        got = calibrate(
            fixed_rows=tf.constant(rows), expected_batch_size=None, num_units=tf.constant(units)
        )
        sensitivity = 0.5 * (2.0 if per_unit > 1 else 1.0)  # 2S unless single examples
        self.assertAllClose(got, (1.5 * sensitivity, units))

    def test_accumulation_noise_only_on_update_steps(self):
        on = calibrate(expected_batch_size=64.0, accumulation_steps=4, is_update_step=True)
        off = calibrate(expected_batch_size=64.0, accumulation_steps=4, is_update_step=False)
        # Keras divides the accumulated sum by k: the logical divisor 64 becomes 64 / 4.
        self.assertAllClose(on, (0.75, 16.0))
        self.assertAllClose(off, (0.0, 16.0))

    def test_replicas_share_the_noise(self):
        self.assertAllClose(calibrate(expected_batch_size=64.0, replicas=4), (0.75 / 4, 64.0))


class ReleaseTest(tf.test.TestCase):
    def test_noise_std_and_divisor(self):
        c = mechanism.Calibration(tf.constant(3.0), tf.constant(2.0))
        out = mechanism.release([tf.zeros([200_000])], c, tf.constant([5, 6], tf.int64))[0]
        # std 3 / 2; the estimate's relative standard error is 1/sqrt(2n) = 0.16%.
        self.assertAllClose(np.std(out.numpy()), 1.5, rtol=0.01)
        self.assertLess(abs(np.mean(out.numpy())), 0.02)


if __name__ == "__main__":
    tf.test.main()

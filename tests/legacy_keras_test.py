"""tf-keras (Keras 2, ``TF_USE_LEGACY_KERAS=1``): DP optimizers used with no model wrapper.

``TF_USE_LEGACY_KERAS`` must be set before TensorFlow is imported, so the checks run in one
subprocess (tests/legacy_keras_runner.py), which reports each check's outcome; each test
here asserts one of them. Skipped only if tf_keras is not installed.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

import keras
import tensorflow as tf

from tf_autoclip import legacy, optimizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_TF_KERAS = importlib.util.find_spec("tf_keras") is not None

# The runner's checks (tests/legacy_keras_runner.py); test_all_checks_are_listed keeps
# this list in sync.
CHECKS = [
    "test_tf_keras_is_active",
    "test_step_equals_per_example_loop_mlp_auto_s",
    "test_step_equals_per_example_loop_mlp_auto_v",
    "test_step_equals_per_example_loop_mlp_abadi",
    "test_step_equals_per_example_loop_cnn_auto_s",
    "test_step_equals_per_example_loop_cnn_abadi_per_layer",
    "test_step_equals_per_example_loop_embedding_auto_s",
    "test_step_equals_per_example_loop_lstm_abadi",
    "test_step_equals_per_example_loop_mlp_abadi_microbatches",
    "test_step_equals_per_example_loop_mlp_auto_s_optimizer_v2",
    "test_mirrored_strategy_step_equals_single_device_step",
    "test_noise_std_with_zero_gradients_auto_s",
    "test_noise_std_with_zero_gradients_abadi",
    "test_noise_std_with_zero_gradients_expected_batch_size",
    "test_noise_std_with_zero_gradients_microbatches",
    "test_noise_std_with_zero_gradients_optimizer_v2",
    "test_noise_std_with_zero_gradients_mirrored",
    "test_noise_is_reproducible_from_the_seed_and_fresh_each_step",
    "test_scalar_loss_is_refused",
    "test_non_private_gradients_are_refused",
    "test_fit_two_epochs",
    "test_every_builtin_optimizer_trains",
    "test_config_round_trip_and_saving",
    "test_invalid_arguments",
    "test_batch_mixing_layer_is_refused_batch_normalization",
    "test_batch_mixing_layer_is_refused_batch_mixing_lambda",
    "test_vouched_custom_layer_trains",
    "test_package_exports",
]


def _run_checks():
    out = os.path.join(tempfile.mkdtemp(), "legacy.json")
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.legacy_keras_runner", out],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    if not os.path.exists(out):
        raise AssertionError(f"legacy runner crashed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    with open(out, encoding="utf-8") as f:
        return json.load(f)


class LegacyKerasTest(tf.test.TestCase):
    results = None

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if HAVE_TF_KERAS:
            cls.results = _run_checks()

    def check(self, name):
        if not HAVE_TF_KERAS:
            self.skipTest("tf_keras is not installed (pip install 'tf-keras>=2.16')")
        self.assertIn(name, self.results, f"the runner did not run {name}")
        outcome = self.results[name]
        if outcome["status"] == "skip":
            self.skipTest(outcome["detail"])
        if outcome["status"] != "ok":
            self.fail(f"{name} failed in the tf-keras process:\n{outcome['detail']}")

    def test_all_checks_are_listed(self):
        if not HAVE_TF_KERAS:
            self.skipTest("tf_keras is not installed (pip install 'tf-keras>=2.16')")
        self.assertCountEqual(self.results, CHECKS)

    # Outside legacy mode too: no tf_keras import needed.
    def test_legacy_keras_requested(self):
        for value, want in [
            ("1", True), ("true", True), ("TRUE", True), ("Yes", True), (" yes ", True),
            ("0", False), ("false", False), ("", False), ("no", False),
        ]:  # fmt: skip
            with mock.patch.dict(os.environ, {"TF_USE_LEGACY_KERAS": value}):
                self.assertEqual(legacy.legacy_keras_requested(), want, value)
        with mock.patch.dict(os.environ, clear=True):
            self.assertFalse(legacy.legacy_keras_requested())

    def test_make_private_says_no_wrapper_is_needed(self):
        with self.assertRaisesRegex(RuntimeError, "not needed with tf-keras"):
            legacy.make_private(keras.Sequential([keras.layers.Dense(1)]))

    def test_keras_3_classes_go_to_the_keras_3_factory(self):
        self.assertIs(legacy.make_dp_optimizer_class(keras.optimizers.SGD), optimizers.DPAutoSGD)
        with self.assertRaisesRegex(TypeError, "already a DP optimizer"):
            legacy.make_dp_optimizer_class(optimizers.DPAutoSGD)
        with self.assertRaisesRegex(TypeError, "tf_keras optimizer class"):
            legacy.make_dp_optimizer_class(int)


def _add_check(name):
    def test(self):
        self.check(name)

    test.__name__ = name
    setattr(LegacyKerasTest, name, test)


for _name in CHECKS:
    _add_check(_name)


if __name__ == "__main__":
    tf.test.main()

"""examples/finetune_kerashub.py runs end to end on tiny settings (skipped without keras_hub).

The script's own library calls are checked like the other training scripts' (see
``examples_support.CALLS``).
"""

import importlib.util
import os
import unittest

import tensorflow as tf

from tests import examples_support
from tests.examples_support import REPO, run_main

if importlib.util.find_spec("keras_hub") is None:
    raise unittest.SkipTest("keras_hub is not installed (pip install 'tf-autoclip[hub]')")

from examples import finetune_kerashub  # noqa: E402

SMALL = (
    "--sequence_length=16", "--backbone_layers=1", "--backbone_heads=2", "--hidden_dim=8",
    "--intermediate_dim=16", "--batch_size=16", "--epochs=1", "--seed=0",
)  # fmt: skip


class FinetuneKerasHubTest(examples_support.ExamplesTestBase):
    def test_private_lora_runs_on_the_fast_engine(self):
        path = self.output("kerashub.json")
        record, stdout = run_main(
            finetune_kerashub, f"--data_dir={self.data_dir}", *SMALL, "--lora_rank=2",
            "--target_epsilon=8", f"--output_json={path}",
        )  # fmt: skip
        written = self.check_record(record, path, target_epsilon=8.0)
        self.assertEqual(written["engine"], "bk")
        self.assertFalse(written["pretrained"])
        self.assertLess(written["trainable_parameters"], written["parameters"])
        self.assertIn("no pretrained weights: random init", written["privacy_statement"])
        self.assertIn("no pretrained weights: random init", stdout)

    def test_non_private(self):
        path = self.output("kerashub_baseline.json")
        record, _ = run_main(
            finetune_kerashub, f"--data_dir={self.data_dir}", *SMALL, "--non_private",
            f"--output_json={path}",
        )  # fmt: skip
        self.check_record(record, path, target_epsilon=None)

    def test_script_makes_the_library_calls(self):
        with open(os.path.join(REPO, "examples", "finetune_kerashub.py"), encoding="utf-8") as f:
            source = f.read()
        for call in examples_support.CALLS:
            with self.subTest(call=call):
                self.assertIn(call, source)


if __name__ == "__main__":
    tf.test.main()

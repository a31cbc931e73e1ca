"""Shared by the example tests: tiny generated data in the documented layouts, running a
script's ``main`` with flags (in-process) or as a subprocess, and a TestCase base that
checks the JSON record every training script writes."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl import flags

from examples import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
FLAGS = flags.FLAGS
NUM_TRAIN, NUM_TEST = 64, 32
POSITIVE = ["good", "great", "fun", "moving", "superb", "charming"]
NEGATIVE = ["bad", "awful", "boring", "dull", "weak", "tedious"]


def _write_images(path: str, rng: np.random.Generator) -> None:
    y_train = rng.integers(0, 10, NUM_TRAIN).astype(np.uint8)
    y_test = rng.integers(0, 10, NUM_TEST).astype(np.uint8)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (NUM_TRAIN, 28, 28)).astype(np.uint8),
        y_train=y_train,
        x_test=rng.integers(0, 256, (NUM_TEST, 28, 28)).astype(np.uint8),
        y_test=y_test,
    )


def _write_tsv(path: str, header: str, rows: int, rng: np.random.Generator) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"label\t{header}\n")
        for _ in range(rows):
            label = int(rng.integers(0, 2))
            words = rng.choice(POSITIVE if label else NEGATIVE, size=int(rng.integers(2, 12)))
            f.write(f"{label}\tthe film is {' , '.join(words)} .\n")


def write_tiny_data(root: str) -> None:
    """mnist.npz, fashion_mnist.npz and sst2/{train,dev}.tsv in the documented layouts."""
    rng = np.random.default_rng(0)
    _write_images(os.path.join(root, "mnist.npz"), rng)
    _write_images(os.path.join(root, "fashion_mnist.npz"), rng)
    os.makedirs(os.path.join(root, "sst2"))
    _write_tsv(os.path.join(root, "sst2", "train.tsv"), "sentence", NUM_TRAIN, rng)
    _write_tsv(os.path.join(root, "sst2", "dev.tsv"), "content", NUM_TEST, rng)  # as GLUE's


def reset_flags() -> None:
    """All flags back to their defaults, parsed (absltest's own flags need that)."""
    FLAGS.unparse_flags()
    FLAGS([sys.argv[0]], known_only=True)


def run_main(module, *args: str) -> tuple[dict, str]:
    """Runs ``module.main`` with these command-line flags; returns (record, stdout)."""
    argv = [module.__file__, *args]
    FLAGS.unparse_flags()
    FLAGS(argv)
    keras.backend.clear_session()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            record = module.main(argv[:1])
    finally:
        reset_flags()
    return record, out.getvalue()


def run_script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(
        [REPO, *filter(None, [environment.get("PYTHONPATH")])]
    )
    environment.pop(common.DATA_DIR_ENV, None)
    return subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *args],
        capture_output=True, text=True, env=environment, timeout=300, check=False,
    )  # fmt: skip


class ExamplesTestBase(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        reset_flags()
        cls.data_dir = tempfile.mkdtemp(prefix="tf_autoclip_examples_")
        write_tiny_data(cls.data_dir)

    def setUp(self):
        super().setUp()
        self.out_dir = self.create_tempdir().full_path
        patcher = mock.patch.dict(os.environ)
        patcher.start()
        os.environ.pop(common.DATA_DIR_ENV, None)
        self.addCleanup(patcher.stop)

    def output(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def check_record(self, record: dict, path: str, target_epsilon: float | None) -> dict:
        """The JSON file exists, agrees with the record and has the contract fields."""
        with open(path, encoding="utf-8") as f:
            written = json.load(f)
        for key in ("test_accuracy", "epsilon", "delta", "noise_multiplier", "steps", "seconds"):
            self.assertIn(key, written)
            self.assertEqual(written[key], record[key], key)
        self.assertIn("flags", written)
        self.assertBetween(written["test_accuracy"], 0.0, 1.0)
        self.assertGreater(written["seconds"], 0.0)
        self.assertGreater(written["steps"], 0)
        if written["flags"]["non_private"]:
            self.assertIsNone(written["epsilon"])
            self.assertIsNone(written["noise_multiplier"])
            self.assertNotIn("epsilon", written["history"])
        else:
            self.assertTrue(math.isfinite(written["epsilon"]))
            self.assertGreater(written["epsilon"], 0.0)
            self.assertGreater(written["noise_multiplier"], 0.0)
            if target_epsilon is not None:
                self.assertLessEqual(written["epsilon"], target_epsilon)
            self.assertLen(written["history"]["epsilon"], written["epochs_run"])
            self.assertAllClose(written["history"]["epsilon"][-1], written["epsilon"])
        return written


# The library calls every training script makes itself (the examples read as a user's script).
CALLS = (
    "import tf_autoclip as ac",
    "ac.poisson_sample(",
    "ac.compute_noise_multiplier(",
    'getattr(ac, "DPAuto"',
    "ac.make_private(",
    "ac.PrivacyCallback(",
    "ac.privacy_statement(",
)

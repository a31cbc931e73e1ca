"""End-to-end tests of the example scripts on tiny generated data (seconds each).

The scripts run in-process through their ``main(argv)`` with the absl flags reset
(TensorFlow is imported once; ``from examples import ...``, the repository root on
``sys.path``), except for the command-line checks, which run ``python examples/NAME.py``
as a subprocess.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import tensorflow as tf
from absl import app

from examples import clipping_sweep, common, mnist_cnn, paper_results, sst2_transformer
from tests import examples_support
from tests.examples_support import (
    EXAMPLES,
    NUM_TEST,
    NUM_TRAIN,
    REPO,
    ExamplesTestBase,
    run_main,
    run_script,
)


class ScriptSourceTest(tf.test.TestCase):
    """The examples read as a user's script: the library calls are in the script itself."""

    CALLS = examples_support.CALLS

    def read(self, *path: str) -> str:
        with open(os.path.join(REPO, *path), encoding="utf-8") as f:
            return f.read()

    def test_training_scripts_make_the_library_calls(self):
        for script in ("mnist_cnn.py", "sst2_transformer.py"):
            source = self.read("examples", script)
            for call in self.CALLS:
                with self.subTest(script=script, call=call):
                    self.assertIn(call, source)
        # The shared plumbing makes none: it does not import the library.
        common_source = self.read("examples", "common.py")
        self.assertNotRegex(common_source, r"(?m)^\s*(import|from) tf_autoclip")

    def test_no_sys_path_edits(self):
        # A script's own folder is on sys.path when run as a file; imported, it is
        # examples.<name> (the scripts pick their imports by __package__).
        for name in sorted(os.listdir(EXAMPLES)):
            if name.endswith(".py"):
                with self.subTest(name=name):
                    self.assertNotRegex(
                        self.read("examples", name),
                        r"sys\.path\.(insert|append|extend)\(|sys\.path\s*\+?=",
                    )


class MnistCnnTest(ExamplesTestBase):
    def test_model_is_tramer_boneh_cnn(self):
        model = mnist_cnn.build_model()
        self.assertEqual(model.count_params(), 26_010)
        self.assertEqual(model.output_shape, (None, 10))

    def test_automatic_clipping_learning_rate_is_eta_times_r(self):
        auto = mnist_cnn.default_hyperparameters("mnist", "auto-s", None)
        abadi = mnist_cnn.default_hyperparameters("mnist", "abadi", None)
        self.assertAllClose(auto["learning_rate"], 0.05)
        self.assertAllClose(abadi["learning_rate"] * abadi["l2_norm_clip"], 0.05)
        fashion = mnist_cnn.default_hyperparameters("fashion_mnist", "auto-s", "sgd")
        self.assertAllClose(fashion["learning_rate"], 0.4)
        self.assertEqual((fashion["batch_size"], fashion["momentum"]), (2048, 0.9))
        self.assertNotIn("momentum", mnist_cnn.default_hyperparameters("mnist", "auto-s", "adam"))

    def test_private_poisson_reaches_target_epsilon(self):
        path = self.output("mnist.json")
        record, stdout = run_main(
            mnist_cnn, f"--data_dir={self.data_dir}", "--epochs=2", "--batch_size=16",
            "--target_epsilon=3", "--seed=1", f"--output_json={path}",
        )  # fmt: skip
        written = self.check_record(record, path, target_epsilon=3.0)
        self.assertEqual(written["steps"], 2 * round(NUM_TRAIN / 16))  # Poisson steps
        self.assertEqual(written["sampling"], "poisson")
        self.assertTrue(written["epsilon_proven"])
        self.assertFalse(written["stopped_by_privacy_budget"])
        self.assertEqual(written["flags"]["clipping"], "auto-s")
        self.assertEqual(written["flags"]["optimizer"], "sgd")
        self.assertAllClose(written["flags"]["learning_rate"], 0.05)
        self.assertAllClose(written["flags"]["momentum"], 0.9)
        self.assertEqual(written["model_parameters"], 26_010)
        self.assertEqual(written["history"]["epoch"], [1, 2])
        self.assertIn("val_accuracy", written["history"])
        self.assertIn("differential privacy", stdout)  # the privacy statement
        final = stdout.strip().splitlines()[-1]
        self.assertStartsWith(final, "FINAL test_accuracy=")
        self.assertIn("epsilon=", final)

    def test_fashion_abadi_adam_shuffle_noise_multiplier(self):
        path = self.output("fashion.json")
        record, _ = run_main(
            mnist_cnn, f"--data_dir={self.data_dir}", "--dataset=fashion_mnist",
            "--clipping=abadi", "--l2_norm_clip=0.5", "--optimizer=adam",
            "--learning_rate=0.001", "--sampling=shuffle", "--noise_multiplier=1.5",
            "--batch_size=20", "--epochs=1", "--max_test_examples=10", f"--output_json={path}",
        )  # fmt: skip
        written = self.check_record(record, path, target_epsilon=None)
        self.assertEqual(written["steps"], math.ceil(NUM_TRAIN / 20))  # the last batch is kept
        self.assertEqual(written["noise_multiplier"], 1.5)
        self.assertFalse(written["epsilon_proven"])
        self.assertGreater(written["epsilon_shuffle_bound"], written["epsilon"])
        self.assertEqual(written["num_test_examples"], 10)
        self.assertEqual(
            (written["dataset"], written["flags"]["l2_norm_clip"]), ("fashion_mnist", 0.5)
        )

    def test_non_private_reports_no_epsilon(self):
        path = self.output("baseline.json")
        os.environ[common.DATA_DIR_ENV] = self.data_dir  # the environment variable works too
        record, stdout = run_main(
            mnist_cnn, "--non_private", "--epochs=1", "--batch_size=32", f"--output_json={path}"
        )
        self.check_record(record, path, target_epsilon=None)
        self.assertIn("non-private", stdout.strip().splitlines()[-1])

    def test_default_data_comes_from_tensorflow_datasets(self):
        import tensorflow_datasets as tfds

        with tfds.testing.mock_data(num_examples=24):
            record, _ = run_main(mnist_cnn, "--epochs=1", "--batch_size=8", "--noise_multiplier=1")
        self.assertEqual(record["num_train_examples"], 24)
        self.assertTrue(math.isfinite(record["epsilon"]))

    def test_missing_data_message(self):
        empty = self.create_tempdir().full_path
        with self.assertRaisesRegex(common.DataNotFoundError, "mnist.npz") as error:
            run_main(mnist_cnn, f"--data_dir={empty}")
        message = str(error.exception)
        for way in ("tfds.load('mnist')", "--data_dir=DIR", common.DATA_DIR_ENV):
            self.assertIn(way, message)

    def test_contradicting_flags_are_refused(self):
        for args in (
            ["--target_epsilon=3", "--noise_multiplier=1"],
            ["--clipping=abadi", "--l2_norm_clip=-1", "--optimizer=adam"],
            ["--l2_norm_clip=0.1"],  # automatic clipping has no threshold
            ["--optimizer=adam", "--momentum=0.9"],
        ):
            with self.subTest(args=args), self.assertRaises((ValueError, app.UsageError)):
                run_main(
                    mnist_cnn, f"--data_dir={self.data_dir}", "--epochs=1", "--batch_size=16", *args
                )

    def test_command_line(self):
        empty = self.create_tempdir().full_path
        result = run_script("mnist_cnn.py", f"--data_dir={empty}")
        self.assertEqual(result.returncode, 1, result.stderr[-2000:])
        self.assertIn("ERROR: The mnist data set is not available", result.stderr)
        self.assertIn(common.DATA_DIR_ENV, result.stderr)


class DistributedMnistTest(ExamplesTestBase):
    def test_two_logical_devices(self):
        # A subprocess: logical devices must be configured before TensorFlow starts.
        path = self.output("distributed.json")
        result = run_script(
            "distributed_mnist.py", "--num_cpu_devices=2", f"--data_dir={self.data_dir}",
            "--epochs=1", "--batch_size=32", f"--output_json={path}",
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("Trained on 2 replicas", result.stdout)
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        self.assertEqual(record["replicas"], 2)
        self.assertLessEqual(record["epsilon"], 3.0)
        self.assertTrue(math.isfinite(record["test_accuracy"]))


class Sst2TransformerTest(ExamplesTestBase):
    SMALL = (
        "--vocab_size=40", "--max_length=12", "--embed_dim=8", "--num_heads=2", "--ff_dim=8",
        "--batch_size=16", "--epochs=1",
    )  # fmt: skip

    def test_private(self):
        path = self.output("sst2.json")
        record, stdout = run_main(
            sst2_transformer, f"--data_dir={self.data_dir}", *self.SMALL,
            "--target_epsilon=8", f"--output_json={path}",
        )  # fmt: skip
        written = self.check_record(record, path, target_epsilon=8.0)
        self.assertEqual(written["num_test_examples"], NUM_TEST)  # dev.tsv's 'content' column
        self.assertEqual(written["flags"]["optimizer"], "adamw")
        self.assertEqual(written["flags"]["vocab_size"], 40)
        self.assertFalse(written["vocabulary_is_private"])
        self.assertIn("NOT covered by the DP guarantee", written["privacy_statement"])
        self.assertIn("NOT covered by the DP guarantee", stdout)

    def test_non_private(self):
        path = self.output("sst2_baseline.json")
        record, _ = run_main(
            sst2_transformer, f"--data_dir={self.data_dir}", *self.SMALL, "--non_private",
            f"--output_json={path}",
        )  # fmt: skip
        self.check_record(record, path, target_epsilon=None)

    def test_missing_data_message(self):
        empty = self.create_tempdir().full_path
        with self.assertRaisesRegex(common.DataNotFoundError, "sst2/train.tsv") as error:
            run_main(sst2_transformer, f"--data_dir={empty}")
        self.assertIn("tfds.load('glue/sst2')", str(error.exception))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PlotsTest(ExamplesTestBase):
    def assert_png(self, path: str) -> None:
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), PNG_SIGNATURE)
        self.assertGreater(os.path.getsize(path), 10_000)

    def test_clipping_sweep_writes_heat_map(self):
        png, path = self.output("sweep.png"), self.output("sweep.json")
        record, stdout = run_main(
            clipping_sweep, f"--data_dir={self.data_dir}", "--l2_norm_clips=0.1,1",
            "--sgd_learning_rates=0.5", "--adam_learning_rates=0.001",
            "--auto_sgd_learning_rates=0.05", "--batch_size=16", "--epochs=1",
            f"--output_png={png}", f"--output_json={path}",
        )  # fmt: skip
        self.assert_png(png)
        with open(path, encoding="utf-8") as f:
            written = json.load(f)
        kinds = {(r["clipping"], r["optimizer"], r["l2_norm_clip"]) for r in written["runs"]}
        self.assertLen(written["runs"], 2 * 1 + 2 * 1 + 1 + 1)
        self.assertIn(("auto-s", "sgd", None), kinds)
        self.assertIn(("abadi", "adam", 1.0), kinds)
        self.assertLessEqual(written["epsilon"], 3.0)  # every run: same sigma, default target
        self.assertEqual(
            set(written["best"]), {"abadi+sgd", "abadi+adam", "auto-s+sgd", "auto-s+adam"}
        )
        self.assertIn("sweep as a whole", stdout)
        self.assertEqual(record["test_accuracy"], max(r["test_accuracy"] for r in written["runs"]))

    def test_plot_training_from_output_json(self):
        path = self.output("run.json")
        run_main(mnist_cnn, f"--data_dir={self.data_dir}", "--epochs=2", "--batch_size=16",
                 f"--output_json={path}")  # fmt: skip
        png = self.output("history.png")
        result = run_script("plot_training.py", f"--history_json={path}", f"--output_png={png}")
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assert_png(png)
        with open(path, encoding="utf-8") as f:  # a bare history works too
            history = json.load(f)["history"]
        bare = self.output("history.json")
        with open(bare, "w", encoding="utf-8") as f:
            json.dump(history, f)
        result = run_script("plot_training.py", f"--history_json={bare}")
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assert_png(self.output("history.png"))


class PaperResultsTest(ExamplesTestBase):
    def test_runs_each_seed_once_and_tabulates_every_run(self):
        runs_dir, md = self.output("runs"), self.output("results.md")
        with open(md, "w", encoding="utf-8") as f:
            f.write(f"intro\n{paper_results.BEGIN}\nold\n{paper_results.END}\noutro\n")
        args = (
            "paper_results.py", f"--data_dir={self.data_dir}", f"--runs_dir={runs_dir}",
            f"--markdown={md}", "--datasets=mnist", "--methods=auto-s", "--seeds=0,1",
            "--epochs=1", "--batch_size=16",
        )  # fmt: skip
        result = run_script(*args)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        accuracies = []
        for seed in (0, 1):
            name = f"mnist_auto-s_batch_size16_epochs1_seed{seed}.json"
            with open(os.path.join(runs_dir, name)) as f:
                record = json.load(f)
            self.assertEqual(record["flags"]["seed"], seed)
            accuracies.append(100 * record["test_accuracy"])
        with open(md, encoding="utf-8") as f:
            text = f.read()
        self.assertStartsWith(text, "intro\n")
        self.assertEndsWith(text, "outro\n")
        self.assertNotIn("\nold\n", text)
        self.assertIn(f"**{np.mean(accuracies):.2f} ± {np.std(accuracies, ddof=1):.2f}**", text)
        # A second call finds both runs and runs nothing.
        result = run_script(*args)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertNotIn("Running:", result.stdout)

    def test_render_groups_by_setting_not_by_seed(self):
        def record(clipping, lr, seed, accuracy):
            flags_ = {"dataset": "mnist", "clipping": clipping, "learning_rate": lr,
                      "l2_norm_clip": 0.1 if clipping == "abadi" else None, "gamma": None,
                      "batch_size": 512, "epochs": 40, "momentum": 0.9, "delta": 1e-5,
                      "seed": seed}  # fmt: skip
            return {"flags": flags_, "test_accuracy": accuracy, "seconds": 150.0,
                    "epsilon": 2.99, "steps": 4688, "noise_multiplier": 1.12,
                    "file": f"{clipping}{lr}{seed}.json"}  # fmt: skip

        runs = [record("abadi", 0.5, 0, 0.97), record("abadi", 0.5, 1, 0.99),
                record("auto-s", 0.05, 0, 0.98), record("auto-s", 0.1, 0, 0.96)]  # fmt: skip
        table = paper_results.render(runs)
        self.assertIn("| abadi | 0.5 | 0.1 | 2 | **98.00 ± 1.41** |", table)
        self.assertIn("| auto-s | 0.05 | none | 1 | **98.00** |", table)
        self.assertIn("| auto-s | 0.1 | none | 1 | **96.00** |", table)
        self.assertEqual(table.count(".json` |"), 4)  # every run listed


if __name__ == "__main__":
    tf.test.main()

"""examples/audit.py, user_level.py and bandmf_mnist.py run as scripts on tiny settings.

Run as subprocesses (their flags would clash with the other examples' in one process).
"""

import re

import tensorflow as tf

from tests.examples_support import ExamplesTestBase, run_script


def _lower_bound_and_claim(stdout: str) -> tuple[float, float]:
    claimed = float(re.search(r"Claimed ε = ([0-9.]+)", stdout).group(1))
    bound = float(re.search(r"Empirical lower bound ε ≥ ([0-9.]+)", stdout).group(1))
    return bound, claimed


class AuditExampleTest(ExamplesTestBase):
    def test_honest_run_stays_below_and_broken_run_is_caught(self):
        honest = run_script("audit.py", "--num_canaries=2000")
        self.assertEqual(honest.returncode, 0, honest.stderr[-2000:])
        bound, claimed = _lower_bound_and_claim(honest.stdout)
        self.assertLess(bound, claimed)
        broken = run_script("audit.py", "--num_canaries=2000", "--broken")
        self.assertEqual(broken.returncode, 0, broken.stderr[-2000:])
        bound, claimed = _lower_bound_and_claim(broken.stdout)
        self.assertGreater(bound, claimed)


class UserLevelExampleTest(ExamplesTestBase):
    def test_user_level_run_prints_user_level_epsilon(self):
        result = run_script(
            "user_level.py", f"--data_dir={self.data_dir}", "--examples_per_user=4",
            "--batch_size=4", "--epochs=1", "--target_epsilon=8", "--seed=0",
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("User-level (ε, δ)-differential privacy", result.stdout)
        self.assertRegex(result.stdout, r"FINAL test_accuracy=[0-9.]+ epsilon=[0-9.]+")


class BandMFExampleTest(ExamplesTestBase):
    def test_both_runs_reach_the_same_target_epsilon(self):
        result = run_script(
            "bandmf_mnist.py", f"--data_dir={self.data_dir}", "--num_bands=2",
            "--batch_size=16", "--epochs=2", "--target_epsilon=4", "--seed=0",
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        runs = re.findall(r"(DP-SGD|BandMF\(2\)): test_accuracy=[0-9.]+ epsilon=([0-9.]+)",
                          result.stdout)  # fmt: skip
        self.assertEqual([name for name, _ in runs], ["DP-SGD", "BandMF(2)"])
        for _, epsilon in runs:
            self.assertLessEqual(float(epsilon), 4.0)
            self.assertGreater(float(epsilon), 3.5)
        self.assertIn("with BandMF noise of 2 bands", result.stdout)


if __name__ == "__main__":
    tf.test.main()

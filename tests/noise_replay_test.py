"""Noise is never replayed or predictable: save/load, fresh processes, preempted restarts.

Two releases that share their noise subtract to the noise-free difference of their clipped
sums, while the accountant counts them as independent. Every test here measures the
correlation of the noise of two releases that must be independent (it is 1.000 when noise
is replayed) on a 1,000-dimensional Dense kernel, where independent draws give |r| < 0.15
with probability > 1 - 1e-5.
"""

import os
import subprocess
import sys
import tempfile
import zipfile

import h5py
import keras
import numpy as np
import tensorflow as tf

from tests import noise_replay_runner as runner

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INDEPENDENT = 0.15  # |correlation| bound for independent 1,000-dim Gaussian draws


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def run(*args: str) -> dict[int, np.ndarray]:
    out = os.path.join(tempfile.mkdtemp(), "noise.npy")
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    subprocess.run(
        [sys.executable, "-m", "tests.noise_replay_runner", f"--out={out}", *args],
        cwd=_ROOT, env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return np.load(out, allow_pickle=True).item()


def steps(model: keras.Model, count: int) -> list[np.ndarray]:
    """The noise of ``count`` private steps (weight deltas, see noise_replay_runner)."""
    x, y = runner.data()
    recorder = runner.NoiseRecorder()
    model.fit(x, y, batch_size=runner.BATCH, epochs=count, verbose=0, callbacks=[recorder])
    return [recorder.noise[s] for s in sorted(recorder.noise)]


class SaveLoadTest(tf.test.TestCase):
    def test_fixed_seed_does_not_replay_after_load_model(self):
        model = runner.build(seed=5)
        first = steps(model, 3)
        path = os.path.join(self.get_temp_dir(), "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path, custom_objects={"zero_loss": runner.zero_loss})
        self.assertEqual(int(loaded.optimizer.iterations), 3)
        later = steps(loaded, 3)
        for a in first:
            for b in later:
                self.assertLess(abs(correlation(a, b)), _INDEPENDENT)

    def test_a_saved_file_does_not_predict_future_noise(self):
        # The reader of the file loads it and runs the same steps as the writer: with
        # seed=None their noise must be independent of the writer's.
        model = runner.build(seed=None)
        steps(model, 1)
        path = os.path.join(self.get_temp_dir(), "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path, custom_objects={"zero_loss": runner.zero_loss})
        for a, b in zip(steps(model, 2), steps(loaded, 2), strict=True):
            self.assertLess(abs(correlation(a, b)), _INDEPENDENT)
        key = model.optimizer._noise_key.key.numpy()
        arrays = []  # (visititems stops at the first result that is not None)
        with (
            zipfile.ZipFile(path) as archive,
            archive.open("model.weights.h5") as weights,
            h5py.File(weights, "r") as h5,
        ):
            h5.visititems(lambda _, obj: arrays.append(obj[()]) if hasattr(obj, "shape") else None)
        for array in arrays:
            self.assertFalse(np.array_equal(np.asarray(array).ravel()[:2], key))

    def test_two_releases_at_the_same_step_have_independent_noise(self):
        import tf_autoclip as ac

        model = runner.build(seed=3)
        x, y = runner.data()
        first = ac.private_gradients(model, x, y)
        second = ac.private_gradients(model, x, y)  # no apply in between: same step
        self.assertLess(abs(correlation(first[0].numpy(), second[0].numpy())), _INDEPENDENT)


class ProcessTest(tf.test.TestCase):
    def test_seed_none_differs_across_processes_seeded_alike(self):
        # Both processes call keras.utils.set_random_seed(0): the noise key must still
        # come from the OS, not from a generator the user seeded.
        a, b = run("--mode=fresh"), run("--mode=fresh")
        for step in a:
            self.assertLess(abs(correlation(a[step], b[step])), _INDEPENDENT)

    def test_fixed_seed_is_reproducible(self):
        a, b = run("--mode=fresh", "--seed=7"), run("--mode=fresh", "--seed=7")
        for step in a:
            self.assertAllClose(a[step], b[step], rtol=0, atol=0)

    def test_preempted_restart_draws_fresh_noise(self):
        backup = tempfile.mkdtemp()
        crashed = run("--mode=backup", f"--backup_dir={backup}", "--crash")
        self.assertEqual(sorted(crashed), [0, 1, 2])
        resumed = run("--mode=backup", f"--backup_dir={backup}")
        self.assertEqual(sorted(resumed), [2, 3])  # step 2 is run again after the restart
        for r in resumed.values():  # no resumed step reuses the noise of any earlier one
            self.assertGreater(np.std(r), 0.0)
            for c in crashed.values():
                self.assertLess(abs(correlation(c, r)), _INDEPENDENT)


if __name__ == "__main__":
    tf.test.main()

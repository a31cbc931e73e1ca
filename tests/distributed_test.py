"""tf.distribute: noise enters the global sum once; a distributed step equals one device's.

Each configuration runs in its own process (tests/distributed_runner.py): logical CPU
devices and TF_CONFIG must be set before TensorFlow starts.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8  # tests/distributed_runner.GLOBAL_BATCH


def _run(mode, *flags, env=None):
    out = os.path.join(tempfile.mkdtemp(), "out.npz")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.distributed_runner", mode, out, *flags],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return proc, out


def _finish(proc, out):
    _, err = proc.communicate(timeout=600)
    if proc.returncode:
        raise AssertionError(f"runner failed ({proc.returncode}):\n{err[-3000:]}")
    return np.load(out)


def run(mode, *flags):
    return _finish(*_run(mode, *flags))


def run_two_workers(*flags):
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    runs = []
    for index in range(2):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        runs.append(_run("worker", *flags, env=dict(os.environ, TF_CONFIG=json.dumps(tf_config))))
    return [_finish(*r) for r in runs]


def moved(result):
    return [result[k] for k in sorted(k for k in result.files if k.startswith("arr_"))]


class DistributedTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.single = run("single")

    def assert_same_step(self, result):
        for got, want in zip(moved(result), moved(self.single), strict=True):
            self.assertAllClose(got, want, rtol=1e-5, atol=1e-7)

    def test_mirrored_step_equals_single_device_step(self):
        result = run("mirrored", "--replicas=2")
        self.assertEqual(int(result["replicas"]), 2)
        self.assert_same_step(result)

    def test_multi_worker_step_equals_single_device_step(self):
        for result in run_two_workers():
            self.assertEqual(int(result["replicas"]), 2)
            self.assert_same_step(result)

    def test_noise_std_does_not_depend_on_replicas(self):
        # Zero inputs, no bias: every per-example gradient is 0, the update is pure noise
        # of std sigma * S / B. 18,000 weights: the std estimate's relative standard error
        # is 1/sqrt(2 * 18000) = 0.53%; allow 6 of them.
        flags = ("--sigma=2.0", "--zero_data", "--width=2000")
        # Two workers with seed=None: each process draws its own OS-entropy key, and the
        # strategy must give both the chief's (else the noise std falls by sqrt(2)).
        workers = run_two_workers(*flags, "--secret_seed")
        for a, b in zip(moved(workers[0]), moved(workers[1]), strict=True):
            self.assertAllEqual(a, b)
        for name, result in [
            ("1 replica", run("single", *flags)),
            ("2 replicas", run("mirrored", *flags)),
            ("2 workers, secret key", workers[0]),
        ]:
            with self.subTest(name):
                noise = np.concatenate([m.ravel() for m in moved(result)])
                self.assertEqual(noise.size, 18000)
                self.assertAllClose(noise.std(), 2.0 / BATCH, rtol=6 / np.sqrt(2 * noise.size))
                self.assertLess(abs(noise.mean()), 6 * (2.0 / BATCH) / np.sqrt(noise.size))

    def test_refused_under_replicas(self):
        # User-level clipping would clip a user's records split over replicas separately;
        # BandMF's buffers are not kept identical across replicas. Both must refuse.
        for flag, message in (
            ("--user_level", "several replicas"),
            ("--num_bands=2", "correlated_noise \\(BandMF\\) does not run under several"),
        ):
            with self.subTest(flag), self.assertRaisesRegex(AssertionError, message):
                run("mirrored", "--replicas=2", "--sigma=1.0", flag)
        run("single", "--sigma=1.0", "--num_bands=2")  # one replica: trains


if __name__ == "__main__":
    tf.test.main()

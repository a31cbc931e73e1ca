"""Training throughput (examples/s) of non-private Keras vs tf-autoclip, in one process.

Usage:
  python benchmarks/throughput.py --workloads=w1 --batch_size=256 --windows=5

Each configuration trains on random data of the workload's shape; after a warm-up
window, the median of ``--windows`` timed windows of ``--steps`` steps is reported,
with the ratio to non-private Keras measured in the same run.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

import tf_autoclip as ac

FLAGS = flags.FLAGS
flags.DEFINE_list("workloads", ["w1"], "Workloads to run: w1 (MNIST CNN).")
flags.DEFINE_integer("batch_size", 256, "Batch size.")
flags.DEFINE_integer("steps", 20, "Steps per timed window.")
flags.DEFINE_integer("windows", 5, "Timed windows (the median is reported).")
flags.DEFINE_list("configs", ["keras", "dp", "dp_xla"], "Configurations to time.")
flags.DEFINE_string("output_json", None, "Write the results here.")


def mnist_cnn() -> keras.Model:
    """Tramèr & Boneh's MNIST CNN (26,010 parameters)."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 8, strides=2, padding="same", activation="tanh"),
            keras.layers.MaxPool2D(2, 1),
            keras.layers.Conv2D(32, 4, strides=2, padding="valid", activation="tanh"),
            keras.layers.MaxPool2D(2, 1),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(10),
        ]
    )


WORKLOADS = {"w1": (mnist_cnn, (28, 28, 1), 10)}


def time_config(build, input_shape, classes, config: str) -> float:
    keras.utils.set_random_seed(0)
    model = build()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if config == "keras":
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    else:
        model = ac.make_private(model)
        optimizer = ac.DPAutoSGD(learning_rate=0.05, momentum=0.9, noise_multiplier=1.0)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=config.endswith("xla"))
    n = FLAGS.batch_size * FLAGS.steps
    x = np.random.rand(n, *input_shape).astype("float32")
    y = np.random.randint(0, classes, n)
    model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0)  # warm-up + trace
    rates = []
    for _ in range(FLAGS.windows):
        start = time.perf_counter()
        model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv):
    del argv
    results = []
    for name in FLAGS.workloads:
        build, shape, classes = WORKLOADS[name]
        rates = {c: time_config(build, shape, classes, c) for c in FLAGS.configs}
        for config, rate in rates.items():
            ratio = rate / rates["keras"] if "keras" in rates else float("nan")
            results.append(
                {"workload": name, "config": config, "examples_per_s": rate, "ratio": ratio}
            )
    print("| workload | config | examples/s | ratio to Keras non-DP |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['workload']} | {r['config']} | {r['examples_per_s']:.0f} | {r['ratio']:.2f} |")
    machine = f"{platform.machine()}, {tf.config.threading.get_inter_op_parallelism_threads()}"
    print(f"TF {tf.__version__}, Keras {keras.__version__}, {platform.processor() or machine}")
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)

r"""DP training of the MNIST CNN with tf.distribute: several devices or several workers.

The private step composes with ``tf.distribute``: each replica clips its own examples,
every replica draws the same noise z and adds z / R, and Keras sums the replicas, so the
noise enters the global sum once with std sigma * S (independent of the replica count).
``--batch_size`` is the global (expected) batch size, and accounting uses it.

One machine, its CPU split into 2 logical devices (MirroredStrategy)::

  python examples/distributed_mnist.py --strategy=mirrored --num_cpu_devices=2 \
      --data_dir=../shared/data --epochs=1

Two workers (MultiWorkerMirroredStrategy), one process each, same flags, TF_CONFIG set::

  TF_CONFIG='{"cluster": {"worker": ["localhost:12345", "localhost:12346"]},
              "task": {"type": "worker", "index": 0}}' \
      python examples/distributed_mnist.py --strategy=multi_worker --data_dir=... &
  TF_CONFIG='{... "index": 1}}' python examples/distributed_mnist.py --strategy=multi_worker ...

All other flags are those of ``examples/mnist_cnn.py``, and so is the private training:
its ``train_and_evaluate`` (``ac.poisson_sample``, ``ac.DPAuto<Optimizer>``,
``ac.make_private``, ``ac.PrivacyCallback``, ``ac.privacy_statement``) runs inside the
strategy's scope.
"""

from __future__ import annotations

import time

import tensorflow as tf
from absl import app, flags

if __package__:  # imported as examples.distributed_mnist (python -m)
    from examples import common, mnist_cnn
else:  # python examples/distributed_mnist.py: this script's folder is on sys.path
    import common
    import mnist_cnn

flags.DEFINE_enum(
    "strategy", "mirrored", ["mirrored", "multi_worker"], "The tf.distribute strategy."
)
flags.DEFINE_integer(
    "num_cpu_devices",
    0,
    "Split the CPU into this many logical devices (0: use the devices as they are).",
)
FLAGS = flags.FLAGS


def make_strategy(name: str, num_cpu_devices: int) -> tf.distribute.Strategy:
    """The strategy; logical CPU devices must be configured before TensorFlow starts."""
    if num_cpu_devices:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices
        )
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    devices = [d.name for d in tf.config.list_logical_devices("CPU")] if num_cpu_devices else None
    return tf.distribute.MirroredStrategy(devices)


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    start = time.time()
    strategy = make_strategy(FLAGS.strategy, FLAGS.num_cpu_devices)
    defaults = mnist_cnn.default_hyperparameters(FLAGS.dataset, FLAGS.clipping, FLAGS.optimizer)
    config = common.resolve_config(defaults, script_flags=("dataset", "strategy"))
    data = common.load_images(FLAGS.dataset, config)
    # Inside the scope: mnist_cnn.train_and_evaluate builds the CNN, ac.make_private(model),
    # the ac.DPAuto<Optimizer> and the ac.PrivacyCallback, as on one device.
    with strategy.scope():
        record = mnist_cnn.train_and_evaluate(data, config)
    record.update(dataset=FLAGS.dataset, replicas=strategy.num_replicas_in_sync)
    print(f"Trained on {strategy.num_replicas_in_sync} replicas ({FLAGS.strategy}).")
    common.finish(record, config, start)
    return record


if __name__ == "__main__":
    common.run(main)

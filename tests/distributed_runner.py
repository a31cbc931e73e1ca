"""Runs one private training step in a fresh process, under a tf.distribute strategy.

Used by distributed_test.py: logical devices and TF_CONFIG must be set before
TensorFlow starts, so each configuration gets its own process.

  python -m tests.distributed_runner MODE OUT.npz [--sigma S] [--replicas R]

MODE: ``single`` (no strategy), ``mirrored`` (MirroredStrategy over R logical CPUs) or
``worker`` (MultiWorkerMirroredStrategy; TF_CONFIG set by the caller).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["single", "mirrored", "worker"])
    parser.add_argument("out")
    parser.add_argument("--sigma", type=float, default=0.0)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--zero_data", action="store_true", help="all-zero inputs: pure noise")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--secret_seed", action="store_true", help="seed=None: an OS-entropy key")
    parser.add_argument("--user_level", action="store_true", help="clip per user (refused)")
    parser.add_argument("--num_bands", type=int, default=1, help="BandMF noise (refused if > 1)")
    args = parser.parse_args()
    if args.mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas
        )
        strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(args.replicas)])
    elif args.mode == "worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()

    import keras

    keras.config.disable_traceback_filtering()

    import tf_autoclip as ac

    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH, 6)).astype("float32")
    if args.zero_data:
        x[:] = 0.0
    y = rng.integers(0, 3, size=GLOBAL_BATCH).astype("int32")
    with strategy.scope():
        keras.utils.set_random_seed(0)
        layers = [keras.Input((6,)), keras.layers.Dense(args.width, activation="tanh")]
        if args.zero_data:  # no bias, zero input: every gradient is zero
            layers = [keras.Input((6,)), keras.layers.Dense(args.width, use_bias=False)]
        model = ac.make_private(
            keras.Sequential([*layers, keras.layers.Dense(3, use_bias=False)]),
            user_id_key="user_id" if args.user_level else None,
        )
        model.compile(
            optimizer=ac.DPAutoSGD(
                learning_rate=1.0,
                noise_multiplier=args.sigma,
                seed=None if args.secret_seed else 1,
                expected_batch_size=GLOBAL_BATCH if args.user_level else None,
                correlated_noise=ac.BandMF(args.num_bands) if args.num_bands > 1 else None,
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    before = [v.numpy() for v in model.trainable_variables]
    if args.user_level:  # each example its own user: refused under replicas all the same
        with strategy.scope():
            step = model.train_step
        dataset = tf.data.Dataset.from_tensor_slices(
            ({"inputs": x, "user_id": np.arange(GLOBAL_BATCH)}, y)
        ).batch(GLOBAL_BATCH)
        strategy.run(step, args=(next(iter(strategy.experimental_distribute_dataset(dataset))),))
        return
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    model.fit(dataset.with_options(options), epochs=1, verbose=0)
    moved = [b - v.numpy() for b, v in zip(before, model.trainable_variables, strict=True)]
    np.savez(args.out, *moved, replicas=strategy.num_replicas_in_sync)


if __name__ == "__main__":
    main()

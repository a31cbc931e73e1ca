"""Started by noise_replay_test.py in fresh processes: records the noise of private steps.

The model's loss is 0 for every example, so every clipped gradient is 0 and a private SGD
step at learning rate 1 moves the weights by exactly -noise / B: the weight deltas ARE the
noise. Like a user wanting reproducible runs, the process calls
``keras.utils.set_random_seed(0)`` first (it fixes Python's, NumPy's and TensorFlow's
generators, and so the model's initial weights).

    python -m tests.noise_replay_runner --mode=fresh --out=noise.npy [--seed=7]
    python -m tests.noise_replay_runner --mode=backup --backup_dir=D --out=noise.npy [--crash]
"""

from __future__ import annotations

import argparse

import keras
import numpy as np

import tf_autoclip as ac

BATCH = 4
STEPS = 3


def zero_loss(y_true, y_pred):
    return 0.0 * keras.ops.sum(y_pred, axis=-1) + 0.0 * keras.ops.sum(y_true, axis=-1)


def build(seed: int | None) -> keras.Model:
    model = ac.make_private(keras.Sequential([keras.Input((20,)), keras.layers.Dense(50)]))
    model.compile(
        optimizer=ac.DPAutoSGD(
            learning_rate=1.0, noise_multiplier=1.0, seed=seed, expected_batch_size=BATCH
        ),
        loss=zero_loss,
    )
    return model


class NoiseRecorder(keras.callbacks.Callback):
    """Each step's weight delta, keyed by the optimizer step it belongs to."""

    def __init__(self) -> None:
        super().__init__()
        self.noise: dict[int, np.ndarray] = {}

    def on_train_batch_begin(self, batch, logs=None):
        self._before = self.model.layers[-1].kernel.numpy().copy()

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations) - 1
        self.noise[step] = self.model.layers[-1].kernel.numpy() - self._before


class Crash(keras.callbacks.Callback):
    """Preemption: the process dies after the first step of epoch 2 (steps 0, 1 are
    backed up at the ends of epochs 0 and 1; step 2 ran, was logged, and is lost)."""

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) == 3:
            raise SystemExit(0)


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(BATCH, 20)).astype("float32"), np.zeros((BATCH, 50), "float32")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["fresh", "backup"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--backup_dir", default=None)
    parser.add_argument("--crash", action="store_true")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    model = build(args.seed)
    x, y = data()
    recorder = NoiseRecorder()
    callbacks = [recorder]
    if args.mode == "backup":
        callbacks.insert(0, keras.callbacks.BackupAndRestore(args.backup_dir))
        if args.crash:
            callbacks.append(Crash())
    try:
        model.fit(x, y, batch_size=BATCH, epochs=STEPS + 1, verbose=0, callbacks=callbacks)
    finally:
        np.save(args.out, {step: recorder.noise[step] for step in sorted(recorder.noise)})


if __name__ == "__main__":
    main()

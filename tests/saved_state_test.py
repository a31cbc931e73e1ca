"""No file the library lets a user save holds un-noised data: gradient accumulators.

With ``gradient_accumulation_steps=k`` noise enters once per virtual batch, on the update
step; in between, Keras' accumulators hold the clipped sum of the first batches without
noise. Every Keras way to write the optimizer to disk must write them as zeros.
"""

import os

import h5py
import keras
import numpy as np
import tensorflow as tf

import tf_autoclip as ac
from tests import testing_models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BATCH = 4


def accumulating_model() -> keras.Model:
    model = ac.make_private(testing_models.mlp())
    model.compile(
        optimizer=ac.DPAutoSGD(
            learning_rate=0.1, noise_multiplier=1.0, gradient_accumulation_steps=4,
            expected_batch_size=4 * BATCH,
        ),
        loss=LOSS,
    )  # fmt: skip
    return model


def h5_arrays(path: str) -> list[np.ndarray]:
    found = []
    with h5py.File(path, "r") as h5:
        # visititems stops at the first callback result that is not None.
        h5.visititems(
            lambda _, obj: found.append(np.asarray(obj[()])) if hasattr(obj, "shape") else None
        )
    return found


class SavedStateTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.model = accumulating_model()
        x, y = testing_models.data_for(self.model, 2 * BATCH)
        self.x, self.y = x, y

    def pending(self) -> list[np.ndarray]:
        """The accumulators in memory: the noise-free clipped sum of the pending batches."""
        values = [v.numpy() for v in self.model.optimizer._accumulated_gradients]
        self.assertGreater(max(np.abs(v).max() for v in values), 1e-3)
        return values

    def assert_not_saved(self, arrays: list[np.ndarray], pending: list[np.ndarray]) -> None:
        for secret in pending:
            for array in arrays:
                if array.shape == secret.shape:
                    self.assertFalse(np.allclose(array, secret, atol=1e-6))

    def test_model_save_and_save_weights(self):
        self.model.fit(self.x, self.y, batch_size=BATCH, verbose=0)  # 2 of 4 batches
        pending = self.pending()
        weights = os.path.join(self.get_temp_dir(), "w.weights.h5")
        self.model.save_weights(weights)
        self.assert_not_saved(h5_arrays(weights), pending)
        path = os.path.join(self.get_temp_dir(), "m.keras")
        self.model.save(path)
        loaded = keras.models.load_model(path)
        restored = [v.numpy() for v in loaded.optimizer._accumulated_gradients]
        self.assert_not_saved(restored, pending)
        self.assertAllEqual(int(loaded.optimizer._iterations), 2)
        loaded.fit(self.x, self.y, batch_size=BATCH, verbose=0)  # completes the batch
        self.assertEqual(int(loaded.optimizer.iterations), 1)

    def test_model_checkpoint_and_backup_and_restore(self):
        directory = self.get_temp_dir()
        checkpoint = keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "ckpt.weights.h5"), save_weights_only=True, save_freq=2
        )
        backup = keras.callbacks.BackupAndRestore(os.path.join(directory, "backup"), save_freq=2)

        class Stop(keras.callbacks.Callback):  # keep the backup: stop as a preemption would
            def on_train_batch_end(self, batch, logs=None):
                if batch == 1:
                    raise RuntimeError("preempted")

        with self.assertRaisesRegex(RuntimeError, "preempted"):
            self.model.fit(
                self.x, self.y, batch_size=BATCH, verbose=0, callbacks=[checkpoint, backup, Stop()]
            )
        pending = self.pending()
        files = [os.path.join(directory, "ckpt.weights.h5")]
        for root, _, names in os.walk(os.path.join(directory, "backup")):
            files += [os.path.join(root, n) for n in names if n.endswith(".h5")]
        self.assertLen(files, 2)
        for path in files:
            self.assert_not_saved(h5_arrays(path), pending)


if __name__ == "__main__":
    tf.test.main()

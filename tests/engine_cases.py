"""Shared by the engine tests (engines_test, lora_test): the layer cases every rule is
checked on, the engine's clipped sum, and a TestCase comparing sums."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tests import reference, testing_models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BATCH = 5
CLASSES = testing_models.NUM_CLASSES


def threshold_between_norms(grads):
    """A threshold R halfway between two middle norms: some examples clipped, and no
    norm so close to R that rounding decides (global clipping is discontinuous at R)."""
    norms = sorted(reference.norms(grads))
    k = len(norms) // 2
    return float(0.5 * (norms[k] + norms[k + 1]))


def engine_sum(
    model,
    x,
    y,
    engine,
    mode="auto-s",
    style="all-layer",
    R=None,
    sample_weight=None,
    jit_compile=False,
):
    """sum_i c_i g_i from ``private_gradients`` (sigma = 0), eagerly, or compiled by XLA."""
    optimizer = ac.DPAutoSGD(
        learning_rate=1.0, noise_multiplier=0.0, clipping=mode, clipping_style=style,
        l2_norm_clip=R if mode in ("abadi", "global") else None,
    )  # fmt: skip

    def run(x, y):
        return ac.private_gradients(
            model, x, y, sample_weight=sample_weight, optimizer=optimizer, loss=LOSS, engine=engine
        )

    grads = tf.function(run, jit_compile=True)(x, y) if jit_compile else run(x, y)
    return [np.asarray(g) * len(y) for g in grads]


class EngineTestCase(tf.test.TestCase, parameterized.TestCase):
    def assert_sums_close(self, got, want, rtol=1e-5):
        """Close to rtol, entries near 0 to rtol times the largest entry of the sum."""
        self.assertEqual(len(got), len(want))
        scale = max(float(np.max(np.abs(w))) for w in want)
        for g, w in zip(got, want, strict=True):
            self.assertAllClose(g, w, rtol=rtol, atol=rtol * scale)


L = keras.layers
# name -> (input shape, input dtype, layer factory)
LAYER_CASES = {
    "dense_2d": ((6,), "float32", lambda: L.Dense(4, activation="tanh")),
    "dense_seq": ((4, 6), "float32", lambda: L.Dense(5, activation="relu")),
    "dense_4d_no_bias": ((2, 3, 4), "float32", lambda: L.Dense(3, use_bias=False)),
    "einsum_2d": ((6,), "float32", lambda: L.EinsumDense("ab,bc->ac", 4, bias_axes="c")),
    "einsum_heads": (
        (4, 6),
        "float32",
        lambda: L.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="de"),
    ),
    "einsum_merge_heads": (
        (4, 2, 3),
        "float32",
        lambda: L.EinsumDense("abcd,cde->abe", (4, 5), bias_axes="e"),
    ),
    "einsum_ellipsis": (
        (3, 6),
        "float32",
        lambda: L.EinsumDense("...b,bc->...c", 4, bias_axes="c"),
    ),
    "einsum_shared_axis": (
        (4, 3),
        "float32",
        lambda: L.EinsumDense("abc,bcd->abd", (4, 2), bias_axes="bd"),
    ),
    "embedding": ((6,), "int32", lambda: L.Embedding(7, 4)),
    "embedding_one_id": ((1,), "int32", lambda: L.Embedding(7, 4)),
    "conv1d_valid": ((11, 3), "float32", lambda: L.Conv1D(4, 3, activation="tanh")),
    "conv1d_same_strided": ((11, 3), "float32", lambda: L.Conv1D(4, 3, 2, "same")),
    "conv1d_causal_dilated": (
        (11, 3),
        "float32",
        lambda: L.Conv1D(4, 3, padding="causal", dilation_rate=2),
    ),
    "conv1d_groups": ((11, 4), "float32", lambda: L.Conv1D(6, 3, groups=2)),
    "conv2d_valid": ((7, 7, 2), "float32", lambda: L.Conv2D(3, 3)),
    "conv2d_same_strided": ((7, 7, 2), "float32", lambda: L.Conv2D(3, (2, 3), (2, 1), "same")),
    "conv2d_dilated": ((8, 8, 2), "float32", lambda: L.Conv2D(3, 3, dilation_rate=2)),
    "conv2d_groups_no_bias": (
        (6, 6, 4),
        "float32",
        lambda: L.Conv2D(6, 2, padding="same", groups=2, use_bias=False),
    ),
    "layer_norm": ((4, 6), "float32", lambda: L.LayerNormalization()),
    "layer_norm_two_axes": ((3, 4, 2), "float32", lambda: L.LayerNormalization(axis=[1, 2])),
    "layer_norm_no_center": ((6,), "float32", lambda: L.LayerNormalization(center=False)),
    "layer_norm_rms_scaling": ((6,), "float32", lambda: L.LayerNormalization(rms_scaling=True)),
    "group_norm": ((5, 4), "float32", lambda: L.GroupNormalization(groups=2)),
    "group_norm_2d": ((3, 3, 4), "float32", lambda: L.GroupNormalization(groups=4)),
    "rms_norm": ((4, 6), "float32", lambda: L.RMSNormalization()),
}


def layer_case_data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == "int32":
        x = rng.integers(0, 4, size=(BATCH, *shape)).astype("int32")  # repeated ids
    else:
        x = rng.normal(size=(BATCH, *shape)).astype("float32")
    return x, rng.integers(0, CLASSES, size=(BATCH,)).astype("int32")

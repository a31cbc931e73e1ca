"""The vectorized engine gives the right clipped sum on every layer it accepts.

The vectorized engine (``tf.vectorized_map`` over units) is the fallback every other
engine relies on, so it must serve every layer: the grid below follows the layer grids
of tensorflow-privacy's and Opacus' per-example gradient tests (dense, einsum, conv in
both data formats, grouped/depthwise/separable/transposed conv, normalization,
embedding, recurrent and attention layers), per example and per microbatch.

Reference: tests/reference.py, one GradientTape per unit on the plain model (a unit's
loss is the mean of its examples' losses, as a Keras loss with ``sum_over_batch_size``
gives), norms and AUTO-S factors ``1 / (||g|| + gamma)`` in NumPy float64. With sigma = 0 and
``expected_batch_size`` = examples per unit, the private gradient is exactly
``sum_m c_m g_m``.
"""

import keras
import tensorflow as tf
from absl.testing import parameterized
from tensorflow.python.ops.parallel_for import pfor as pfor_lib

import tf_autoclip as ac
from tests import reference, testing_models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BATCH = 4
CLASSES = 2
L = keras.layers


def _single(input_shape, layer, dtype="float32"):
    return lambda: testing_models.single_layer(input_shape, layer, dtype, classes=CLASSES)


def _attention():
    inputs = keras.Input((3, 4))
    h = L.MultiHeadAttention(2, 3)(inputs, inputs)
    return keras.Model(inputs, testing_models.head(h, CLASSES))


# name -> model builder. Bias adds on axis 1 of a rank-3/5 tensor (EinsumDense with an
# early bias axis, Conv1D channels_first) are channels-first (NCHW) BiasAdds.
LAYERS = {
    "dense_rank2": _single((5,), lambda: L.Dense(3)),
    "dense_rank3": _single((3, 5), lambda: L.Dense(3)),
    "dense_rank4": _single((2, 3, 5), lambda: L.Dense(3)),
    "einsum_ab_bc": _single((5,), lambda: L.EinsumDense("ab,bc->ac", 3, bias_axes="c")),
    "einsum_abc_bias_d": _single(
        (4, 5), lambda: L.EinsumDense("abc,cd->abd", (4, 3), bias_axes="d")
    ),
    "einsum_abc_bias_b": _single(
        (4, 5), lambda: L.EinsumDense("abc,cd->abd", (4, 3), bias_axes="b")
    ),
    "einsum_ellipsis_bias_c": _single(
        (4, 5), lambda: L.EinsumDense("ab...,bc->ac...", 3, bias_axes="c")
    ),
    "einsum_abc_cde_bias_de": _single(
        (4, 5), lambda: L.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="de")
    ),
    "einsum_rank4_bias_b": _single(
        (2, 3, 5), lambda: L.EinsumDense("abcd,de->abce", (2, 3, 4), bias_axes="b")
    ),
    "einsum_rank5_bias_b": _single(
        (2, 3, 2, 5), lambda: L.EinsumDense("abcde,ef->abcdf", (2, 3, 2, 3), bias_axes="b")
    ),
    "conv1d_last_bias": _single((6, 4), lambda: L.Conv1D(3, 2)),
    "conv1d_last_nobias": _single((6, 4), lambda: L.Conv1D(3, 2, use_bias=False)),
    "conv1d_first_bias": _single((4, 6), lambda: L.Conv1D(3, 2, data_format="channels_first")),
    "conv1d_first_nobias": _single(
        (4, 6), lambda: L.Conv1D(3, 2, data_format="channels_first", use_bias=False)
    ),
    "conv1d_groups": _single((6, 4), lambda: L.Conv1D(4, 2, groups=2)),
    "conv2d_last_bias": _single((5, 5, 2), lambda: L.Conv2D(3, 2)),
    "conv2d_last_nobias": _single((5, 5, 2), lambda: L.Conv2D(3, 2, use_bias=False)),
    "conv2d_first_bias": _single((2, 5, 5), lambda: L.Conv2D(3, 2, data_format="channels_first")),
    "conv2d_first_nobias": _single(
        (2, 5, 5), lambda: L.Conv2D(3, 2, data_format="channels_first", use_bias=False)
    ),
    "depthwise_conv2d": _single((5, 5, 2), lambda: L.DepthwiseConv2D(2, depth_multiplier=2)),
    "separable_conv1d": _single((6, 2), lambda: L.SeparableConv1D(3, 2)),
    "separable_conv2d": _single((5, 5, 2), lambda: L.SeparableConv2D(3, 2)),
    "conv2d_transpose": _single((3, 3, 2), lambda: L.Conv2DTranspose(3, 2, strides=2)),
    "layer_norm": _single((3, 4), lambda: L.LayerNormalization()),
    "group_norm": _single((3, 4), lambda: L.GroupNormalization(groups=2)),
    "embedding": _single((5,), lambda: L.Embedding(10, 3), dtype="int32"),
    "simple_rnn": _single((4, 3), lambda: L.SimpleRNN(3)),
    "lstm": _single((4, 3), lambda: L.LSTM(3)),
    "gru": _single((4, 3), lambda: L.GRU(3)),
    "multi_head_attention": _attention,
}
# Channels-first bias adds of rank 3 and 5: the cases of the bug this module guards.
CHANNELS_FIRST_BIAS = (
    "einsum_abc_bias_b",
    "einsum_ellipsis_bias_c",
    "einsum_rank5_bias_b",
    "conv1d_first_bias",
)


def data_for(model, seed):
    return testing_models.data_for(model, BATCH, seed, ids=(0, 10), pad=0, classes=CLASSES)


def oracle(model, x, y, num_units):
    """``sum_m c_m g_m`` in float64: one tape per unit, AUTO-S factors in NumPy."""
    grads = reference.unit_gradients(model, x, y, LOSS, unit_size=BATCH // num_units)
    return reference.clipped_sum(grads)


def optimizer_for(num_microbatches):
    # expected_batch_size = examples per unit: the private gradient is the clipped sum.
    return ac.DPAutoSGD(
        learning_rate=1.0, noise_multiplier=0.0, clipping="auto-s",
        expected_batch_size=BATCH // (num_microbatches or BATCH),
        num_microbatches=num_microbatches,
    )  # fmt: skip


class VectorizedLayersTest(tf.test.TestCase, parameterized.TestCase):
    def check(self, name, num_microbatches, jit_per_example=None):
        keras.utils.set_random_seed(7)
        model = LAYERS[name]()
        x, y = data_for(model, 7)
        num_units = num_microbatches or BATCH
        got = ac.private_gradients(
            model, x, y, optimizer=optimizer_for(num_microbatches), loss=LOSS,
            jit_per_example=jit_per_example, engine="vectorized",
        )  # fmt: skip
        want = oracle(model, x, y, num_units)
        self.assertLen(got, len(want))
        for g, w, v in zip(got, want, model.trainable_variables, strict=True):
            self.assertAllClose(g, w, rtol=1e-5, atol=1e-6, msg=v.path)

    @parameterized.named_parameters(
        (f"{name}_{unit}", name, mb)
        for name in LAYERS
        for unit, mb in (("per_example", None), ("microbatches", 2))
    )
    def test_clipped_sum_matches_oracle(self, name, num_microbatches):
        self.check(name, num_microbatches)

    @parameterized.named_parameters(
        (f"{name}_{unit}", name, mb)
        for name in CHANNELS_FIRST_BIAS
        for unit, mb in (("per_example", None), ("microbatches", 2))
    )
    def test_channels_first_bias_with_the_other_jit(self, name, num_microbatches):
        # The grid above runs the default (XLA for EinsumDense, not for Conv1D); this
        # runs the other choice of jit_per_example: pfor converts the same graph for both.
        jit = not ac.per_example.needs_xla(LAYERS[name]())
        if not jit:
            self.skipTest("EinsumDense without XLA hits the oneDNN abort (see per_example)")
        self.check(name, num_microbatches, jit)

    def test_fit_one_step_with_microbatches(self):
        keras.utils.set_random_seed(3)
        model = LAYERS["einsum_abc_bias_b"]()
        x, y = data_for(model, 3)
        want = oracle(model, x, y, 2)
        before = [v.numpy() for v in model.trainable_variables]
        model = ac.make_private(model, engine="vectorized")
        model.compile(optimizer=optimizer_for(2), loss=LOSS)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        for b, v, w in zip(before, model.trainable_variables, want, strict=True):
            self.assertAllClose(v.numpy() - b, -1.0 * w, rtol=1e-5, atol=1e-6, msg=v.path)

    def test_pfor_converters_restored_after_the_pass(self):
        # The rank-general BiasAddGrad converter is installed only while the engine
        # vectorizes; the rest of the process keeps TensorFlow's own.
        tensorflow_converter = pfor_lib._pfor_converter_registry["BiasAddGrad"]
        self.check("conv1d_first_bias", None)
        self.assertIs(pfor_lib._pfor_converter_registry["BiasAddGrad"], tensorflow_converter)


if __name__ == "__main__":
    tf.test.main()

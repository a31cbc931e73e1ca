"""The private gradient equals a plain per-example loop, for every clipping mode and style.

Reference: tests/reference.py (one GradientTape per example, clip factors computed in
NumPy from the formulas of the paper, not with library code), sum, divide by B. With
sigma = 0 one SGD step at lr = 1 must move every weight by exactly -(sum_i c_i g_i) / B.
"""

import itertools

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tests import reference, testing_models
from tests.reference import MODES, STYLES

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BATCH = 6


class PerExampleLoopTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        (f"{name}_{mode}_{style}", name, mode, style)
        for name, mode, style in itertools.product(testing_models.MODELS, MODES, STYLES)
    )
    def test_sgd_step_matches_loop(self, name, mode, style):
        keras.utils.set_random_seed(1)
        model = ac.make_private(testing_models.MODELS[name]())
        x, y = testing_models.data_for(model, BATCH)
        grads = reference.unit_gradients(model, x, y, LOSS)
        R = float(np.median(reference.norms(grads, np.float32)))  # some examples clipped
        optimizer = ac.DPAutoSGD(
            learning_rate=1.0, noise_multiplier=0.0, clipping=mode,
            l2_norm_clip=R if mode in ("abadi", "global") else None, clipping_style=style,
        )  # fmt: skip
        model.compile(optimizer=optimizer, loss=LOSS)
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch(x, y)
        moved = [b - v.numpy() for b, v in zip(before, model.trainable_variables, strict=True)]
        groups = reference.groups_for(model, style)
        expected = reference.sgd_step(grads, BATCH, groups, mode, R=R)
        # The fast engine's norms are upper bounds, a few 1e-6 above the exact norm (their
        # float rounding allowance, tests/norm_bounds_test.py): entries near 0 from
        # cancelling contributions are compared at rtol times the sum's largest entry, as in
        # engines_test.
        scale = max(float(np.max(np.abs(w))) for w in expected)
        for got, want in zip(moved, expected, strict=True):
            self.assertAllClose(got, want, rtol=1e-5, atol=max(1e-6, 1e-5 * scale))

    @parameterized.parameters(False, True)
    def test_microbatches_and_explicit_groups(self, jit_compile):
        keras.utils.set_random_seed(2)
        model = ac.make_private(testing_models.mlp())
        x, y = testing_models.data_for(model, BATCH)
        variables = model.trainable_variables
        groups = [[variables[0], variables[2]], [variables[1].path, variables[3].path]]
        optimizer = ac.DPAutoSGD(
            learning_rate=1.0, noise_multiplier=0.0, num_microbatches=3, clipping_style=groups
        )
        model.compile(optimizer=optimizer, loss=LOSS, jit_compile=jit_compile)
        before = [v.numpy() for v in variables]
        model.train_on_batch(x, y)
        # Reference: each microbatch of 2 examples is one unit, its mean gradient clipped.
        micro = reference.unit_gradients(model_at(model, before), x, y, LOSS, unit_size=2)
        expected = reference.sgd_step(micro, 3, [[0, 2], [1, 3]])
        for b, v, want in zip(before, variables, expected, strict=True):
            self.assertAllClose(b - v.numpy(), want, rtol=1e-5, atol=1e-6)

    @parameterized.parameters(False, True)
    def test_xla_matches_loop(self, jit_compile):
        keras.utils.set_random_seed(3)
        model = ac.make_private(testing_models.cnn())
        x, y = testing_models.data_for(model, BATCH)
        grads = reference.unit_gradients(model, x, y, LOSS)
        model.compile(
            optimizer=ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0),
            loss=LOSS,
            jit_compile=jit_compile,
        )
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch(x, y)
        expected = reference.sgd_step(grads, BATCH)
        for b, v, want in zip(before, model.trainable_variables, expected, strict=True):
            self.assertAllClose(b - v.numpy(), want, rtol=1e-5, atol=1e-6)


def model_at(model, weights):
    """A fresh non-private copy of ``model`` with the given trainable weights."""
    clone = keras.models.clone_model(model)
    for v, w in zip(clone.trainable_variables, weights, strict=True):
        v.assign(w)
    return clone


if __name__ == "__main__":
    tf.test.main()

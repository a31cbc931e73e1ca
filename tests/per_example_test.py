"""The private gradient equals a plain per-example loop, for every clipping mode and style.

Reference: one GradientTape per example, clip factors computed here in NumPy from the
formulas of the paper (not with library code), sum, divide by B. With sigma = 0 one
SGD step at lr = 1 must move every weight by exactly -(sum_i c_i g_i) / B.
"""

import itertools

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tests import testing_models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BATCH = 6


def per_example_gradients(model, x, y):
    grads = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = LOSS(y[i : i + 1], model(x[i : i + 1], training=True))
        grads.append(
            [
                tf.convert_to_tensor(g).numpy()
                for g in tape.gradient(loss, model.trainable_variables)
            ]
        )
    return grads


def groups_for(model, style):
    variables = model.trainable_variables
    if style == "all-layer":
        return [list(range(len(variables)))]
    prefixes = {}
    for i, v in enumerate(variables):
        prefixes.setdefault(v.path.rpartition("/")[0], []).append(i)
    return list(prefixes.values())


def factor(norm, mode, gamma, R, num_groups):
    budget = 1.0 / np.sqrt(num_groups)
    if mode == "auto-s":
        return budget / (norm + gamma)
    if mode == "auto-v":
        return 0.0 if norm == 0 else budget / norm
    if mode == "abadi":
        return min(1.0, budget * R / norm) if norm > 0 else 1.0
    return 1.0 if norm <= budget * R else 0.0


def reference_step(grads, groups, mode, gamma, R, denominator):
    total = [np.zeros_like(g, dtype=np.float64) for g in grads[0]]
    for example in grads:
        for group in groups:
            norm = np.sqrt(sum(np.sum(example[i].astype(np.float64) ** 2) for i in group))
            c = factor(norm, mode, gamma, R, len(groups))
            for i in group:
                total[i] += c * example[i]
    return [t / denominator for t in total]


class PerExampleLoopTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        (f"{name}_{mode}_{style}", name, mode, style)
        for name, mode, style in itertools.product(
            testing_models.MODELS,
            ("auto-s", "auto-v", "abadi", "global"),
            ("all-layer", "per-layer"),
        )
    )
    def test_sgd_step_matches_loop(self, name, mode, style):
        keras.utils.set_random_seed(1)
        model = ac.make_private(testing_models.MODELS[name]())
        x, y = testing_models.data_for(model, BATCH)
        grads = per_example_gradients(model, x, y)
        norms = [np.sqrt(sum(np.sum(g**2) for g in ex)) for ex in grads]
        R = float(np.median(norms))  # some examples clipped, some not
        optimizer = ac.DPAutoSGD(
            learning_rate=1.0, noise_multiplier=0.0, clipping=mode,
            l2_norm_clip=R if mode in ("abadi", "global") else None, clipping_style=style,
        )  # fmt: skip
        model.compile(optimizer=optimizer, loss=LOSS)
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch(x, y)
        moved = [b - v.numpy() for b, v in zip(before, model.trainable_variables, strict=True)]
        gamma = 0.01 if mode == "auto-s" else 0.0
        expected = reference_step(grads, groups_for(model, style), mode, gamma, R, BATCH)
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
        clone = model_at(model, before)
        micro = []
        for m in range(3):
            with tf.GradientTape() as tape:
                loss = LOSS(y[2 * m : 2 * m + 2], clone(x[2 * m : 2 * m + 2]))
            micro.append([g.numpy() for g in tape.gradient(loss, clone.trainable_variables)])
        expected = reference_step(micro, [[0, 2], [1, 3]], "auto-s", 0.01, None, 3)
        for b, v, want in zip(before, variables, expected, strict=True):
            self.assertAllClose(b - v.numpy(), want, rtol=1e-5, atol=1e-6)

    @parameterized.parameters(False, True)
    def test_xla_matches_loop(self, jit_compile):
        keras.utils.set_random_seed(3)
        model = ac.make_private(testing_models.cnn())
        x, y = testing_models.data_for(model, BATCH)
        grads = per_example_gradients(model, x, y)
        model.compile(
            optimizer=ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0),
            loss=LOSS,
            jit_compile=jit_compile,
        )
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch(x, y)
        expected = reference_step(grads, groups_for(model, "all-layer"), "auto-s", 0.01, None, 6)
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

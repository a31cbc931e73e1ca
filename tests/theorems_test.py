"""Theorems of Bu et al. (2023), checked on the final weights of short private runs.

When every per-example gradient norm exceeds R, Abadi clipping is R times AUTO-V:
``min(1, R/||g_i||) g_i = R g_i / ||g_i||``, and the noise ``sigma R z`` is R times AUTO-V's
``sigma z``. With the same seed (so the same z at every step), Abadi's private gradient is
exactly R times AUTO-V's, and therefore

1. SGD (with momentum): Abadi at (lr eta, R) = Abadi at (eta R / R', R') = AUTO-V at
   eta R (the update is linear in the gradient);
2. Adam: Abadi at any such R = AUTO-V at the same lr (the update is invariant to the
   gradient's scale, up to Adam's epsilon, set negligible here: see ADAM_EPSILON);
3. coupled weight decay (an L2 kernel_regularizer, whose gradient is added after the
   noise, unclipped): Abadi(R) with lambda under SGD = AUTO-V with lambda / R at eta R;
4. decoupled weight decay (AdamW): Abadi at R and R' = AUTO-V, same lr and weight decay.

Every run starts from the same initial weights (get_weights/set_weights) and takes STEPS
steps on the same batches. Before each step, per-example gradient norms are computed
with the plain GradientTape loop of tests/reference.py (no library code) to assert that
they all exceed R.

Comparison: the runs' weight *changes* (final - initial), so that the check is not
diluted by the size of the weights. Equal-by-theorem runs differ only by float32
rounding (a few ulps per operation, amplified a little through three steps and the
network's nonlinearity): allowed |a - b| <= 1e-5 * |b| + 1e-5 * max|b|. Each negative
control differs by more than 1e-2 * max|b|, a thousand times that tolerance, which
shows the comparison can tell.
"""

import functools

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tests import reference, testing_models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
NUM_CLASSES = testing_models.NUM_CLASSES
BATCH = 8
STEPS = 3
SIGMA = 0.5
SEED = 1234
R1, R2 = 1e-3, 3e-3  # both below every per-example gradient norm (asserted)
RTOL = 1e-5  # float32 rounding; see the module docstring
# Adam divides by sqrt(v) + epsilon, with v ~ (1 - beta_2) g^2 after one step and g ~
# sigma R / B ~ 6e-5 per coordinate under Abadi: sqrt(v) ~ 2e-6 |z|. Keras' default 1e-7
# is not negligible against that, and even 1e-12 moved coordinates with small |z| by
# ~1e-4 relative; 1e-20 is ~1e-14 / |z| relative, below float32 rounding.
ADAM_EPSILON = 1e-20
CONTROL_GAP = 1e-2  # negative controls must differ by more than this * max|b|


mlp = functools.partial(testing_models.mlp, 10, ((16, "tanh"),), sequential=True)
MODELS = {"mlp": mlp, "cnn": testing_models.small_cnn}


def initial_weights(make_model) -> list[np.ndarray]:
    keras.utils.set_random_seed(0)
    return make_model().get_weights()


def batches(make_model) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    shape = make_model().inputs[0].shape[1:]
    return [
        (
            rng.normal(size=(BATCH, *shape)).astype("float32"),
            rng.integers(0, NUM_CLASSES, size=(BATCH,)).astype("int32"),
        )
        for _ in range(STEPS)
    ]


def per_example_norms(model, x, y) -> np.ndarray:
    """L2 norm of each example's loss gradient (all variables), one tape per example."""
    return reference.norms(reference.unit_gradients(model, x, y, LOSS), np.float32)


class Run:
    """A private run's weight changes and the smallest per-example norm it met."""

    def __init__(self, make_model, optimizer, l2=None, custom_loop=False):
        model = ac.make_private(make_model(l2=l2))
        init = initial_weights(make_model)
        model.set_weights(init)
        model.compile(optimizer=optimizer, loss=LOSS)
        self.min_norm = np.inf
        for x, y in batches(make_model):
            self.min_norm = min(self.min_norm, per_example_norms(model, x, y).min())
            if custom_loop:
                grads = ac.private_gradients(model, x, y, optimizer=optimizer)
                optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            else:
                model.train_on_batch(x, y)
        self.deltas = [w - w0 for w, w0 in zip(model.get_weights(), init, strict=True)]


def sgd(lr, clipping, R=None, **kwargs):
    return ac.DPAutoSGD(
        learning_rate=lr, momentum=0.9, noise_multiplier=SIGMA, clipping=clipping,
        l2_norm_clip=R, seed=SEED, **kwargs,
    )  # fmt: skip


def adam(clipping, R=None, cls=ac.DPAutoAdam, **kwargs):
    return cls(
        learning_rate=1e-2, epsilon=ADAM_EPSILON, noise_multiplier=SIGMA, clipping=clipping,
        l2_norm_clip=R, seed=SEED, **kwargs,
    )  # fmt: skip


class TheoremTest(tf.test.TestCase, parameterized.TestCase):
    def assert_same_run(self, a: Run, b: Run):
        scale = max(float(np.abs(d).max()) for d in b.deltas)
        self.assertGreater(scale, 1e-3)  # the runs did move the weights
        for da, db in zip(a.deltas, b.deltas, strict=True):
            np.testing.assert_allclose(da, db, rtol=RTOL, atol=RTOL * scale)

    def assert_different_run(self, a: Run, b: Run):
        scale = max(float(np.abs(d).max()) for d in b.deltas)
        gap = max(float(np.abs(da - db).max()) for da, db in zip(a.deltas, b.deltas, strict=True))
        self.assertGreater(gap, CONTROL_GAP * scale)

    def assert_all_clipped(self, *runs: Run, R: float):
        for run in runs:
            self.assertGreater(run.min_norm, R)

    @parameterized.named_parameters(("mlp", "mlp"), ("cnn", "cnn"))
    def test_sgd_abadi_is_rescaled_auto_v(self, name):
        make_model, eta = MODELS[name], 40.0
        abadi_1 = Run(make_model, sgd(eta, "abadi", R1))
        abadi_2 = Run(make_model, sgd(eta * R1 / R2, "abadi", R2))
        auto_v = Run(make_model, sgd(eta * R1, "auto-v"))
        self.assert_all_clipped(abadi_1, abadi_2, auto_v, R=R2)
        self.assert_same_run(abadi_1, auto_v)
        self.assert_same_run(abadi_2, auto_v)
        # Control: a threshold that leaves some examples unclipped breaks the identity.
        R_big = float(np.median(per_example_norms_at_start(make_model)))
        self.assert_different_run(Run(make_model, sgd(eta * R1 / R_big, "abadi", R_big)), auto_v)

    @parameterized.named_parameters(("mlp", "mlp"), ("cnn", "cnn"))
    def test_adam_abadi_is_auto_v(self, name):
        make_model = MODELS[name]
        abadi_1 = Run(make_model, adam("abadi", R1))
        abadi_2 = Run(make_model, adam("abadi", R2), custom_loop=True)  # the custom-loop path
        auto_v = Run(make_model, adam("auto-v"))
        self.assert_all_clipped(abadi_1, abadi_2, auto_v, R=R2)
        self.assert_same_run(abadi_1, auto_v)
        self.assert_same_run(abadi_2, auto_v)
        # Control: AUTO-S with gamma comparable to the norms weighs examples differently.
        gamma = float(np.median(per_example_norms_at_start(make_model)))
        self.assert_different_run(Run(make_model, adam("auto-s", gamma=gamma)), auto_v)

    def test_coupled_weight_decay_scales_with_threshold(self):
        eta, lam = 40.0, 1e-3
        abadi = Run(mlp, sgd(eta, "abadi", R1), l2=lam)
        auto_v = Run(mlp, sgd(eta * R1, "auto-v"), l2=lam / R1)
        self.assert_all_clipped(abadi, auto_v, R=R1)
        self.assert_same_run(abadi, auto_v)
        # Control: the same lambda under AUTO-V is R times too weak.
        self.assert_different_run(Run(mlp, sgd(eta * R1, "auto-v"), l2=lam), auto_v)

    def test_decoupled_weight_decay_is_unaffected_by_threshold(self):
        adamw = ac.DPAutoAdamW
        abadi_1 = Run(mlp, adam("abadi", R1, cls=adamw, weight_decay=0.5))
        abadi_2 = Run(mlp, adam("abadi", R2, cls=adamw, weight_decay=0.5))
        auto_v = Run(mlp, adam("auto-v", cls=adamw, weight_decay=0.5))
        self.assert_all_clipped(abadi_1, abadi_2, auto_v, R=R2)
        self.assert_same_run(abadi_1, auto_v)
        self.assert_same_run(abadi_2, auto_v)
        # Control: coupled decay (L2 regularizer under Adam) does depend on R.
        lam = 1e-2
        coupled_1 = Run(mlp, adam("abadi", R1), l2=lam)
        coupled_2 = Run(mlp, adam("abadi", R2), l2=lam)
        self.assert_different_run(coupled_1, coupled_2)


def per_example_norms_at_start(make_model) -> np.ndarray:
    model = make_model()
    model.set_weights(initial_weights(make_model))
    x, y = batches(make_model)[0]
    return per_example_norms(model, x, y)


if __name__ == "__main__":
    tf.test.main()

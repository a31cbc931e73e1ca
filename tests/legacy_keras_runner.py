"""tf-keras (Keras 2) checks, run in their own process by legacy_keras_test.py.

``TF_USE_LEGACY_KERAS=1`` must be set before TensorFlow is imported (then ``tf.keras`` is
tf_keras), and the MirroredStrategy check needs two logical CPUs configured before
TensorFlow starts, so these checks cannot run in the pytest process.

  python -m tests.legacy_keras_runner OUT.json [CHECK_NAME ...]

Writes ``{check_name: {"status": "ok" | "fail" | "skip", "detail": str}}`` to OUT.json.
The checks use a plain ``tf.keras`` model compiled with a tf_autoclip DP optimizer and a
loss of ``reduction=NONE``, trained by Keras 2's own ``fit`` (no model wrapper).
"""

from __future__ import annotations

import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import json  # noqa: E402
import tempfile  # noqa: E402
import unittest  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl.testing import parameterized  # noqa: E402

# Two logical CPUs for the MirroredStrategy check, before anything starts the runtime.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import tf_autoclip  # noqa: E402
from tests import reference  # noqa: E402
from tf_autoclip import legacy  # noqa: E402

NUM_CLASSES = 3
SIGMA = 1.3
NUM_SE = 6.0  # statistical checks allow 6 standard errors (see tests/noise_test.py)


_STRATEGY = []


def mirrored_strategy():
    """One MirroredStrategy for the process: a second one over the same devices can
    collide with the first's collective ops ("Shape mismatch in the collective instance")."""
    if not _STRATEGY:
        _STRATEGY.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return _STRATEGY[0]


def per_example_loss():
    return tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.NONE
    )


class ZeroLoss(tf.keras.losses.Loss):
    """Per-example loss ``0 * sum(y_pred)``: every per-example gradient is exactly 0."""

    def __init__(self):
        super().__init__(reduction=tf.keras.losses.Reduction.NONE, name="zero")

    def call(self, y_true, y_pred):  # noqa: ARG002
        return 0.0 * tf.reduce_sum(y_pred, axis=-1)


# -- tiny tf.keras models ------------------------------------------------------------------
def mlp():
    return tf.keras.Sequential(
        [
            tf.keras.Input((6,)),
            tf.keras.layers.Dense(8, activation="tanh"),
            tf.keras.layers.Dense(NUM_CLASSES),
        ]
    )


def cnn():
    inputs = tf.keras.Input((10, 10, 1))
    h = tf.keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="tanh")(inputs)
    h = tf.keras.layers.MaxPool2D(2, 1)(h)
    h = tf.keras.layers.Flatten()(h)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(NUM_CLASSES)(h))


def embedding():
    inputs = tf.keras.Input((5,), dtype="int32")
    h = tf.keras.layers.Embedding(20, 4, mask_zero=True)(inputs)
    h = tf.keras.layers.GlobalAveragePooling1D()(h)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(NUM_CLASSES)(h))


def lstm():
    inputs = tf.keras.Input((4,), dtype="int32")
    h = tf.keras.layers.Embedding(20, 3)(inputs)
    h = tf.keras.layers.LSTM(3)(h)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(NUM_CLASSES)(h))


MODELS = {"mlp": mlp, "cnn": cnn, "embedding": embedding, "lstm": lstm}


def make_model(name, seed=0):
    tf.keras.utils.set_random_seed(seed)
    return MODELS[name]()


def data_for(model, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    spec = model.inputs[0]
    shape = (batch_size, *spec.shape[1:])
    if spec.dtype.is_integer:
        x = rng.integers(1, 20, size=shape).astype("int32")
        x[:, -1] = 0  # padding, so masking is exercised
    else:
        x = rng.normal(size=shape).astype("float32")
    return x, rng.integers(0, NUM_CLASSES, size=(batch_size,)).astype("int32")


# -- the reference: the shared oracle (tests/reference.py, plain TensorFlow and NumPy) ------
def reference_update(
    model, x, y, mode, R=None, gamma=reference.GAMMA, groups=None, num_microbatches=None
):
    """``-sum_i c_i g_i / M`` (sigma = 0, lr = 1), one unit (example/microbatch) at a time."""
    units = num_microbatches or len(x)
    loss_fn = per_example_loss()

    def unit_loss(y_unit, logits):  # the mean over the unit's examples
        return tf.reduce_mean(loss_fn(y_unit, logits))

    grads = reference.unit_gradients(model, x, y, unit_loss, unit_size=len(x) // units)
    step = reference.sgd_step(grads, units, groups, mode, gamma=gamma, R=R)
    return [-s for s in step]


def weights(model):
    return [np.asarray(v.numpy(), np.float64) for v in model.trainable_variables]


def one_fit_step(model, optimizer, x, y, loss=None):
    model.compile(optimizer=optimizer, loss=loss or per_example_loss())
    before = weights(model)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return [a - b for a, b in zip(weights(model), before, strict=True)]


class LegacyKerasChecks(tf.test.TestCase, parameterized.TestCase):
    def test_tf_keras_is_active(self):
        import tf_keras

        self.assertTrue(legacy.legacy_keras_requested())
        self.assertIs(tf.keras.Model, tf_keras.Model)
        self.assertTrue(issubclass(legacy.DPAutoAdam, tf_keras.optimizers.Adam))

    # σ = 0, lr = 1: one Keras 2 fit step moves the weights by -Σ c_i g_i / B.
    @parameterized.named_parameters(
        ("mlp_auto_s", "mlp", "auto-s", None, {}),
        ("mlp_auto_v", "mlp", "auto-v", None, {}),
        ("mlp_abadi", "mlp", "abadi", 0.05, {}),
        ("cnn_auto_s", "cnn", "auto-s", None, {}),
        ("cnn_abadi_per_layer", "cnn", "abadi", 0.05, {"clipping_style": "per-layer"}),
        ("embedding_auto_s", "embedding", "auto-s", None, {}),
        ("lstm_abadi", "lstm", "abadi", 0.05, {}),
        ("mlp_abadi_microbatches", "mlp", "abadi", 0.05, {"num_microbatches": 4}),
        ("mlp_auto_s_optimizer_v2", "mlp", "auto-s", None, {"v2": True}),
    )
    def test_step_equals_per_example_loop(self, model_name, mode, R, options):
        options = dict(options)
        base = tf.keras.optimizers.legacy.SGD if options.pop("v2", False) else None
        cls = legacy.make_dp_optimizer_class(base) if base else legacy.DPAutoSGD
        model = make_model(model_name)
        x, y = data_for(model, 8)
        groups = None
        if options.get("clipping_style") == "per-layer":
            by_layer = {}
            for i, v in enumerate(model.trainable_variables):
                by_layer.setdefault(v.name.rpartition("/")[0], []).append(i)
            groups = list(by_layer.values())
            self.assertLen(groups, 2)  # two Conv2D and a Dense; MaxPool and Flatten have none
        want = reference_update(
            model, x, y, mode, R, groups=groups, num_microbatches=options.get("num_microbatches")
        )
        opt = cls(learning_rate=1.0, noise_multiplier=0.0, clipping=mode, l2_norm_clip=R, **options)
        got = one_fit_step(model, opt, x, y)
        self.assertEqual(int(opt.iterations), 1)
        for g, w in zip(got, want, strict=True):
            self.assertAllClose(g, w, rtol=1e-4, atol=1e-6)
        if mode == "abadi":  # the update is a mean of clipped units: norm <= R
            self.assertLessEqual(np.sqrt(sum(np.sum(g**2) for g in got)), R * (1 + 1e-5))

    def test_mirrored_strategy_step_equals_single_device_step(self):
        x, y = data_for(make_model("mlp"), 8)
        want_model = make_model("mlp")
        want = one_fit_step(
            want_model, legacy.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0), x, y
        )
        strategy = mirrored_strategy()
        self.assertEqual(strategy.num_replicas_in_sync, 2)
        with strategy.scope():
            model = make_model("mlp")
            opt = legacy.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0)
            got = one_fit_step(model, opt, x, y)
        for g, w in zip(got, want, strict=True):
            self.assertAllClose(g, w, rtol=1e-5, atol=1e-7)

    # Zero per-example gradients: the update is pure noise of std σ·S / B.
    @parameterized.named_parameters(
        ("auto_s", {}, 1.0 / 8),
        ("abadi", {"clipping": "abadi", "l2_norm_clip": 0.3}, 0.3 / 8),
        ("expected_batch_size", {"expected_batch_size": 32}, 1.0 / 32),
        ("microbatches", {"num_microbatches": 4}, 2.0 / 4),  # 2 S / M
        ("optimizer_v2", {"v2": True}, 1.0 / 8),
        ("mirrored", {"mirrored": True}, 1.0 / 8),  # the noise enters the global sum once
    )
    def test_noise_std_with_zero_gradients(self, options, std_over_sigma):
        options = dict(options)
        base = tf.keras.optimizers.legacy.SGD if options.pop("v2", False) else None
        cls = legacy.make_dp_optimizer_class(base) if base else legacy.DPAutoSGD
        strategy = (
            mirrored_strategy() if options.pop("mirrored", False) else tf.distribute.get_strategy()
        )
        rng = np.random.default_rng(0)
        x = rng.normal(size=(8, 200)).astype("float32")
        y = rng.normal(size=(8, 500)).astype("float32")
        with strategy.scope():
            tf.keras.utils.set_random_seed(0)
            model = tf.keras.Sequential([tf.keras.Input((200,)), tf.keras.layers.Dense(500)])
            opt = cls(learning_rate=1.0, noise_multiplier=SIGMA, seed=1, **options)
            kernel, bias = one_fit_step(model, opt, x, y, loss=ZeroLoss())
        expected = SIGMA * std_over_sigma
        for noise in (kernel, bias):  # 100,000 and 500 entries
            rel_se = 1.0 / np.sqrt(2.0 * noise.size)
            self.assertAllClose(noise.std() / expected, 1.0, atol=NUM_SE * rel_se, rtol=0)
            self.assertLess(abs(noise.mean()), NUM_SE * expected / np.sqrt(noise.size))

    def test_noise_is_reproducible_from_the_seed_and_fresh_each_step(self):
        x = np.ones((4, 50), "float32")
        y = np.zeros((4, 20), "float32")

        def run(seed, steps):
            tf.keras.utils.set_random_seed(0)
            model = tf.keras.Sequential([tf.keras.Input((50,)), tf.keras.layers.Dense(20)])
            opt = legacy.DPAutoSGD(learning_rate=1.0, noise_multiplier=1.0, seed=seed)
            model.compile(optimizer=opt, loss=ZeroLoss())
            out = []
            for _ in range(steps):
                before = weights(model)[0]
                model.train_on_batch(x, y)
                out.append(weights(model)[0] - before)
            return out

        first, second = run(5, 2)
        self.assertAllClose(run(5, 1)[0], first)
        self.assertLess(abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]), 0.3)
        self.assertNotAllClose(run(6, 1)[0], first)

    def test_scalar_loss_is_refused(self):
        model = make_model("mlp")
        x, y = data_for(model, 8)
        model.compile(
            optimizer=legacy.DPAutoAdam(noise_multiplier=1.0),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),  # reduced
        )
        with self.assertRaisesRegex(ValueError, "scalar loss.*Reduction.NONE"):
            model.fit(x, y, batch_size=4, epochs=1, verbose=0)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example_loss()(y, model(x)))
        with self.assertRaisesRegex(ValueError, "per-example loss vector"):
            legacy.DPAutoSGD(noise_multiplier=1.0).minimize(
                loss, model.trainable_variables, tape=tape
            )

    def test_non_private_gradients_are_refused(self):
        model = make_model("mlp")
        x, y = data_for(model, 8)
        for opt in (
            legacy.DPAutoAdam(noise_multiplier=1.0),
            legacy.make_dp_optimizer_class(tf.keras.optimizers.legacy.Adam)(noise_multiplier=1.0),
        ):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(per_example_loss()(y, model(x)))
            grads = tape.gradient(loss, model.trainable_variables)
            with self.assertRaises(tf_autoclip.NonPrivateGradientError):
                opt.apply_gradients(zip(grads, model.trainable_variables))
            # A custom loop through the private path works, once per privatized gradient.
            with tf.GradientTape() as tape:
                loss = per_example_loss()(y, model(x))
            grads_and_vars = opt.compute_gradients(loss, model.trainable_variables, tape=tape) \
                if hasattr(opt, "compute_gradients") else opt._compute_gradients(
                    loss, model.trainable_variables, tape=tape)  # fmt: skip
            opt.apply_gradients(grads_and_vars)
            with self.assertRaises(tf_autoclip.NonPrivateGradientError):
                opt.apply_gradients(grads_and_vars)

    def test_fit_two_epochs(self):
        model = make_model("cnn")
        x, y = data_for(model, 40)
        opt = legacy.DPAutoAdam.from_target_epsilon(
            target_epsilon=3.0, delta=1e-5, num_examples=40, batch_size=8, epochs=2,
            learning_rate=1e-2, seed=0,
        )  # fmt: skip
        self.assertGreater(opt.noise_multiplier, 0.5)
        model.compile(optimizer=opt, loss=per_example_loss(), metrics=["accuracy"])
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        self.assertLen(history.history["loss"], 2)
        self.assertTrue(np.all(np.isfinite(history.history["loss"])))
        self.assertEqual(int(opt.iterations), 10)
        self.assertLen(model.evaluate(x, y, verbose=0), 2)

    def test_every_builtin_optimizer_trains(self):
        classes = legacy.legacy_optimizer_classes()
        self.assertContainsSubset(
            ["DPAutoSGD", "DPAutoAdam", "DPAutoAdamW", "DPAutoAdagrad", "DPAutoRMSprop",
             "DPAutoNadam", "DPAutoAdamax", "DPAutoAdadelta", "DPAutoFtrl"],
            classes,
        )  # fmt: skip
        x, y = data_for(make_model("mlp"), 8)
        for name, cls in classes.items():
            with self.subTest(name):
                model = make_model("mlp")
                opt = cls(noise_multiplier=1.0, seed=0)
                moved = one_fit_step(model, opt, x, y)
                self.assertTrue(all(np.all(np.isfinite(m)) for m in moved))
                self.assertTrue(any(np.any(m != 0) for m in moved), name)

    def test_config_round_trip_and_saving(self):
        opt = legacy.DPAutoAdamW(
            learning_rate=0.01, noise_multiplier=0.7, clipping="abadi", l2_norm_clip=0.5,
            clipping_style=[["dense/kernel:0"], ["dense/bias:0"]], expected_batch_size=64,
            num_microbatches=4, seed=3,
        )  # fmt: skip
        config = opt.get_config()
        for key in ("clipnorm", "clipvalue", "global_clipnorm"):
            self.assertNotIn(key, config)
        clone = legacy.DPAutoAdamW.from_config(config)
        self.assertEqual(clone.get_config(), config)
        self.assertEqual(clone.clipping_config, opt.clipping_config)
        restored = tf.keras.optimizers.deserialize(tf.keras.optimizers.serialize(opt))
        self.assertIsInstance(restored, legacy.DPAutoAdamW)
        self.assertEqual(restored.get_config(), config)

        model = make_model("mlp")
        x, y = data_for(model, 8)
        model.compile(
            optimizer=legacy.DPAutoAdam(noise_multiplier=1.1, seed=0), loss=per_example_loss()
        )
        model.fit(x, y, batch_size=4, epochs=1, verbose=0)
        path = os.path.join(tempfile.mkdtemp(), "model.keras")
        model.save(path)
        loaded = tf.keras.models.load_model(path)
        self.assertIsInstance(loaded.optimizer, legacy.DPAutoAdam)
        self.assertEqual(loaded.optimizer.noise_multiplier, 1.1)
        loaded.fit(x, y, batch_size=4, epochs=1, verbose=0)

    def test_invalid_arguments(self):
        with self.assertRaisesRegex(ValueError, "clipnorm"):
            legacy.DPAutoSGD(noise_multiplier=1.0, clipnorm=1.0)
        with self.assertRaisesRegex(ValueError, "l2_norm_clip"):
            legacy.DPAutoSGD(noise_multiplier=1.0, clipping="abadi")
        with self.assertRaisesRegex(ValueError, "noise_multiplier"):
            legacy.DPAutoSGD(noise_multiplier=-1.0)
        model = make_model("mlp")
        x, y = data_for(model, 6)
        model.compile(
            optimizer=legacy.DPAutoSGD(noise_multiplier=1.0, num_microbatches=4),
            loss=per_example_loss(),
        )
        with self.assertRaisesRegex(ValueError, "multiple of num_microbatches"):
            model.fit(x, y, batch_size=6, epochs=1, verbose=0)

    # The gradients come from one batched forward pass: a layer that mixes examples
    # would make each example's clipped gradient depend on the others.
    @parameterized.named_parameters(
        ("batch_normalization", "batch_normalization", "BatchNormalization.*GroupNormalization"),
        ("batch_mixing_lambda", "lambda", "Lambda.*register_per_example_layer"),
    )
    def test_batch_mixing_layer_is_refused(self, kind, message):
        tf.keras.utils.set_random_seed(0)
        if kind == "batch_normalization":
            mixing = tf.keras.layers.BatchNormalization()
        else:
            mixing = tf.keras.layers.Lambda(lambda h: h - tf.reduce_mean(h, axis=0))
        model = tf.keras.Sequential(
            [tf.keras.Input((6,)), tf.keras.layers.Dense(8), mixing,
             tf.keras.layers.Dense(NUM_CLASSES)]
        )  # fmt: skip
        x, y = data_for(model, 8)
        before = model.get_weights()  # with BatchNormalization's moving statistics
        opt = legacy.DPAutoSGD(learning_rate=1.0, noise_multiplier=1.0, expected_batch_size=8)
        model.compile(optimizer=opt, loss=per_example_loss())
        with self.assertRaisesRegex(ValueError, f"{mixing.name}.*{message}"):
            model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        for a, b in zip(model.get_weights(), before, strict=True):
            self.assertAllEqual(a, b)
        with tf.GradientTape() as tape:  # a custom loop is refused too
            loss = per_example_loss()(y, model(x, training=True))
        with self.assertRaisesRegex(ValueError, message):
            opt.minimize(loss, model.trainable_variables, tape=tape)

    def test_vouched_custom_layer_trains(self):
        class Double(tf.keras.layers.Layer):
            def call(self, h):
                return 2.0 * h

        model = tf.keras.Sequential(
            [tf.keras.Input((6,)), tf.keras.layers.Dense(4), Double(),
             tf.keras.layers.Dense(NUM_CLASSES)]
        )  # fmt: skip
        x, y = data_for(model, 8)
        opt = legacy.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0, expected_batch_size=8)
        model.compile(optimizer=opt, loss=per_example_loss())
        with self.assertRaisesRegex(ValueError, r"register_per_example_layer\(Double\)"):
            model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        tf_autoclip.register_per_example_layer(Double)
        try:
            moved = one_fit_step(model, opt, x, y)
        finally:
            tf_autoclip.layer_safety.unregister_per_example_layer(Double)
        self.assertTrue(any(np.any(m != 0) for m in moved))

    def test_package_exports(self):
        """``import tf_autoclip as ac`` gives the tf_keras classes (tf_autoclip/__init__.py)."""
        if tf_autoclip.DPAutoAdam is not legacy.DPAutoAdam:
            self.skipTest("tf_autoclip/__init__.py does not export the legacy classes yet")
        for name in legacy.legacy_optimizer_classes():
            self.assertIs(getattr(tf_autoclip, name), getattr(legacy, name))
        with self.assertRaisesRegex(RuntimeError, "not needed"):
            tf_autoclip.make_private(make_model("mlp"))


def main(argv):
    out, names = argv[1], argv[2:]
    loader = unittest.defaultTestLoader
    suite = loader.loadTestsFromTestCase(LegacyKerasChecks)
    if names:
        suite = unittest.TestSuite(t for t in suite if _check_name(t) in names)
    suite = unittest.TestSuite(t for t in _tests(suite) if _check_name(t) != "test_session")
    report = {_check_name(t): {"status": "ok", "detail": ""} for t in _tests(suite)}
    result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(suite)
    for test, detail in result.failures + result.errors:
        report[_check_name(test)] = {"status": "fail", "detail": detail}
    for test, reason in result.skipped:
        report[_check_name(test)] = {"status": "skip", "detail": reason}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)


def _tests(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _tests(item)
        else:
            yield item


def _check_name(test):
    test = getattr(test, "test_case", test)  # a failed subTest counts for its test
    return test.id().rpartition(".")[2]


if __name__ == "__main__":
    main(sys.argv)

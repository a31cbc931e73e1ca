"""``make_private(..., low_memory=True)``: book-keeping keeps no explicit per-example
gradient until the clip factors exist, and the clipped sums and their bounds are unchanged.

By default the bk engine keeps a layer's explicit per-example gradient (formed for its
norm) until the clipped sum, a weighted sum of it; all of them wait for the clip factors,
so they are alive together at the step's memory peak (W3: 390 MB of 555 MB in use,
``benchmarks/memory_profile.py``). Low-memory mode recomputes each such sum as one matmul.
The checks spy on the rules' clipped sums (was a per-example tensor kept?), compare the
sums with the vectorized engine, and measure one example's contribution on cancelling
rows, whose norm must now also bound the recomputed sum's rounding.
"""

from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tests.bound_cases import ContributionTestCase, cancelling_rows, same_gradients
from tf_autoclip.rules import conv, kerashub, numerics


def dense_rows():  # explicit norms: 24 * 24 <= 2 * 16 * 48
    return keras.Sequential([keras.Input((16, 24)), keras.layers.Dense(24), keras.layers.Flatten()])


def attention():
    ids = keras.Input((8,), dtype="int32")
    h = keras.layers.Embedding(50, 16)(ids)
    h = keras.layers.MultiHeadAttention(2, 8)(h, h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(ids, keras.layers.Dense(3)(h))


def small_cnn():  # 3 input channels: the grouped per-example filter gradient
    return keras.Sequential(
        [
            keras.Input((10, 10, 3)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


def grouped_cnn():  # groups=2, 8 input channels: explicit per (example, group)
    return keras.Sequential(
        [
            keras.Input((6, 6, 8)),
            keras.layers.Conv2D(4, 3, groups=2),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


def tied_lm():  # ReversibleEmbedding, tied: explicit (40 * 5 <= 6 * 45)
    ids = keras.Input((6,), dtype="int32")
    emb = keras.layers.ReversibleEmbedding(40, 5, tie_weights=True)
    h = keras.layers.Dense(5, activation="tanh")(emb(ids))
    return keras.Model(ids, emb(h, reverse=True))


def data(name, rng, n=4):
    if name == "dense_rows":
        return rng.normal(size=(n, 16, 24)), rng.normal(size=(n, 16 * 24))
    if name == "attention":
        return rng.integers(0, 50, size=(n, 8)), rng.integers(0, 3, size=(n,))
    if name == "small_cnn":
        return rng.normal(size=(n, 10, 10, 3)), rng.integers(0, 3, size=(n,))
    if name == "grouped_cnn":
        return rng.normal(size=(n, 6, 6, 8)), rng.integers(0, 3, size=(n,))
    return rng.integers(1, 40, size=(n, 6)), rng.integers(1, 40, size=(n, 6))


MODELS = {"dense_rows": dense_rows, "attention": attention, "small_cnn": small_cnn}
MODELS["grouped_cnn"] = grouped_cnn
MODELS["tied_lm"] = tied_lm
LOSSES = {"dense_rows": "mse"}


def loss_for(name):
    if name in LOSSES:
        return keras.losses.MeanSquaredError()
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def gradients(model, name, engine, low_memory=None):
    if low_memory is not None:
        ac.make_private(model, engine=engine, low_memory=low_memory)
    x, y = data(name, np.random.default_rng(0))
    opt = ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0, expected_batch_size=4)
    grads = ac.private_gradients(model, x, y, optimizer=opt, loss=loss_for(name), engine=engine)
    return [g.numpy() for g in grads]


def _spy(cls, method, kept, log):
    """Wrap ``cls.method`` to log ``kept(self, *args)`` (was a per-example tensor kept?)."""
    original = getattr(cls, method)

    def wrapper(self, *args, **kwargs):
        log.append(kept(self, *args))
        return original(self, *args, **kwargs)

    return mock.patch.object(cls, method, wrapper)


def _conv_kept(record):
    return "kernel_by_example" in record.cache or "grouped_per_example" in record.cache


def kept_tensors(run):
    """Whether each rule's clipped sum read a kept per-example tensor, while ``run()``."""
    log = []
    spies = [
        _spy(numerics._Linear, "clipped_sum", lambda s, c: s.key in s.record.cache, log),
        _spy(conv.ConvRule, "clipped_sum", lambda s, _, r, f: _conv_kept(r), log),
        _spy(kerashub._Tied, "clipped_sum", lambda s, c: s.explicit is not None, log),
    ]
    for spy in spies:
        spy.start()
    try:
        run()
    finally:
        for spy in spies:
            spy.stop()
    return log


class LowMemoryTest(parameterized.TestCase, tf.test.TestCase):
    @parameterized.named_parameters(*[(n, n) for n in MODELS])
    def test_keeps_no_per_example_tensor(self, name):
        keras.utils.set_random_seed(0)
        model = MODELS[name]()
        default = kept_tensors(lambda: gradients(model, name, "bk", low_memory=False))
        self.assertTrue(any(default), msg=f"the default mode keeps some here: {default}")
        lean = kept_tensors(lambda: gradients(model, name, "bk", low_memory=True))
        self.assertNotEmpty(lean)
        self.assertFalse(any(lean), msg=lean)

    @parameterized.named_parameters(*[(n, n) for n in MODELS])
    def test_same_clipped_sums(self, name):
        keras.utils.set_random_seed(0)
        model = MODELS[name]()
        want = gradients(model, name, "vectorized")
        for low_memory in (False, True):
            got = gradients(model, name, "bk", low_memory=low_memory)
            for g, w in zip(got, want, strict=True):
                self.assertAllClose(g, w, rtol=1e-4, atol=1e-6, msg=f"low_memory={low_memory}")

    def test_fit_reads_the_setting(self):
        keras.utils.set_random_seed(0)
        model = ac.make_private(dense_rows(), engine="bk", low_memory=True)
        model.compile(optimizer=ac.DPAutoSGD(learning_rate=0.1, noise_multiplier=1.0), loss="mse")
        x, y = data("dense_rows", np.random.default_rng(1), n=8)
        log = kept_tensors(lambda: model.fit(x, y, batch_size=8, epochs=1, verbose=0))
        self.assertNotEmpty(log)
        self.assertFalse(any(log), msg=log)


class LowMemoryBoundTest(ContributionTestCase):
    def test_cancelling_rows_stay_bounded(self):
        # The norm is read off a float32 per-example tensor that the clipped sum (another
        # float32 product) no longer adds: the bound must cover both roundings.
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((16, 24)), keras.layers.Dense(24, use_bias=False)])
        ac.make_private(model, engine="bk", low_memory=True)
        rng = np.random.default_rng(7)
        inputs = []
        for _ in range(40):  # rows 1 and 2 cancel; the other 14 are zero
            x = np.zeros((16, 24), "float32")
            x[:2] = cancelling_rows(rng, 24, 10.0 ** rng.uniform(2, 6))
            inputs.append((x, same_gradients(rng, 24, rows=16)))
        log = kept_tensors(lambda: self.assert_bounded(self.contributions(model, inputs, ("bk",))))
        self.assertNotEmpty(log)
        self.assertFalse(any(log))


if __name__ == "__main__":
    tf.test.main()

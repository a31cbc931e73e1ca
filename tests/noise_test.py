"""The Gaussian mechanism: the private gradient of a batch whose per-example gradients are
all zero is pure noise, ``sigma * S * z / B``, and that noise has the calibrated scale,
is fresh every step, independent across variables, and reproducible from the seed.

Every per-example gradient is made exactly zero by the loss ``0 * sum(y_pred)``, whatever
the inputs and weights, so the clipped sum is zero in every clipping mode (auto-s and
auto-v give factor 0 or 1/gamma times a zero gradient, abadi and global factor 1) and the
private gradient is the noise term alone.

Statistics (each check is a bound on an estimate from N iid draws):

- The sample std of N iid N(0, s^2) draws has relative standard error ~ 1/sqrt(2N); a
  check allows 6 standard errors. For a 200x500 kernel (N = 100,000) that is a 1.3%
  relative tolerance, for the 500- and 200-entry biases 19% and 30% -- all well below the
  factor-2 (microbatch sensitivity), factor-4 (expected_batch_size) or factor-R errors a
  broken mechanism makes.
- The sample mean has standard error s / sqrt(N); allowed: 6 of them.
- Gaussian shape: the sample skewness and excess kurtosis of N normals have standard
  errors ~ sqrt(6/N) and sqrt(24/N) (0.008 and 0.015 for N = 100,000); allowed: 6 of
  them. Uniform noise of the right std (excess kurtosis -1.2) or Laplace noise (+3)
  fails; checked on the 100,000-entry kernels only.
- The sample correlation of N pairs of independent normals has standard error ~ 1/sqrt(N);
  allowed: 6 of them (0.019 for N = 100,000). Re-using the same z (same variable in two
  steps, two variables of equal size, two seeds) gives correlation 1.

Seeds are fixed, so each run is deterministic; a 6-standard-error bound would fail by
chance with probability ~2e-9 per check for a correct mechanism.
"""

from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from scipy import stats

import tf_autoclip as ac

SIGMA = 1.3
BATCH = 8
D_IN, D_HIDDEN, D_OUT = 200, 500, 200  # kernels of 100,000 entries each
NUM_SE = 6.0


def zero_loss(y_true, y_pred):  # noqa: ARG001
    """Per-example loss 0 * sum(y_pred): every per-example gradient is exactly zero."""
    return 0.0 * tf.reduce_sum(y_pred, axis=-1)


def noise_model() -> keras.Model:
    """Two Dense layers with biases: variables of 100,000, 500, 100,000 and 200 entries."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(D_HIDDEN, activation="tanh"),
            keras.layers.Dense(D_OUT),
        ]
    )


def batch(rows: int = BATCH, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, D_IN)).astype("float32")  # non-zero inputs: the loss zeroes
    y = rng.normal(size=(rows, D_OUT)).astype("float32")
    return x, y


def noise(model, optimizer, rows: int = BATCH, seed: int = 0) -> list[np.ndarray]:
    """The private gradient of one batch (pure noise, since the loss is zero)."""
    x, y = batch(rows, seed)
    grads = ac.private_gradients(model, x, y, optimizer=optimizer, loss=zero_loss)
    return [np.asarray(g, np.float64) for g in grads]


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


class NoiseScaleTest(tf.test.TestCase, parameterized.TestCase):
    def assert_pure_noise(self, grads, expected_std):
        """Each variable's entries look like iid N(0, expected_std^2); variables independent."""
        self.assertLen(grads, 4)
        for g in grads:
            n = g.size
            rel_se = 1.0 / np.sqrt(2.0 * n)  # relative standard error of the std estimate
            self.assertAllClose(np.std(g) / expected_std, 1.0, atol=NUM_SE * rel_se, rtol=0)
            self.assertLess(abs(np.mean(g)), NUM_SE * expected_std / np.sqrt(n))
            if n >= 10_000:
                self.assertLess(abs(stats.skew(g, axis=None)), NUM_SE * np.sqrt(6.0 / n))
                self.assertLess(abs(stats.kurtosis(g, axis=None)), NUM_SE * np.sqrt(24.0 / n))
        # The two 100,000-entry kernels: a shared z (e.g. the same seed per variable)
        # would make them perfectly correlated.
        kernel_1, kernel_2 = grads[0], grads[2]
        self.assertEqual(kernel_1.size, kernel_2.size)
        self.assertLess(abs(corr(kernel_1, kernel_2)), NUM_SE / np.sqrt(kernel_1.size))

    @parameterized.named_parameters(
        ("auto_s", "auto-s", None, 1.0),
        ("auto_v", "auto-v", None, 1.0),
        ("abadi", "abadi", 0.3, 0.3),
        ("global", "global", 0.3, 0.3),
    )
    def test_std_is_sigma_times_sensitivity_over_batch(self, mode, R, sensitivity):
        opt = ac.DPAutoSGD(
            learning_rate=1.0, noise_multiplier=SIGMA, clipping=mode, l2_norm_clip=R, seed=1
        )
        self.assert_pure_noise(noise(noise_model(), opt), SIGMA * sensitivity / BATCH)

    @parameterized.named_parameters(("auto_s", "auto-s", None, 1.0), ("abadi", "abadi", 0.3, 0.3))
    def test_expected_batch_size_is_the_divisor(self, mode, R, sensitivity):
        # 8 rows arrive, but B = 32 was set (Poisson sampling): divide by 32, not 8.
        opt = ac.DPAutoSGD(
            learning_rate=1.0, noise_multiplier=SIGMA, clipping=mode, l2_norm_clip=R,
            expected_batch_size=32, seed=2,
        )  # fmt: skip
        self.assert_pure_noise(noise(noise_model(), opt), SIGMA * sensitivity / 32)

    @parameterized.named_parameters(
        ("per_layer_auto_s", "auto-s", None, "per-layer"),
        ("per_layer_abadi", "abadi", 0.3, "per-layer"),
        ("four_groups_abadi", "abadi", 0.3, "groups"),
    )
    def test_group_styles_keep_the_noise(self, mode, R, style):
        # K groups are each clipped to S / sqrt(K): S, hence the noise, is unchanged.
        model = noise_model()
        if style == "groups":
            style = [[v] for v in model.trainable_variables]
        opt = ac.DPAutoSGD(
            learning_rate=1.0, noise_multiplier=SIGMA, clipping=mode, l2_norm_clip=R,
            clipping_style=style, seed=3,
        )  # fmt: skip
        S = 1.0 if R is None else R
        self.assert_pure_noise(noise(model, opt), SIGMA * S / BATCH)

    @parameterized.named_parameters(
        # (num_microbatches, expected_batch_size, expected std / (sigma * S))
        ("microbatches_of_2", 4, None, 2.0 / 4),  # 2 sigma S / M
        ("microbatches_of_4", 2, None, 2.0 / 2),
        ("microbatches_of_1", 8, None, 1.0 / 8),  # one example each: sensitivity S
        ("of_2_with_expected_batch", 4, 16, 2.0 / (16 * 4 / 8)),  # divisor M * 16 / 8
    )
    def test_microbatches(self, num_microbatches, expected_batch_size, ratio):
        R = 0.3
        opt = ac.DPAutoSGD(
            learning_rate=1.0, noise_multiplier=SIGMA, clipping="abadi", l2_norm_clip=R,
            num_microbatches=num_microbatches, expected_batch_size=expected_batch_size, seed=4,
        )  # fmt: skip
        self.assert_pure_noise(noise(noise_model(), opt), SIGMA * R * ratio)

    @parameterized.parameters(False, True)
    def test_train_on_batch_update_is_the_noise(self, jit_compile):
        # The fit path: one plain SGD step at lr 0.5 moves the weights by -0.5 * noise.
        # Under XLA the noise comes from XLA's own Philox normal sampler.
        model = ac.make_private(noise_model())
        opt = ac.DPAutoSGD(learning_rate=0.5, noise_multiplier=SIGMA, seed=5)
        model.compile(optimizer=opt, loss=zero_loss, jit_compile=jit_compile)
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch(*batch())
        moved = [
            (b.astype(np.float64) - v.numpy()) / 0.5
            for b, v in zip(before, model.trainable_variables, strict=True)
        ]
        self.assert_pure_noise(moved, SIGMA / BATCH)

    @parameterized.named_parameters(
        ("auto_s", "auto-s", None, None),
        ("auto_v", "auto-v", None, None),
        ("abadi_microbatches", "abadi", 0.3, 4),
        ("global", "global", 0.3, None),
    )
    def test_zero_noise_multiplier_adds_nothing(self, mode, R, num_microbatches):
        opt = ac.DPAutoSGD(
            learning_rate=1.0, noise_multiplier=0.0, clipping=mode, l2_norm_clip=R,
            num_microbatches=num_microbatches, seed=6,
        )  # fmt: skip
        for g in noise(noise_model(), opt):
            self.assertAllEqual(g, np.zeros_like(g))


class NoiseSeedTest(tf.test.TestCase, parameterized.TestCase):
    def assert_independent(self, a, b):
        for x, y in zip(a, b, strict=True):
            self.assertLess(abs(corr(x, y)), NUM_SE / np.sqrt(x.size))

    def test_same_seed_same_noise(self):
        model = noise_model()
        first = noise(model, ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=SIGMA, seed=11))
        second = noise(model, ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=SIGMA, seed=11))
        for a, b in zip(first, second, strict=True):
            self.assertAllEqual(a, b)

    def test_different_seeds_independent_noise(self):
        model = noise_model()
        first = noise(model, ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=SIGMA, seed=11))
        second = noise(model, ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=SIGMA, seed=12))
        self.assert_independent(first, second)

    def test_no_seed_independent_noise(self):
        model = noise_model()
        first = noise(model, ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=SIGMA))
        second = noise(model, ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=SIGMA))
        self.assert_independent(first, second)

    def test_successive_steps_draw_fresh_noise(self):
        model = noise_model()
        opt = ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=SIGMA, seed=13)
        first = noise(model, opt)
        second = noise(model, opt)  # same batch, same weights: only the draw can differ
        self.assert_independent(first, second)

    @parameterized.parameters(False, True)
    def test_successive_train_on_batch_steps_draw_fresh_noise(self, jit_compile):
        # In the compiled fit path (also by XLA) the generator state must advance, not be
        # traced as a constant. The loss is zero: each step's weight change is -lr * noise.
        model = ac.make_private(noise_model())
        model.compile(
            optimizer=ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=SIGMA, seed=14),
            loss=zero_loss,
            jit_compile=jit_compile,
        )
        x, y = batch()
        steps, before = [], [v.numpy().astype(np.float64) for v in model.trainable_variables]
        for _ in range(2):
            model.train_on_batch(x, y)
            after = [v.numpy().astype(np.float64) for v in model.trainable_variables]
            steps.append([b - a for b, a in zip(before, after, strict=True)])
            before = after
        self.assert_independent(*steps)

    def test_same_seed_same_training(self):
        # Two fresh private models with equal weights and seeds train identically.
        def run():
            model = ac.make_private(noise_model())
            opt = ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=SIGMA, seed=15)
            model.compile(optimizer=opt, loss=zero_loss)
            for step in range(2):
                model.train_on_batch(*batch(seed=step))
            return [v.numpy() for v in model.trainable_variables]

        for a, b in zip(run(), run(), strict=True):
            self.assertAllEqual(a, b)


class KeyBitsTest(tf.test.TestCase, parameterized.TestCase):
    """Every bit of the 128-bit noise key reaches the noise, with and without XLA.

    TensorFlow's own key/counter op (``StatelessRandomGetKeyCounter``) keeps only the low
    32 bits of each seed word under XLA (TF 2.21): with it, a jit-compiled step's noise
    depended on 32 bits of the key, few enough to search for the noise of a release.
    """

    SEEDS = [[1, 2], [1 + 2**40, 2], [1, 2 + 2**40], [-1, 2], [2**32 - 1, 2], [2**63 - 1, -(2**63)]]

    @parameterized.parameters(False, True)
    def test_key_counter_is_tensorflows_for_every_seed(self, jit):
        from tf_autoclip import noise as noise_lib

        derive = tf.function(noise_lib._key_counter, jit_compile=jit)
        seen = set()
        for words in self.SEEDS:
            seed = tf.constant(words, tf.int64)
            key, counter = derive(seed)
            # The reference: TensorFlow's kernel on the CPU, eagerly.
            want_key, want_counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=seed)
            self.assertAllEqual(key, want_key)
            self.assertAllEqual(counter, want_counter)
            seen.add((int(key[0]), int(counter[1])))
        self.assertLen(seen, len(self.SEEDS))

    @parameterized.parameters(False, True)
    def test_fold_in_is_tensorflows_for_every_seed(self, jit):
        # The seed words of a release are 64-bit Philox outputs: all 64 bits, under XLA too.
        from tf_autoclip import noise as noise_lib

        fold = tf.function(noise_lib.fold_in, jit_compile=jit)
        for words in self.SEEDS:
            seed = tf.constant(words, tf.int64)
            data = tf.constant(2**40 + 3, tf.int64)
            want = tf.random.experimental.stateless_fold_in(seed, data, alg="philox")
            self.assertAllEqual(fold(seed, data), want)

    @parameterized.parameters(False, True)
    def test_every_key_bit_reaches_the_noise(self, jit):
        from tf_autoclip import noise as noise_lib

        base = [0x0123456789ABCDEF, -0x0FEDCBA987654321]
        keys = [
            base,
            [base[0] ^ 2**40, base[1]],
            [base[0], base[1] ^ 2**40],
            [base[0] ^ 1, base[1]],
        ]

        def release_noise(words):
            key = noise_lib.NoiseKey(0)
            key.key.assign(words)

            def release():
                seed = key.next_seed(tf.constant(3, tf.int64))
                return noise_lib.noisy_average([tf.zeros([64])], 1.0, 1.0, seed)[0]

            return tf.function(release, jit_compile=jit)().numpy()

        draws = [release_noise(words) for words in keys]
        for i, a in enumerate(draws):
            for b in draws[:i]:
                self.assertFalse(np.array_equal(a, b))
                self.assertLess(abs(corr(a, b)), NUM_SE / np.sqrt(a.size))


class FlatDrawTest(tf.test.TestCase):
    """``noise.standard_normals``: one Philox draw split into every variable's noise."""

    def test_parts_never_share_a_draw(self):
        # Sizes that are not multiples of the alignment: a wrong offset makes two parts
        # overlap (equal values), which a continuous draw otherwise never gives.
        from tf_autoclip import noise as noise_lib

        shapes = [[5], [5], [3, 7], [1], [17, 2], [200]]
        parts = noise_lib.standard_normals(shapes, tf.constant([3, 4], tf.int64))
        for part, shape in zip(parts, shapes, strict=True):
            self.assertEqual(part.shape.as_list(), shape)
        values = np.concatenate([p.numpy().ravel() for p in parts])
        self.assertLen(np.unique(values), values.size)
        # Standard normal overall (N = 287: 6 standard errors of the std and mean).
        self.assertAllClose(np.std(values), 1.0, atol=NUM_SE / np.sqrt(2 * values.size))
        self.assertLess(abs(np.mean(values)), NUM_SE / np.sqrt(values.size))

    def test_dynamic_shapes_match_static(self):
        from tf_autoclip import noise as noise_lib

        seed = tf.constant([5, 6], tf.int64)
        static = noise_lib.standard_normals([[4, 3], [9]], seed)
        dynamic = tf.function(
            lambda a, b: noise_lib.standard_normals([tf.shape(a), tf.shape(b)], seed)
        )(tf.zeros([4, 3]), tf.zeros([9]))
        for s, d in zip(static, dynamic, strict=True):
            self.assertAllEqual(s, d)


class ChunkedDrawTest(tf.test.TestCase):
    """``noise.noisy_average`` draws a model's noise in chunks, one after another."""

    SHAPES = [[40], [40], [100], [7]]  # with chunks of 64 floats: [0], [1], [2], [3]

    def _noise(self, seed):
        from tf_autoclip import noise as noise_lib

        sums = [tf.zeros(shape) for shape in self.SHAPES]
        with mock.patch.object(noise_lib, "_CHUNK", 64):
            self.assertEqual(noise_lib._chunks(self.SHAPES), [[0], [1], [2], [3]])
            return noise_lib.noisy_average(sums, 1.0, 1.0, tf.convert_to_tensor(seed, tf.int64))

    def test_chunks_never_share_a_draw(self):
        # Same-shape variables in different chunks: the same seed for both would give
        # them equal noise.
        parts = self._noise([7, 8])
        values = np.concatenate([p.numpy().ravel() for p in parts])
        self.assertLen(np.unique(values), values.size)
        self.assertAllClose(np.std(values), 1.0, atol=NUM_SE / np.sqrt(2 * values.size))
        self.assertLess(abs(np.mean(values)), NUM_SE / np.sqrt(values.size))
        again = np.concatenate([p.numpy().ravel() for p in self._noise([7, 8])])
        self.assertAllEqual(again, values)  # a pure function of the seed

    def test_chunks_are_one_draw(self):
        # Each chunk starts where the previous one's numbers end in the same Philox
        # stream, on CPU and under XLA: a chunk that restarted the stream (or any
        # overlap) would repeat numbers of another; a gap would still be fresh numbers.
        from tf_autoclip import noise as noise_lib

        seed = tf.constant([7 + 2**40, -(2**50)], tf.int64)  # high bits set: see KeyBitsTest
        for jit in (False, True):
            with self.subTest(jit_compile=jit):
                chunked = tf.function(self._noise, jit_compile=jit)(seed)
                whole = tf.function(
                    lambda s: noise_lib.standard_normals(self.SHAPES, s), jit_compile=jit
                )(seed)
                for c, w in zip(chunked, whole, strict=True):
                    self.assertAllEqual(c, w)
                # ... and that stream is TensorFlow's Philox stream of the seed.
                tf_draw = tf.function(
                    lambda s: tf.random.stateless_normal([16], s, alg="philox"), jit_compile=jit
                )(seed)
                self.assertAllEqual(whole[0][:16], tf_draw)

    def test_a_few_ops_per_variable(self):
        # The noise of V variables: one draw and split, then per variable a reshape (and
        # its shape), the addition and the division (and the zero sum and the output
        # of this test's function): 6 ops each. Slicing each part out with computed
        # offsets (~12) and a fold-in and draw per chunk (~95) were most of the DP
        # step's graph, which costs memory for as long as the step exists. Once per
        # release: the seed's Philox key and counter (~15 ops) and the draw.
        from tf_autoclip import noise as noise_lib

        V = 50
        shapes = [[7, 3]] * V

        def release(seed):
            sums = [tf.zeros(shape) for shape in shapes]
            return noise_lib.noisy_average(sums, 1.0, 2.0, seed)

        graph = tf.function(release).get_concrete_function(tf.TensorSpec([2], tf.int64)).graph
        self.assertLessEqual(len(graph.get_operations()), 6 * V + 45)

    def test_each_chunk_is_drawn_after_the_previous_is_added(self):
        graph = (
            tf.function(lambda seed: self._noise(seed))
            .get_concrete_function(tf.TensorSpec([2], tf.int64))
            .graph
        )
        draws = [op for op in graph.get_operations() if op.type == "StatelessRandomNormalV2"]
        self.assertLen(draws, len(self.SHAPES))

        def upstream(op):  # names of every op `op` waits for (data or control)
            seen, stack = set(), [op]
            while stack:
                node = stack.pop()
                for parent in [t.op for t in node.inputs] + list(node.control_inputs):
                    if parent.name not in seen:
                        seen.add(parent.name)
                        stack.append(parent)
            return seen

        for before, after in zip(draws, draws[1:]):
            self.assertIn(before.name, upstream(after))


if __name__ == "__main__":
    tf.test.main()

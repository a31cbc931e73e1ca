"""BandMF (``correlated_noise=BandMF(b)``): the noise is ``C^{-1} z``, one band is DP-SGD
exactly, the buffers are never saved, the sampler separates an example's batches by b
steps, and the accounting is Choquette-Choo et al.'s reduction to DP-SGD.

The noise of a release is isolated with ``learning_rate=0`` (the model never changes, so
every step's clipped sum ``s`` is the same): a noiseless optimizer gives ``s / B``, and
``B * (g - s / B)`` is the noise term of any other optimizer on the same batch.
"""

import math
import os
import tempfile
import zipfile

import dp_accounting
import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tf_autoclip import correlated_noise

BATCH = 8
SIGMA = 1.5


def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])


def batch():
    rng = np.random.default_rng(0)
    return rng.normal(size=(BATCH, 3)).astype("float32"), rng.integers(0, 2, BATCH)


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def released(optimizer, steps, model=None):
    """The gradients ``optimizer`` releases for ``steps`` batches (the same batch each time)."""
    model = model or tiny_model()
    x, y = batch()
    out = []
    for _ in range(steps):
        grads = ac.private_gradients(model, x, y, optimizer=optimizer, loss=LOSS)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        out.append(np.concatenate([np.ravel(g.numpy()) for g in grads]))
    return np.stack(out)  # [steps, parameters]


def sgd(**kwargs):
    kwargs.setdefault("noise_multiplier", SIGMA)
    return ac.DPAutoSGD(learning_rate=0.0, expected_batch_size=BATCH, **kwargs)


class CoefficientsTest(parameterized.TestCase):
    def test_sqrt_coefficients_are_the_published_closed_form(self):
        c = ac.BandMF(4).coefficients
        raw = np.array([1.0, 1 / 2, 3 / 8, 5 / 16])  # binom(2j, j) / 4^j
        np.testing.assert_allclose(c, raw / np.linalg.norm(raw), rtol=1e-12)

    def test_columns_have_unit_norm(self):
        for band_mf in (ac.BandMF(5), ac.BandMF(3, coefficients=[2.0, -1.0, 0.5])):
            norms = np.linalg.norm(band_mf.strategy_matrix(12), axis=0)
            self.assertAlmostEqual(norms.max(), 1.0, places=12)

    def test_prefix_error_matches_the_matrices(self):
        band_mf, t = ac.BandMF(3), 9
        workload = np.tril(np.ones((t, t)))
        direct = np.sum((workload @ np.linalg.inv(band_mf.strategy_matrix(t))) ** 2)
        self.assertAlmostEqual(band_mf.prefix_error(t), direct, places=8)
        self.assertAlmostEqual(ac.BandMF(1).prefix_error(t), t * (t + 1) / 2)

    def test_more_bands_and_optimizing_reduce_the_error(self):
        t = 200
        errors = [ac.BandMF(b).prefix_error(t) for b in (1, 2, 4, 8)]
        self.assertEqual(errors, sorted(errors, reverse=True))
        optimized = ac.BandMF(4, coefficients="optimized", num_steps=t)
        self.assertLess(optimized.prefix_error(t), ac.BandMF(4).prefix_error(t) * 0.999)

    @parameterized.parameters(0, -1, 1.5, True)
    def test_bad_num_bands(self, bands):
        with self.assertRaisesRegex(ValueError, "num_bands"):
            ac.BandMF(bands)

    def test_bad_coefficients(self):
        with self.assertRaisesRegex(ValueError, "c_0 > 0"):
            ac.BandMF(2, coefficients=[0.0, 1.0])
        with self.assertRaisesRegex(ValueError, "num_bands=2"):
            ac.BandMF(2, coefficients=[1.0])
        with self.assertRaisesRegex(ValueError, "num_steps"):
            ac.BandMF(2, coefficients="optimized")


class NoiseTest(tf.test.TestCase):
    def noise_of(self, steps, **kwargs):
        """Each release's noise term (times B), same seed for every optimizer."""
        settings = {k: v for k, v in kwargs.items() if k != "correlated_noise"}
        clean = released(sgd(noise_multiplier=0.0, **settings), steps)
        noisy = released(sgd(seed=11, **kwargs), steps)
        return (noisy - clean) * BATCH

    def test_one_band_is_dp_sgd_exactly(self):
        np.testing.assert_array_equal(
            released(sgd(seed=5), 3), released(sgd(seed=5, correlated_noise=ac.BandMF(1)), 3)
        )

    def test_noise_is_the_inverse_strategy_applied_to_dp_sgd_noise(self):
        steps, band_mf = 7, ac.BandMF(3)
        z = self.noise_of(steps)
        w = self.noise_of(steps, correlated_noise=band_mf)
        self.assertAllClose(band_mf.strategy_matrix(steps) @ w, z, atol=2e-5)
        self.assertGreater(np.abs(w - z).max(), 0.1)  # it is not DP-SGD's noise

    def test_accumulation_noises_update_steps_only(self):
        band_mf = ac.BandMF(2, coefficients=[1.0, 0.7])
        z = self.noise_of(6, gradient_accumulation_steps=2)
        w = self.noise_of(6, gradient_accumulation_steps=2, correlated_noise=band_mf)
        self.assertAllEqual(w[0::2], np.zeros_like(w[0::2]))  # no noise, buffers unmoved
        self.assertAllClose(band_mf.strategy_matrix(3) @ w[1::2], z[1::2], atol=2e-5)

    def test_noise_statistics(self):
        # 4,000 coordinates of 6 steps: C w must be iid N(0, sigma^2) across steps.
        band_mf, steps, width = ac.BandMF(3), 6, 4000
        correlator = correlated_noise.NoiseCorrelator(band_mf)
        z = np.random.default_rng(3).normal(scale=SIGMA, size=(steps, width)).astype("float32")
        w = np.stack([correlator.correlate([tf.constant(r)], True)[0].numpy() for r in z])
        recovered = band_mf.strategy_matrix(steps) @ w
        self.assertAllClose(recovered, z, atol=1e-4)
        covariance = np.cov(w)  # the predicted sigma^2 C^-1 C^-T, up to 6 standard errors
        inverse = np.linalg.inv(band_mf.strategy_matrix(steps))
        predicted = SIGMA**2 * inverse @ inverse.T
        tolerance = 6 * SIGMA**2 * np.sqrt(2.0 / width) * np.max(np.diag(predicted))
        self.assertAllClose(covariance, predicted, atol=tolerance)
        self.assertLess(predicted[0, 1], -0.1 * SIGMA**2)  # consecutive noise anticorrelated

    def test_restart_keeps_a_banded_strategy_of_unit_columns(self):
        # The map z -> w over 8 steps with a reset after step 3 is M; C' = M^-1 must be
        # lower triangular, 3-banded, with column norms <= 1: what the accounting assumes.
        band_mf, steps = ac.BandMF(3), 8
        correlator = correlated_noise.NoiseCorrelator(band_mf)
        columns = []
        for k in range(steps):
            correlator.reset()
            out = []
            for t in range(steps):
                if t == 3:
                    correlator.reset()
                impulse = np.float32(1.0 if t == k else 0.0)
                out.append(correlator.correlate([tf.constant([impulse])], True)[0].numpy()[0])
            columns.append(out)
        strategy = np.linalg.inv(np.array(columns).T)
        self.assertAllClose(np.triu(strategy, 1), np.zeros_like(strategy), atol=1e-6)
        self.assertAllClose(np.tril(strategy, -3), np.zeros_like(strategy), atol=1e-6)
        self.assertLessEqual(np.linalg.norm(strategy, axis=0).max(), 1.0 + 1e-6)

    def test_refuses_another_models_gradients(self):
        optimizer = sgd(correlated_noise=ac.BandMF(2))
        released(optimizer, 1)
        other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5)])
        with self.assertRaisesRegex(ValueError, "one DP optimizer per model"):
            released(optimizer, 1, model=other)


class SavingTest(tf.test.TestCase):
    """The buffers hold past noise: with them, past updates could be denoised."""

    def trained(self):
        model = ac.make_private(tiny_model())
        optimizer = ac.DPAutoSGD(
            learning_rate=0.1,
            noise_multiplier=SIGMA,
            expected_batch_size=BATCH,
            correlated_noise=ac.BandMF(3),
        )
        model.compile(optimizer=optimizer, loss=LOSS)
        x, y = batch()
        model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0)
        buffers = optimizer._correlator._state.buffers
        self.assertTrue(buffers and np.abs(buffers[0].numpy()).max() > 0)
        return model, optimizer

    def test_not_in_optimizer_variables_or_checkpoints(self):
        model, optimizer = self.trained()
        buffer_names = {v.name for v in optimizer._correlator._state.buffers}
        self.assertFalse(buffer_names & {v.name for v in optimizer.variables})
        directory = tempfile.mkdtemp()
        path = tf.train.Checkpoint(optimizer=optimizer, model=model).save(
            os.path.join(directory, "ckpt")
        )
        names = [name for name, _ in tf.train.list_variables(path)]
        self.assertFalse([n for n in names if "bandmf" in n.lower() or "buffer" in n.lower()])
        count = len(names)
        path = tf.train.Checkpoint(optimizer=optimizer, model=model).save(
            os.path.join(directory, "again")
        )
        self.assertLen(tf.train.list_variables(path), count)  # nothing lazily added

    def test_keras_file_round_trip(self):
        model, optimizer = self.trained()
        path = os.path.join(tempfile.mkdtemp(), "model.keras")
        model.save(path)
        sizes = {
            name: info.file_size
            for name, info in zipfile.ZipFile(path).NameToInfo.items()
            if name.endswith(".h5")
        }
        weights = sum(np.size(v) for v in model.weights + optimizer.variables)
        self.assertLess(sum(sizes.values()), 4 * weights + 60_000)  # no 2 x parameters extra
        loaded = keras.models.load_model(path)
        self.assertEqual(loaded.optimizer.correlated_noise, optimizer.correlated_noise)
        self.assertIsNone(loaded.optimizer._correlator._state.buffers)

    def test_config_round_trip(self):
        optimizer = sgd(correlated_noise=ac.BandMF(4, coefficients=[1.0, 0.5, 0.2, 0.1]))
        config = optimizer.get_config()
        self.assertEqual(config["correlated_noise"]["num_bands"], 4)
        again = ac.DPAutoSGD.from_config(config)
        self.assertEqual(again.correlated_noise, optimizer.correlated_noise)
        self.assertIsNone(sgd().get_config()["correlated_noise"])


class AccountingTest(parameterized.TestCase):
    def test_one_band_is_dp_sgd(self):
        q, steps = 256 / 60000, 2000
        self.assertEqual(
            ac.compute_epsilon(1.1, q, steps, 1e-5),
            ac.compute_epsilon(1.1, q, steps, 1e-5, correlated_noise=ac.BandMF(1)),
        )
        self.assertEqual(
            ac.compute_noise_multiplier(3.0, 1e-5, q, steps=steps),
            ac.compute_noise_multiplier(3.0, 1e-5, q, steps=steps, correlated_noise=ac.BandMF(1)),
        )

    @parameterized.parameters(("rdp", dp_accounting.rdp.RdpAccountant), ("pld", None))
    def test_matches_jax_privacy_cyclic_poisson_formula(self, accountant, _):
        # jax-privacy's DpsgdTrainingAccountant for BandMF with cycle length b: Poisson
        # rate batch / (n // b) for ceil(T / b) steps. Computed here from dp_accounting.
        n, batch_size, steps, bands, sigma = 60000, 250, 2401, 4, 1.3
        event = dp_accounting.PoissonSampledDpEvent(
            batch_size / (n // bands), dp_accounting.GaussianDpEvent(sigma)
        )
        if accountant == "rdp":
            reference = dp_accounting.rdp.RdpAccountant()
        else:
            reference = dp_accounting.pld.PLDAccountant(
                value_discretization_interval=ac.accounting.PLD_VALUE_DISCRETIZATION_INTERVAL
            )
        reference.compose(event, math.ceil(steps / bands))
        ours = ac.compute_epsilon(
            sigma, batch_size / n, steps, 1e-5, accountant, correlated_noise=ac.BandMF(bands)
        )
        self.assertAlmostEqual(ours, reference.get_epsilon(1e-5), places=6)

    def test_noise_multiplier_inverts_epsilon(self):
        band_mf, q = ac.BandMF(8), 0.01
        sigma = ac.compute_noise_multiplier(2.0, 1e-5, q, epochs=20, correlated_noise=band_mf)
        steps = ac.accounting.steps_for_epochs(20, q)
        eps = ac.compute_epsilon(sigma, q, steps, 1e-5, correlated_noise=band_mf)
        self.assertLessEqual(eps, 2.0)
        self.assertGreater(
            ac.compute_epsilon(sigma - 2e-3, q, steps, 1e-5, correlated_noise=band_mf), 2.0
        )
        # Fewer amplified steps at a higher rate: more noise than DP-SGD for the same ε.
        self.assertGreater(sigma, ac.compute_noise_multiplier(2.0, 1e-5, q, epochs=20))

    def test_rate_above_one_is_refused(self):
        with self.assertRaisesRegex(ValueError, "num_bands \\* sampling_probability"):
            ac.compute_epsilon(1.0, 0.3, 10, 1e-5, correlated_noise=ac.BandMF(4))

    def test_statement_and_target_epsilon(self):
        band_mf = ac.BandMF(4)
        text = ac.privacy_statement(
            1.1, 0.004, 1000, 1e-5, num_examples=50000, correlated_noise=band_mf
        )
        eps = ac.compute_epsilon(1.1, 0.004, 1000, 1e-5, correlated_noise=band_mf)
        self.assertIn(f"ε = {eps:.4g}  with BandMF", text)
        self.assertIn("No bound for shuffled batches", text)
        optimizer = ac.DPAutoAdam.from_target_epsilon(
            target_epsilon=2.0, delta=1e-5, num_examples=50000, batch_size=200, epochs=2,
            correlated_noise=band_mf,
        )  # fmt: skip
        self.assertEqual(optimizer.correlated_noise, band_mf)
        self.assertEqual(
            optimizer.noise_multiplier,
            ac.compute_noise_multiplier(2.0, 1e-5, 200 / 50000, epochs=2, correlated_noise=band_mf),
        )


class SamplerTest(tf.test.TestCase):
    def memberships(self, n, bands, q, steps, seed):
        sampler = ac.poisson_sample(
            np.arange(n, dtype="float32")[:, None], sampling_probability=q, steps=steps,
            seed=seed, min_separation=bands,
        )  # fmt: skip
        rows = np.zeros((steps, n), bool)
        for t, (x, _, w) in enumerate(sampler.dataset):
            ids = x.numpy()[:, 0][w.numpy() > 0].astype(int)
            rows[t, ids] = True
        return sampler, rows

    def test_batches_of_an_example_are_b_steps_apart(self):
        n, bands, q, steps = 400, 4, 0.05, 160
        sampler, rows = self.memberships(n, bands, q, steps, seed=0)
        self.assertEqual(sampler.min_separation, bands)
        self.assertAlmostEqual(sampler.expected_batch_size, q * n)
        residues = [set(np.nonzero(rows[:, i])[0] % bands) for i in range(n)]
        self.assertTrue(all(len(r) <= 1 for r in residues))
        # Inclusion rate within the own class: b q = 0.2 (6 standard errors over 16,000).
        own = sum(rows[list(r)[0] :: bands, i].sum() for i, r in enumerate(residues) if r)
        opportunities = sum(len(range(list(r)[0], steps, bands)) for r in residues if r)
        rate = own / opportunities
        self.assertAllClose(rate, bands * q, atol=6 * math.sqrt(0.2 * 0.8 / opportunities))
        self.assertAllClose(rows.mean(), q, atol=0.01)  # marginal rate per step: q

    def test_one_is_plain_poisson_sampling(self):
        _, a = self.memberships(100, 1, 0.1, 5, seed=3)
        x = np.arange(100, dtype="float32")[:, None]
        plain = ac.poisson_sample(x, sampling_probability=0.1, steps=5, seed=3)
        b = np.zeros_like(a)
        for t, (xb, _, w) in enumerate(plain.dataset):
            b[t, xb.numpy()[:, 0][w.numpy() > 0].astype(int)] = True
        self.assertAllEqual(a, b)

    def test_refusals(self):
        x = np.zeros((100, 1), "float32")
        with self.assertRaisesRegex(ValueError, "num_bands \\* sampling_probability"):
            ac.poisson_sample(x, sampling_probability=0.5, steps=4, min_separation=4)
        with self.assertRaisesRegex(ValueError, "min_separation"):
            ac.poisson_sample(x, sampling_probability=0.1, steps=4, min_separation=0)


class FitTest(tf.test.TestCase):
    def setup(self, separation):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(256, 3)).astype("float32")
        y = rng.integers(0, 2, 256)
        sampler = ac.poisson_sample(
            x, y, expected_batch_size=16, steps=8, min_separation=separation
        )
        model = ac.make_private(tiny_model())
        model.compile(
            optimizer=ac.DPAutoSGD(
                learning_rate=0.1, noise_multiplier=SIGMA, correlated_noise=ac.BandMF(4)
            ),
            loss=LOSS,
        )
        return model, sampler

    def test_fit_on_separated_batches_and_callback_epsilon(self):
        model, sampler = self.setup(separation=4)
        callback = ac.PrivacyCallback(num_examples=256, delta=1e-5)
        history = model.fit(sampler.dataset, epochs=1, steps_per_epoch=8, callbacks=[callback],
                            verbose=0)  # fmt: skip
        expected = ac.compute_epsilon(SIGMA, 16 / 256, 8, 1e-5, correlated_noise=ac.BandMF(4))
        self.assertAllClose(history.history["epsilon"][-1], expected)
        shuffle = ac.PrivacyCallback(num_examples=256, delta=1e-5, sampling="shuffle")
        shuffle.set_model(model)
        with self.assertRaisesRegex(ValueError, "sampling='shuffle'"):
            shuffle.epsilon(8)

    def test_fit_refuses_batches_closer_than_the_bands(self):
        model, sampler = self.setup(separation=2)
        with self.assertRaisesRegex(ValueError, "min_separation=4"):
            model.fit(sampler.dataset, epochs=1, steps_per_epoch=8, verbose=0)


if __name__ == "__main__":
    tf.test.main()

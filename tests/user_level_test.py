"""User-level DP: each user's records are clipped together (issue #16).

The unit of privacy is the user: the clipped sum is ``sum_u c_u g_u`` with
``g_u = sum_{i in u} g_i``, so one user weighs at most S whatever their number of
records; the divisor is the expected number of users per batch; the sampler samples
users; the statement names the unit. The per-user reference below builds on the shared
oracle (tests/reference.py): per-example gradients from a plain loop, summed per user in
float64, then ``reference.clipped_sum`` with users as its units.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import tf_autoclip as ac
from tests import reference, testing_models
from tf_autoclip import engines
from tf_autoclip.engines import bk

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
R = 0.05  # small enough that abadi clips every user of the grid below


def user_reference_sum(model, x, y, user_ids, mode, groups=None, R=None):
    """``sum_u c_u (sum_{i in u} g_i)`` from a plain per-example loop, in float64."""
    per_example = reference.unit_gradients(model, x, y, LOSS)
    users = {}
    for grads, user in zip(per_example, np.asarray(user_ids).tolist(), strict=True):
        total = users.setdefault(user, [np.zeros(g.shape, np.float64) for g in grads])
        for t, g in zip(total, grads, strict=True):
            t += g
    return reference.clipped_sum(list(users.values()), groups, mode, R=R)


def optimizer(mode="auto-s", expected=5.0, **kwargs):
    return ac.DPAutoSGD(
        learning_rate=1.0, noise_multiplier=0.0, clipping=mode,
        l2_norm_clip=R if mode in ("abadi", "global") else None, expected_batch_size=expected,
        **kwargs,
    )  # fmt: skip


def private_sum(model, x, y, user_ids, opt, **kwargs):
    """The clipped sum (noise 0) the library computes: private gradients times the divisor."""
    grads = ac.private_gradients(model, x, y, optimizer=opt, loss=LOSS, user_ids=user_ids, **kwargs)
    return [g.numpy().astype(np.float64) * opt.expected_batch_size for g in grads]


def norm_of_difference(a, b):
    return reference.l2_norm([p - q for p, q in zip(a, b, strict=True)])


class UserLevelGradientsTest(tf.test.TestCase):
    def test_matches_a_per_user_loop_for_every_clipping_mode(self):
        model = testing_models.mlp()
        x, y = testing_models.data_for(model, 9)
        user_ids = np.array([4, 4, 9, 1, 9, 4, 7, 1, 1])  # any ints, unordered, 4 users
        for style in reference.STYLES:
            groups = reference.groups_for(model, style)
            for mode in reference.MODES:
                with self.subTest(mode=mode, style=style):
                    opt = optimizer(mode, clipping_style=style)
                    got = private_sum(model, x, y, user_ids, opt)
                    want = user_reference_sum(model, x, y, user_ids, mode, groups, R)
                    for g, w in zip(got, want, strict=True):
                        self.assertAllClose(g, w, rtol=1e-4, atol=1e-6)

    def test_string_ids_and_one_user_per_example_equal_example_level(self):
        model = testing_models.mlp()
        x, y = testing_models.data_for(model, 6)
        opt = optimizer()
        names = np.array([b"a", b"b", b"c", b"d", b"e", b"f"])
        per_user = private_sum(model, x, y, names, opt)
        per_example = private_sum(model, x, y, None, opt)
        for a, b in zip(per_user, per_example, strict=True):
            self.assertAllClose(a, b, rtol=1e-5, atol=1e-7)

    def test_a_user_with_many_huge_records_weighs_at_most_s(self):
        # 50 copies of an example with a huge gradient, all owned by one user, next to 10
        # ordinary users. Removing the user changes the clipped sum by at most S; clipping
        # per example would let the copies move it by 50 S (so this test can fail).
        model = testing_models.mlp()
        x, y = testing_models.data_for(model, 11)
        x = x.astype(np.float32)
        huge = np.repeat(x[:1] * 1e4, 50, axis=0)
        x_with = np.concatenate([x[1:], huge])
        y_with = np.concatenate([y[1:], np.repeat(y[:1], 50)])
        users_with = np.concatenate([np.arange(10), np.full(50, 99)])
        for mode, s in (("auto-s", 1.0), ("auto-v", 1.0), ("abadi", R)):
            with self.subTest(mode=mode):
                opt = optimizer(mode, expected=1.0)
                without = private_sum(model, x[1:], y[1:], np.arange(10), opt)
                change = norm_of_difference(private_sum(model, x_with, y_with, users_with, opt),
                                            without)  # fmt: skip
                self.assertLessEqual(change, s * (1 + 1e-5))
                self.assertGreater(change, 0.9 * s)  # the user does count, up to S
                example_level = norm_of_difference(
                    private_sum(model, x_with, y_with, None, opt), without
                )
                self.assertGreater(example_level, 45 * s)

    def test_divisor_ignores_the_number_of_users_and_records(self):
        # AUTO-V makes every clipped user a unit vector: one user with 1 or 3 copies of an
        # example gives the same private gradient, 3 users with one copy each 3 times it;
        # both are divided by expected_batch_size = 7, whatever the batch holds.
        model = testing_models.mlp()
        x, y = testing_models.data_for(model, 1)
        x3, y3 = np.repeat(x, 3, axis=0), np.repeat(y, 3)
        opt = optimizer("auto-v", expected=7.0)
        (per_example,) = reference.unit_gradients(model, x, y, LOSS)
        unit = [g / reference.l2_norm(per_example) for g in per_example]

        def grads(xs, ys, ids):
            return ac.private_gradients(model, xs, ys, optimizer=opt, loss=LOSS, user_ids=ids)

        for xs, ys, ids, users in ((x, y, [0], 1), (x3, y3, [5, 5, 5], 1), (x3, y3, [0, 1, 2], 3)):
            with self.subTest(ids=ids):
                for g, u in zip(grads(xs, ys, ids), unit, strict=True):
                    self.assertAllClose(g.numpy(), users * u / 7.0, rtol=1e-4, atol=1e-7)

    def test_user_ids_need_a_fixed_expected_batch_size_and_no_microbatches(self):
        model = testing_models.mlp()
        x, y = testing_models.data_for(model, 4)
        ids = [0, 0, 1, 1]
        with self.assertRaisesRegex(ValueError, "expected number of users per batch"):
            private_sum(model, x, y, ids, optimizer(expected=None))
        with self.assertRaisesRegex(ValueError, "num_microbatches"):
            private_sum(model, x, y, ids, optimizer(num_microbatches=2))
        with self.assertRaisesRegex(ValueError, "gradient_accumulation_steps"):
            private_sum(model, x, y, ids, optimizer(gradient_accumulation_steps=2))
        with self.assertRaises((ValueError, tf.errors.InvalidArgumentError)):
            private_sum(model, x, y, [0, 1, 2], optimizer())

    def test_fast_engines_are_not_used_for_user_ids(self):
        model = testing_models.mlp()
        x, y = testing_models.data_for(model, 4)
        self.assertIs(engines.select_engine("auto", model, None), bk.bk_engine)  # bk serves it
        self.assertIs(
            engines.select_engine("auto", model, None, user_level=True), engines.vectorized_engine
        )
        self.assertIn("cross-example", bk.unsupported_reason(model, None, user_level=True))
        for name in ("bk", "ghost"):
            with self.subTest(engine=name), self.assertRaisesRegex(ValueError, "cross-example"):
                private_sum(model, x, y, [0, 0, 1, 1], optimizer(), engine=name)
        got = private_sum(model, x, y, [0, 0, 1, 1], optimizer(), engine="vectorized")
        want = user_reference_sum(model, x, y, [0, 0, 1, 1], "auto-s")
        for g, w in zip(got, want, strict=True):
            self.assertAllClose(g, w, rtol=1e-4, atol=1e-6)


class UserLevelFitTest(tf.test.TestCase):
    def test_train_step_strips_the_ids_and_clips_per_user(self):
        model = ac.make_private(testing_models.mlp(), user_id_key="user_id")
        model.compile(optimizer=optimizer(expected=3.0), loss=LOSS)
        x, y = testing_models.data_for(model, 6)
        ids = np.array([2, 2, 2, 8, 5, 5])
        want = user_reference_sum(model, x, y, ids, "auto-s")
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch({"inputs": x, "user_id": ids}, y)
        for b, v, w in zip(before, model.trainable_variables, want, strict=True):
            self.assertAllClose(b - v.numpy(), w / 3.0, rtol=1e-4, atol=1e-6)

    def test_fit_on_sampled_users_trains(self):
        model = ac.make_private(testing_models.mlp(), user_id_key="user_id")
        x, y = testing_models.data_for(model, 60)
        sampler = ac.poisson_sample(
            x, y, user_ids=np.arange(60) // 4, max_examples_per_user=4, expected_batch_size=5,
            steps=4, seed=0,
        )  # fmt: skip
        opt = ac.DPAutoSGD(
            learning_rate=0.5, noise_multiplier=1.0, expected_batch_size=sampler.expected_batch_size
        )
        model.compile(optimizer=opt, loss=LOSS)
        before = [v.numpy() for v in model.trainable_variables]
        model.fit(sampler.dataset, epochs=1, steps_per_epoch=4, shuffle=False, verbose=0)
        self.assertEqual(int(opt.iterations), 4)
        self.assertEqual(opt.expected_batch_size, 5.0)  # users per batch, not records
        for b, v in zip(before, model.trainable_variables, strict=True):
            self.assertTrue(np.all(np.isfinite(v.numpy())))
            self.assertNotAllClose(b, v.numpy())

    def test_user_sampler_and_model_must_agree(self):
        x, y = testing_models.data_for(testing_models.mlp(), 20)
        users = ac.poisson_sample(
            x, y, user_ids=np.arange(20) // 2, max_examples_per_user=2, expected_batch_size=2,
            steps=1, seed=0,
        )  # fmt: skip
        examples = ac.poisson_sample(x, y, expected_batch_size=2, steps=1, seed=0)
        arrays = {"inputs": x, "user_id": np.arange(20) // 2}  # shuffled, one record at a time
        for key, data, error in (
            (None, users.dataset, "user_id_key"),
            ("user_id", examples.dataset, "sampled users"),
            ("user_id", arrays, "sampled users"),
        ):
            model = ac.make_private(testing_models.mlp(), user_id_key=key)
            model.compile(optimizer=optimizer(expected=2.0), loss=LOSS)
            with self.subTest(key=key), self.assertRaisesRegex(ValueError, error):
                if isinstance(data, dict):
                    model.fit(data, y, batch_size=4, epochs=1, verbose=0)
                else:
                    model.fit(data, epochs=1, verbose=0)


class UserSamplingTest(tf.test.TestCase):
    def test_users_are_sampled_at_rate_q_with_all_their_records(self):
        num_users, q, steps, cap = 200, 0.1, 150, 3
        counts = 1 + np.arange(num_users) % 5  # 1..5 records, the cap keeps the first 3
        user_of_row = np.repeat(np.arange(num_users) * 10 + 7, counts)  # ids 7, 17, ...
        rng = np.random.default_rng(0)
        user_of_row = user_of_row[rng.permutation(len(user_of_row))]  # records interleaved
        x = np.arange(len(user_of_row), dtype=np.float32)[:, None]  # x = the row index
        s = ac.poisson_sample(
            x, np.zeros(len(x)), user_ids=user_of_row, max_examples_per_user=cap,
            sampling_probability=q, steps=steps, seed=3,
        )  # fmt: skip
        self.assertEqual((s.num_users, s.expected_batch_size), (num_users, q * num_users))
        sorted_ids = np.unique(user_of_row)
        first_rows = {u: np.flatnonzero(user_of_row == u)[:cap].tolist() for u in sorted_ids}
        sampled = 0
        for xb, _, w in s.dataset:
            ids, rows, w = xb["user_id"].numpy(), xb["inputs"].numpy()[:, 0], w.numpy()
            self.assertEqual(len(ids), s.padded_batch_size)
            real = ids >= 0
            self.assertAllEqual(w, real.astype(np.float32))
            self.assertAllEqual(rows[~real], np.zeros((~real).sum()))
            for user in np.unique(ids[real]):
                got = sorted(rows[ids == user].astype(int).tolist())
                self.assertEqual(got, first_rows[sorted_ids[user]])
            sampled += len(np.unique(ids[real]))
        rate = sampled / (num_users * steps)
        self.assertLess(abs(rate - q), 4 * np.sqrt(q * (1 - q) / (num_users * steps)))

    def test_a_cap_on_records_per_user_is_required(self):
        x = np.zeros((6, 1), np.float32)
        with self.assertRaisesRegex(ValueError, "max_examples_per_user"):
            ac.poisson_sample(x, user_ids=[0, 0, 1, 1, 2, 2], expected_batch_size=1, steps=1)
        with self.assertRaisesRegex(ValueError, "one id per example"):
            ac.poisson_sample(
                x, user_ids=[0, 1], max_examples_per_user=1, expected_batch_size=1, steps=1
            )


class UserLevelStatementTest(tf.test.TestCase):
    def test_the_statement_names_the_unit(self):
        args = (1.1, 0.01, 1000, 1e-5)
        user = ac.privacy_statement(*args, num_examples=6000, batch_size=60, unit="user")
        example = ac.privacy_statement(*args, num_examples=6000, batch_size=60)
        self.assertStartsWith(user, "User-level (ε, δ)-differential privacy")
        self.assertIn("add-or-remove-one-user adjacency", user)
        self.assertIn("6000 users", user)
        self.assertNotIn("Example-level", user)
        self.assertStartsWith(example, "Example-level")
        epsilons = [[line.split()[2] for line in t.splitlines() if "ε = " in line and "  ε" in line]
                    for t in (user, example)]  # fmt: skip
        self.assertEqual(epsilons[0], epsilons[1])  # the same accountant, q per user
        with self.assertRaisesRegex(ValueError, "unit"):
            ac.privacy_statement(*args, unit="person")


if __name__ == "__main__":
    tf.test.main()

"""The ReversibleEmbedding rule (tied and untied) against a plain per-example computation.

A ``keras.layers.ReversibleEmbedding`` used for lookups (``z = E[ids]``) and as the output
projection (``logits = h E^T``, tied; ``h R``, untied). Its tied per-example gradient is
``sum_t e(id_t) b_t^T + sum_s g_s h_s^T`` and the rule forms no one-hot row for it (see
``rules/kerashub.py``, ``_Tied``). The vocabulary (40) is larger than the sequence (6),
example 0 repeats tokens, and padded positions (id 0, zero gradients) are included.

* Rule level: records of random ``b``, ``h``, ``g`` (with ids, repeats and padding), the
  rule's squared norms (ghost, explicit, mixed; static and dynamic sequence length; the
  float64 Gram of the logit gradients in one or several vocabulary blocks) never below
  and within 5e-5 of the exact float64 norms, its clipped sum (one lookup call and one
  reverse call, or two lookup calls merged) equal to ``sum_i c_i G_i`` from
  ``np.add.at``, and its per-example gradients equal to ``G_i``.
* Model level: a tied and an untied model on the fast engine (``engine="bk"``, no
  fallback) and on the ghost engine (the rule's ghost norms, book-keeping sums) against
  the loop oracle of ``tests/reference.py`` with Abadi clipping at a threshold between
  the examples' norms (a wrong norm clips the wrong examples).
"""

import warnings
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tests import reference
from tf_autoclip import layer_rules
from tf_autoclip.rules import kerashub as kerashub_rules
from tf_autoclip.rules.base import Record
from tf_autoclip.rules.numerics import norm_method

V, D, T, N = 40, 5, 6, 4
METHODS = ("ghost", "explicit", "mixed")


def layer_for(tied: bool):
    layer = keras.layers.ReversibleEmbedding(V, D, tie_weights=tied)
    layer.build((None, T))
    return layer


def ids_with_repeats_and_padding(rng, n=N, t=T):
    """Example 0 repeats tokens (3, 3, 3, 7, 7, 3); example i > 0 ends with i % 3
    padded positions (id 0)."""
    ids = rng.integers(1, V, size=(n, t)).astype("int32")
    ids[0] = [3, 3, 3, 7, 7, 3]
    mask = np.ones((n, t), "float32")
    for i in range(1, n):
        if i % 3:
            mask[i, t - i % 3 :] = 0
    return ids * mask.astype("int32"), mask


def record_data(seed=0):
    """ids [N,T], b [N,T,D], h [N,T,D], g [N,T,V]; padded positions have b = g = 0."""
    rng = np.random.default_rng(seed)
    ids, mask = ids_with_repeats_and_padding(rng)
    b = rng.normal(size=(N, T, D)).astype("float32") * mask[..., None]
    h = rng.normal(size=(N, T, D)).astype("float32")
    g = rng.normal(size=(N, T, V)).astype("float32") * mask[..., None]
    return ids, b, h, g


def exact_per_example(ids, b, h, g, tied):
    """Per-example gradients in float64: ``[E + R]`` tied, ``[E, R]`` untied."""
    emb = np.zeros((N, V, D))
    for i in range(N):
        np.add.at(emb[i], ids[i], b[i].astype(np.float64))
    rev = np.einsum("nsv,nsd->nvd", g.astype(np.float64), h.astype(np.float64))
    if tied:
        return [emb + rev]
    return [emb, np.transpose(rev, [0, 2, 1])]  # R is [D, V]


def make_record(layer, rule, ids, b, h, g, split_lookups=False):
    """One record of a lookup call and a reverse call (merged as the engine does)."""
    records = []
    lookups = [(ids, b)] if not split_lookups else [(ids[:, :3], b[:, :3]), (ids[:, 3:], b[:, 3:])]
    for part_ids, part_b in lookups:
        r = Record(layer, rule, lambda t: None)
        r.saved["ids"] = tf.convert_to_tensor(part_ids)
        r.grads["outputs"] = tf.convert_to_tensor(part_b)
        records.append(r)
    r = Record(layer, rule, lambda t: None)
    r.saved["h"] = tf.convert_to_tensor(h)
    r.grads["logits"] = tf.convert_to_tensor(g)
    records.append(r)
    return rule.merge(layer, records)


class ReversibleEmbeddingRuleTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.product(
        tied=(True, False), method=METHODS, split=(False, True), chunk=(8192, 16)
    )
    def test_norms_and_clipped_sum_match_exact(self, tied, method, split, chunk):
        # chunk: vocabulary columns per float64 block of the tied Gram (16: 3 blocks).
        self.enter_context(mock.patch.object(kerashub_rules, "_VOCAB_CHUNK", chunk))
        layer = layer_for(tied)
        rule = layer_rules.get_layer_rule(layer)
        ids, b, h, g = record_data()
        want = exact_per_example(ids, b, h, g, tied)
        c = np.array([0.5, 2.0, 0.0, 1.25], "float32")
        with norm_method(method):
            record = make_record(layer, rule, ids, b, h, g, split_lookups=split)
            norms = [n.numpy() for n in rule.squared_norms(layer, record)]
            record.all_finite = tf.constant(True)
            sums = [
                s.numpy() for s in rule.clipped_sum(layer, record, [tf.constant(c)] * len(want))
            ]
            per_example = [p.numpy() for p in rule.per_example_gradients(layer, record)]
        self.check(norms, sums, per_example, want, c)

    @parameterized.product(tied=(True, False), method=METHODS)
    def test_dynamic_sequence_length(self, tied, method):
        # Unknown T at trace time: "mixed" picks ghost or explicit with a tf.cond.
        self.enter_context(mock.patch.object(kerashub_rules, "_VOCAB_CHUNK", 16))
        layer = layer_for(tied)
        rule = layer_rules.get_layer_rule(layer)
        ids, b, h, g = record_data(seed=1)
        want = exact_per_example(ids, b, h, g, tied)
        c = np.array([1.0, 0.25, 3.0, 0.0], "float32")
        spec = [
            tf.TensorSpec([N, None], tf.int32),
            tf.TensorSpec([N, None, D], tf.float32),
            tf.TensorSpec([N, None, D], tf.float32),
            tf.TensorSpec([N, None, V], tf.float32),
        ]

        @tf.function(input_signature=spec, autograph=False)
        def run(ids, b, h, g):
            with norm_method(method):
                record = make_record(layer, rule, ids, b, h, g)
                norms = rule.squared_norms(layer, record)
                record.all_finite = tf.constant(False)  # the path that zeroes dropped rows
                sums = rule.clipped_sum(layer, record, [tf.constant(c)] * len(want))
                return norms, sums, rule.per_example_gradients(layer, record)

        norms, sums, per_example = run(ids, b, h, g)
        self.check(
            [n.numpy() for n in norms],
            [s.numpy() for s in sums],
            [p.numpy() for p in per_example],
            want,
            c,
        )

    def check(self, norms, sums, per_example, want, c):
        for got_sq, got_sum, got_pe, w in zip(norms, sums, per_example, want, strict=True):
            exact = np.sum(np.square(w.reshape(N, -1)), 1)
            # Upper bounds (float32 results rounded up, plus the rounding allowance of the
            # clipped sum), tight to 5e-5.
            self.assertTrue(np.all(got_sq >= exact * (1 - 1e-6)), (got_sq, exact))
            self.assertAllClose(got_sq, exact, rtol=5e-5, atol=0)
            want_sum = np.einsum("n,n...->...", c.astype(np.float64), w)
            scale = np.max(np.abs(want_sum))
            self.assertAllClose(got_sum, want_sum, rtol=1e-5, atol=1e-5 * scale)
            self.assertAllClose(got_pe, w, rtol=1e-5, atol=1e-5 * np.max(np.abs(w)))


LOSS = keras.losses.SparseCategoricalCrossentropy(
    from_logits=True, reduction="mean_with_sample_weight"
)


def lm(tied: bool):
    """ids -> ReversibleEmbedding -> Dense(tanh) -> the same layer reversed."""
    ids = keras.Input((T,), dtype="int32")
    emb = keras.layers.ReversibleEmbedding(V, D, tie_weights=tied)
    h = keras.layers.Dense(D, activation="tanh")(emb(ids))
    return keras.Model(ids, emb(h, reverse=True))


class ReversibleEmbeddingModelTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("tied", True, "bk"),
        ("untied", False, "bk"),
        ("tied_ghost_engine", True, "ghost"),
        ("untied_ghost_engine", False, "ghost"),
    )
    def test_matches_loop(self, tied, engine):
        keras.utils.set_random_seed(3)
        model = lm(tied)
        rng = np.random.default_rng(3)
        x, mask = ids_with_repeats_and_padding(rng)
        y = rng.integers(1, V, size=(N, T)).astype("int32") * mask.astype("int32")
        grads = reference.unit_gradients(model, x, y, LOSS, sample_weight=mask)
        norms = sorted(reference.norms(grads))
        R = float(0.5 * (norms[1] + norms[2]))  # two examples clipped, two not
        optimizer = ac.DPAutoSGD(
            learning_rate=1.0, noise_multiplier=0.0, clipping="abadi", l2_norm_clip=R,
            expected_batch_size=N,
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = ac.private_gradients(
                model, x, y, sample_weight=mask, optimizer=optimizer, loss=LOSS, engine=engine
            )
        fallbacks = [str(w.message) for w in caught if "vectorized engine" in str(w.message)]
        self.assertEqual(fallbacks, [])
        want = reference.clipped_sum(grads, reference.groups_for(model, "all-layer"), "abadi", R=R)
        scale = max(float(np.max(np.abs(w))) for w in want)
        for g, w in zip(got, want, strict=True):
            self.assertAllClose(np.asarray(g) * N, w, rtol=1e-5, atol=1e-5 * scale)


if __name__ == "__main__":
    tf.test.main()

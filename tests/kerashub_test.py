"""KerasHub task models train privately, and their clipped sum matches a per-example loop.

Tiny random-initialized backbones (built from the backbone classes, ``preprocessor=None``;
token ids and ``padding_mask`` fed directly): the text classifiers (BERT, RoBERTa,
DistilBERT, ALBERT with its shared layers), the causal LMs (GPT-2 with its tied
embedding, Gemma, Llama 3 with an untied output embedding) and the ViT image classifier.
For each: ``engine="auto"`` picks the fast engine (``"bk"``), its clipped sum (sigma = 0)
matches the loop of ``tests/reference.py``, and a short private ``fit`` / ``evaluate`` /
``predict`` runs without falling back. Also: LoRA (``backbone.enable_lora``) on BERT and
GPT-2, a task saved with ``save_to_preset`` and reloaded with ``from_preset`` (with a
tiny BERT tokenizer: ``fit`` on raw strings), and a ResNet (BatchNormalization) refused
by ``make_private``.

Causal LMs: targets are the next tokens, ``sample_weight`` the targets' padding mask, and
the loss reduction ``"mean_with_sample_weight"``: each example's loss is the mean over its
real tokens, and padded positions contribute nothing.
"""

import os
import subprocess
import sys
import unittest
import warnings

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_autoclip as ac
from tests import reference
from tf_autoclip import engines, layer_rules, layer_safety
from tf_autoclip.engines import bk

try:
    import keras_hub
except ImportError as error:  # an optional extra: skip the whole module without it
    raise unittest.SkipTest(f"keras_hub is not installed ({error})") from None

BATCH, SEQ, VOCAB, HIDDEN, CLASSES = 4, 8, 24, 8, 3
IMAGE = (8, 8, 3)
KH = keras_hub.models
CLASSIFIER_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
# Each example's loss is the mean over its real (unpadded) target tokens.
LM_LOSS = keras.losses.SparseCategoricalCrossentropy(
    from_logits=True, reduction="mean_with_sample_weight"
)
VERBOSE = bool(os.environ.get("KERASHUB_TEST_VERBOSE"))
# A BERT WordPiece vocabulary of VOCAB entries: the special tokens, then whole words.
WORDS = "the a quick brown fox jumps over lazy dog cat sat on mat red blue big small runs sees"
VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS.split()]


def _encoder(cls, **kwargs):
    return cls(
        vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=HIDDEN,
        intermediate_dim=16, max_sequence_length=SEQ, dropout=0.0, **kwargs,
    )  # fmt: skip


def _decoder(cls, **kwargs):
    return cls(
        vocabulary_size=VOCAB, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=HIDDEN, intermediate_dim=16, **kwargs,
    )  # fmt: skip


# name -> (kind, builder)
MODELS = {
    "bert": (
        "text",
        lambda: KH.BertTextClassifier(
            _encoder(KH.BertBackbone), num_classes=CLASSES, preprocessor=None, dropout=0.0
        ),
    ),
    "roberta": (
        "text",
        lambda: KH.RobertaTextClassifier(
            _encoder(KH.RobertaBackbone), num_classes=CLASSES, preprocessor=None, dropout=0.0
        ),
    ),
    "distil_bert": (
        "text",
        lambda: KH.DistilBertTextClassifier(
            _encoder(KH.DistilBertBackbone), num_classes=CLASSES, preprocessor=None, dropout=0.0
        ),
    ),
    "albert": (  # two layers sharing one TransformerEncoder (num_groups=1)
        "text",
        lambda: KH.AlbertTextClassifier(
            KH.AlbertBackbone(
                vocabulary_size=VOCAB,
                num_layers=2,
                num_heads=2,
                embedding_dim=4,
                hidden_dim=HIDDEN,
                intermediate_dim=16,
                max_sequence_length=SEQ,
            ),  # fmt: skip
            num_classes=CLASSES,
            preprocessor=None,
            dropout=0.0,
        ),
    ),
    "gpt2": ("lm", lambda: KH.GPT2CausalLM(_encoder(KH.GPT2Backbone), preprocessor=None)),
    "gemma": (
        "lm",
        lambda: KH.GemmaCausalLM(_decoder(KH.GemmaBackbone, head_dim=4), preprocessor=None),
    ),
    "llama3": ("lm", lambda: KH.Llama3CausalLM(_decoder(KH.Llama3Backbone), preprocessor=None)),
    "vit": (
        "image",
        lambda: KH.ViTImageClassifier(
            KH.ViTBackbone(
                image_shape=IMAGE,
                patch_size=4,
                num_layers=1,
                num_heads=2,
                hidden_dim=HIDDEN,
                mlp_dim=16,
            ),  # fmt: skip
            num_classes=CLASSES,
            preprocessor=None,
        ),
    ),
}


def model_data(name, model, n=BATCH, seed=0):
    """(x, y, sample_weight, loss). Text: ids in [1, VOCAB), example i has i % 3 padded
    positions at the end (its padding_mask 0 there)."""
    rng = np.random.default_rng(seed)
    kind = MODELS[name][0]
    if kind == "image":
        x = rng.normal(size=(n, *IMAGE)).astype("float32")
        return x, rng.integers(0, CLASSES, n).astype("int32"), None, CLASSIFIER_LOSS
    length = SEQ + 1 if kind == "lm" else SEQ
    ids = rng.integers(1, VOCAB, size=(n, length)).astype("int32")
    mask = np.ones((n, length), "int32")
    for i in range(n):
        if i % 3:
            mask[i, length - i % 3 :] = 0
    ids = ids * mask
    if kind == "lm":  # next-token targets; the targets' mask weighs the loss
        x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
        return x, ids[:, 1:], mask[:, 1:].astype("float32"), LM_LOSS
    x = {"token_ids": ids, "padding_mask": mask}
    if any(i.name == "segment_ids" for i in model.inputs):
        x["segment_ids"] = np.zeros_like(ids)
    return x, rng.integers(0, CLASSES, n).astype("int32"), None, CLASSIFIER_LOSS


_built: dict[str, keras.Model] = {}


def build(name):
    """One model per name for the module (its probe trace is cached per model)."""
    if name not in _built:
        keras.utils.set_random_seed(1)
        _built[name] = MODELS[name][1]()
    return _built[name]


def enable_lora(backbone, rank=2, alpha=6, seed=0):
    """``backbone.enable_lora(rank)`` (LoRA on the attention's query and value projections,
    every other backbone weight frozen) with ``lora_alpha = alpha`` (KerasHub passes none,
    so s = alpha / rank would be 1) and random B factors (Keras starts them at 0, which
    would hide A's gradient). Returns the LoRA layers."""
    backbone.enable_lora(rank)
    rng = np.random.default_rng(seed)
    layers = [
        layer for layer in layer_rules.all_layers(backbone) if getattr(layer, "lora_enabled", False)
    ]
    for layer in layers:
        layer.lora_alpha = alpha  # read by the kernel property (and the rules) at each call
        b = layer.lora_kernel_b
        b.assign(rng.normal(size=b.shape).astype("float32"))
    return layers


def clipped_sum(model, x, y, sw, loss, engine="auto"):
    """sum_i c_i g_i from private_gradients (sigma = 0)."""
    optimizer = ac.DPAutoSGD(learning_rate=1.0, noise_multiplier=0.0, expected_batch_size=BATCH)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = ac.private_gradients(
            model, x, y, sample_weight=sw, optimizer=optimizer, loss=loss, engine=engine
        )
    # The fast engine falls back to the vectorized one, with a warning, when tracing finds
    # what its rules cannot see (e.g. a variable read outside its layer): none may here.
    fallbacks = [str(w.message) for w in caught if "vectorized engine instead" in str(w.message)]
    if fallbacks:
        raise AssertionError(f"the fast engine fell back: {fallbacks}")
    return [np.asarray(g, np.float64) * BATCH for g in grads]


def relative_error(got, want):
    scale = max(float(np.max(np.abs(w))) for w in want)
    return max(float(np.max(np.abs(g - w))) for g, w in zip(got, want, strict=True)) / scale


class KerasHubTest(tf.test.TestCase, parameterized.TestCase):
    def assert_auto_picks_bk(self, model):
        self.assertIsNone(bk.unsupported_reason(model, None))
        self.assertIs(engines.select_engine("auto", model, None), bk.bk_engine)

    @parameterized.named_parameters((name, name) for name in MODELS)
    def test_clipped_sum_matches_loop(self, name):
        model = build(name)
        x, y, sw, loss = model_data(name, model)
        self.assert_auto_picks_bk(model)
        want = reference.clipped_sum(reference.unit_gradients(model, x, y, loss, sample_weight=sw))
        err = relative_error(clipped_sum(model, x, y, sw, loss), want)
        if VERBOSE:
            print(f"\n{name}: auto=bk rel_err={err:.2e}")
        self.assertLess(err, 1e-4)

    @parameterized.named_parameters((name, name) for name in MODELS)
    def test_fit_evaluate_predict(self, name):
        model = ac.make_private(build(name))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.check_fit(name, model)
        fallbacks = [str(w.message) for w in caught if "vectorized engine" in str(w.message)]
        self.assertEqual(fallbacks, [])

    def check_fit(self, name, model):
        self.assert_auto_picks_bk(model)
        x, y, sw, loss = model_data(name, model, n=2 * BATCH, seed=1)
        model.compile(
            optimizer=ac.DPAutoAdam(
                learning_rate=1e-2, noise_multiplier=0.5, expected_batch_size=BATCH
            ),
            loss=loss,
            weighted_metrics=["sparse_categorical_accuracy"],
        )
        before = [v.numpy() for v in model.trainable_variables]
        history = model.fit(x, y, sample_weight=sw, batch_size=BATCH, epochs=1, verbose=0)
        self.assertTrue(np.isfinite(history.history["loss"]).all(), history.history)
        self.assertEqual(int(model.optimizer.iterations), 2)
        moved = [
            not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables)
        ]
        self.assertTrue(all(moved), "every trainable variable takes a noisy step")
        results = model.evaluate(x, y, sample_weight=sw, batch_size=BATCH, verbose=0)
        self.assertTrue(np.isfinite(results).all(), results)
        predictions = model.predict(x, batch_size=BATCH, verbose=0)
        self.assertEqual(predictions.shape[0], 2 * BATCH)
        self.assertTrue(np.isfinite(predictions).all())

    def test_padding_contributes_nothing(self):
        # Changing padded tokens (ids and targets) changes no example's clipped gradient.
        model = build("gpt2")
        x, y, sw, loss = model_data("gpt2", model)
        want = clipped_sum(model, x, y, sw, loss)
        x2 = {k: v.copy() for k, v in x.items()}
        y2 = y.copy()
        x2["token_ids"][x2["padding_mask"] == 0] = 5
        y2[sw == 0] = 7
        self.assertNotAllEqual(x2["token_ids"], x["token_ids"])
        self.assertLess(relative_error(clipped_sum(model, x2, y2, sw, loss), want), 1e-5)

    @parameterized.named_parameters(("bert", "bert"), ("gpt2", "gpt2"))
    def test_lora_runs_on_bk_matches_loop_and_trains_only_lora(self, name):
        keras.utils.set_random_seed(2)
        model = MODELS[name][1]()  # a fresh model: enable_lora changes it
        lora = enable_lora(model.backbone)
        self.assertLen(lora, 2)  # query and value of the one attention layer
        # Trainable: the LoRA factors and the LoRA layers' biases; the task's head (BERT).
        head = [v for v in model.trainable_variables if not v.path.startswith(model.backbone.name)]
        allowed = {id(v) for v in head} | {
            id(v) for layer in lora for v in layer.trainable_variables
        }
        self.assertTrue(all(id(v) in allowed for v in model.trainable_variables))
        self.assertLen([v for v in model.trainable_variables if "lora_kernel" in v.path], 4)
        frozen = [v for v in model.non_trainable_variables if v.path.endswith("kernel")]
        self.assertNotEmpty(frozen)  # the query/value kernels among them
        self.assert_auto_picks_bk(model)
        x, y, sw, loss = model_data(name, model)
        want = reference.clipped_sum(reference.unit_gradients(model, x, y, loss, sample_weight=sw))
        err = relative_error(clipped_sum(model, x, y, sw, loss), want)
        if VERBOSE:
            print(f"\n{name} + LoRA: auto=bk rel_err={err:.2e}")
        self.assertLess(err, 1e-4)

        before = [v.numpy() for v in model.variables]
        trainable = {id(v) for v in model.trainable_variables}
        ac.make_private(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.check_fit(name, model)  # every trainable variable moves
        self.assertEqual([w for w in caught if "vectorized engine" in str(w.message)], [])
        for v, b in zip(model.variables, before, strict=True):
            if id(v) not in trainable:
                self.assertAllEqual(v.numpy(), b, msg=f"{v.path} is frozen")

    def test_preset_round_trip_fits_raw_strings(self):
        # A task with a tiny tokenizer saved with save_to_preset and loaded back with the
        # generic TextClassifier.from_preset (the real loading path, offline). Its fit on
        # raw strings runs the preprocessor in the tf.data pipeline; the private step must
        # receive the preprocessed batch: one noise-free SGD step is the loop's step on it.
        tokenizer = keras_hub.tokenizers.BertTokenizer(vocabulary=VOCABULARY)
        preprocessor = KH.BertTextClassifierPreprocessor(tokenizer, sequence_length=SEQ)
        keras.utils.set_random_seed(3)
        model = KH.BertTextClassifier(
            _encoder(KH.BertBackbone), num_classes=CLASSES, preprocessor=preprocessor, dropout=0.0
        )
        path = os.path.join(self.get_temp_dir(), "tiny_bert")
        model.save_to_preset(path)
        loaded = KH.TextClassifier.from_preset(path)
        self.assertIsInstance(loaded, KH.BertTextClassifier)
        self.assertIsInstance(loaded.preprocessor, KH.BertTextClassifierPreprocessor)
        for a, b in zip(model.weights, loaded.weights, strict=True):
            self.assertAllEqual(a.numpy(), b.numpy(), msg=a.path)

        ac.make_private(loaded)
        texts = np.array(
            ["the quick brown fox", "a lazy dog sat on the mat", "red fox runs", "big cat sees"]
        )
        labels = np.array([0, 1, 2, 1], "int32")
        x = {k: np.asarray(v) for k, v in loaded.preprocessor(texts).items()}
        self.assertEqual(x["token_ids"].shape, (BATCH, SEQ))
        # The preprocessor runs in the tf.data pipeline, never in the model's call: it
        # does not keep the fast engine from serving the task.
        self.assert_auto_picks_bk(loaded)
        grads = reference.unit_gradients(loaded, x, labels, CLASSIFIER_LOSS)
        want = reference.sgd_step(grads, BATCH)
        loaded.compile(
            optimizer=ac.DPAutoSGD(
                learning_rate=1.0, noise_multiplier=0.0, expected_batch_size=BATCH
            ),
            loss=CLASSIFIER_LOSS,
        )
        before = [v.numpy() for v in loaded.trainable_variables]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded.fit(texts, labels, batch_size=BATCH, epochs=1, verbose=0)
        self.assertEqual([w for w in caught if "vectorized engine" in str(w.message)], [])
        self.assertEqual(int(loaded.optimizer.iterations), 1)
        step = [b - v.numpy() for b, v in zip(before, loaded.trainable_variables, strict=True)]
        err = relative_error(step, want)
        if VERBOSE:
            print(f"\npreset + preprocessor: rel_err={err:.2e}")
        self.assertLess(err, 1e-4)

    def test_preprocessor_padding_to_the_longest_example_is_refused(self):
        # sequence_length=None pads each batch to its longest example: one example would
        # change the others' inputs.
        tokenizer = keras_hub.tokenizers.BertTokenizer(vocabulary=VOCABULARY)
        preprocessor = KH.BertTextClassifierPreprocessor(tokenizer, sequence_length=SEQ)
        model = KH.BertTextClassifier(
            _encoder(KH.BertBackbone), num_classes=CLASSES, preprocessor=preprocessor
        )
        model.preprocessor.sequence_length = None
        with self.assertRaisesRegex(ValueError, "sequence_length=None"):
            ac.make_private(model)

    def test_resnet_with_batch_norm_is_refused(self):
        backbone = KH.ResNetBackbone(
            input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64],
            stackwise_num_blocks=[1], stackwise_num_strides=[1], block_type="basic_block",
            image_shape=IMAGE,
        )  # fmt: skip
        model = KH.ResNetImageClassifier(backbone, num_classes=CLASSES, preprocessor=None)
        with self.assertRaisesRegex(ValueError, "BatchNormalization.*GroupNormalization"):
            ac.make_private(model)

    def test_changed_kerashub_class_is_not_vouched(self):
        # Vouches hold for the reviewed source only: a subclass (or a changed class) is not.
        class Encoder(keras_hub.layers.TransformerEncoder):
            pass

        layer = Encoder(intermediate_dim=4, num_heads=1)
        self.assertIn("not a reviewed KerasHub class", layer_safety._layer_reason(layer))
        self.assertIsNone(
            layer_safety._layer_reason(keras_hub.layers.TransformerEncoder(4, num_heads=1))
        )

    def test_registers_whatever_the_import_order(self):
        # tf_autoclip before keras_hub, with a bare find_spec (as a skip check does) in
        # between: the rules must still be registered once keras_hub is imported.
        code = (
            "import importlib.util, tf_autoclip\n"
            "assert importlib.util.find_spec('keras_hub') is not None\n"
            "import keras_hub\n"
            "from tf_autoclip import rules\n"
            "layer = keras_hub.layers.PositionEmbedding(sequence_length=3)\n"
            "print(type(rules.get_layer_rule(layer)).__name__)\n"
        )
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        self.assertEqual(out.stdout.strip().splitlines()[-1], "PositionEmbeddingRule")


if __name__ == "__main__":
    tf.test.main()

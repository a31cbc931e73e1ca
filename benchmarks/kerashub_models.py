"""DP/non-DP training speed of each KerasHub model family tf_autoclip supports.

Small random-init models (2 layers, width 64, sequence 32, vocabulary 1,000, batch 16; ViT
on 32x32 images with 8x8 patches): examples/s of `fit` steps for Keras non-DP and for
tf_autoclip DP (`engine="auto"`, recorded), timed round-robin in one process (see
`benchmarks.engines.round_robin`), plus the engine "auto" picked. Run from the root:

    python -m benchmarks.kerashub_models [--windows=3 --steps=5 --models=bert,gpt2]
"""

from __future__ import annotations

import datetime
import json
import statistics
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

import tf_autoclip as ac

try:
    from benchmarks.engines import machine, round_robin, run_steps, warm_up
except ModuleNotFoundError as e:  # `python benchmarks/kerashub_models.py`
    raise SystemExit("Run from the repository root: python -m benchmarks.kerashub_models") from e

import keras_hub

flags.DEFINE_string("models", "all", "Comma-separated model names, or all.")
FLAGS = flags.FLAGS  # --windows, --steps (0: 5) and --output_json: benchmarks.engines' flags

BATCH, SEQ, VOCAB, WIDTH, LAYERS = 16, 32, 1000, 64, 2
KH = keras_hub.models


def _encoder(cls):
    return cls(
        vocabulary_size=VOCAB, num_layers=LAYERS, num_heads=4, hidden_dim=WIDTH,
        intermediate_dim=4 * WIDTH, max_sequence_length=SEQ, dropout=0.0,
    )  # fmt: skip


def _decoder(cls, **kwargs):
    return cls(
        vocabulary_size=VOCAB, num_layers=LAYERS, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=WIDTH, intermediate_dim=4 * WIDTH, **kwargs,
    )  # fmt: skip


def _classifier(task, backbone):
    return lambda: task(backbone(), num_classes=2, preprocessor=None, dropout=0.0)


MODELS: dict[str, tuple[str, Callable[[], keras.Model]]] = {
    "bert": ("text", _classifier(KH.BertTextClassifier, lambda: _encoder(KH.BertBackbone))),
    "roberta": (
        "text",
        _classifier(KH.RobertaTextClassifier, lambda: _encoder(KH.RobertaBackbone)),
    ),
    "distil_bert": (
        "text",
        _classifier(KH.DistilBertTextClassifier, lambda: _encoder(KH.DistilBertBackbone)),
    ),
    "albert": (
        "text",
        _classifier(
            KH.AlbertTextClassifier,
            lambda: KH.AlbertBackbone(
                vocabulary_size=VOCAB,
                num_layers=LAYERS,
                num_heads=4,
                embedding_dim=32,
                hidden_dim=WIDTH,
                intermediate_dim=4 * WIDTH,
                max_sequence_length=SEQ,
            ),  # fmt: skip
        ),
    ),
    "gpt2": ("lm", lambda: KH.GPT2CausalLM(_encoder(KH.GPT2Backbone), preprocessor=None)),
    "gemma": (
        "lm",
        lambda: KH.GemmaCausalLM(_decoder(KH.GemmaBackbone, head_dim=16), preprocessor=None),
    ),
    "llama3": ("lm", lambda: KH.Llama3CausalLM(_decoder(KH.Llama3Backbone), preprocessor=None)),
    "vit": (
        "image",
        lambda: KH.ViTImageClassifier(
            KH.ViTBackbone(
                image_shape=(32, 32, 3),
                patch_size=8,
                num_layers=LAYERS,
                num_heads=4,
                hidden_dim=WIDTH,
                mlp_dim=4 * WIDTH,
            ),  # fmt: skip
            num_classes=2,
            preprocessor=None,
        ),
    ),
}


def batch(name: str, model: keras.Model):
    """One fixed batch: (x, y) or (x, y, sample_weight) for causal LMs."""
    rng = np.random.default_rng(0)
    kind = MODELS[name][0]
    if kind == "image":
        return rng.normal(size=(BATCH, 32, 32, 3)).astype("float32"), np.arange(BATCH) % 2
    ids = rng.integers(1, VOCAB, size=(BATCH, SEQ)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones((BATCH, SEQ), "int32")}
    if "segment_ids" in [i.name for i in model.inputs]:
        x["segment_ids"] = np.zeros((BATCH, SEQ), "int32")
    if kind == "lm":
        return x, np.roll(ids, -1, axis=1), np.ones((BATCH, SEQ), "float32")
    return x, np.arange(BATCH) % 2


def compiled(name: str, private: bool):
    model = MODELS[name][1]()
    reduction = "mean_with_sample_weight" if MODELS[name][0] == "lm" else "sum_over_batch_size"
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    engine = None
    if private:
        engine = ac.engines.auto_engine_name(model, None)
        model = ac.make_private(model)
        optimizer = ac.DPAutoAdamW(
            learning_rate=1e-4, noise_multiplier=1.0, expected_batch_size=BATCH
        )
    else:
        optimizer = keras.optimizers.AdamW(learning_rate=1e-4)
    model.compile(optimizer=optimizer, loss=loss, metrics=[])
    data = tf.data.Dataset.from_tensors(batch(name, model)).repeat()
    return model, data, engine


def measure(name: str) -> dict:
    runs, engine = {}, None
    for config in ("keras", "dp"):
        model, data, found = compiled(name, config == "dp")
        engine = found or engine
        warm_up(model, data, "mixed")
        iterator = iter(data)
        run_steps(model, iterator, 2)
        runs[config] = (model, iterator)
    rates, _ = round_robin(runs, BATCH, FLAGS.steps or 5)
    keras_rate, dp_rate = (statistics.median(rates[c]) for c in ("keras", "dp"))
    params = runs["keras"][0].count_params()
    return {"model": name, "params": params, "engine": engine,
            "keras_examples_per_s": keras_rate, "dp_examples_per_s": dp_rate,
            "dp_over_keras": dp_rate / keras_rate}  # fmt: skip


def main(argv):
    del argv
    names = list(MODELS) if FLAGS.models == "all" else FLAGS.models.split(",")
    results = []
    for name in names:
        print(f"== {name}", flush=True)
        results.append(measure(name))
        print(json.dumps(results[-1]), flush=True)
    print("\n| model | parameters | engine | Keras ex/s | DP ex/s | DP ÷ Keras |")
    print("|---|---:|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['params']:,} | {r['engine']} | "
              f"{r['keras_examples_per_s']:.0f} | {r['dp_examples_per_s']:.0f} | "
              f"{r['dp_over_keras']:.2f} |")  # fmt: skip
    if FLAGS.output_json:
        meta = {"machine": machine(), "date": datetime.date.today().isoformat()}
        with open(FLAGS.output_json, "w") as f:
            json.dump({**meta, "batch": BATCH, "sequence": SEQ, "results": results}, f, indent=1)


if __name__ == "__main__":
    app.run(main)

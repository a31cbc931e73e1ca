"""tensorflow-privacy 0.9.0 (TF 2.15, Keras 2) on W1, W2 and W3, for comparison with engines.py.

Runs in its own venv (benchmarks/setup_tfp.sh makes /tmp/tfp-venv); ``engines.py
--tfp_python=/tmp/tfp-venv/bin/python`` runs it right after its own configurations:

  /tmp/tfp-venv/bin/python benchmarks/tfp_bench.py --memory --output_json=/tmp/tfp.json

Configurations: Keras 2 non-DP; tensorflow-privacy's DPSequential/DPModel (per-example
clipping: vectorized per-example gradients, ``num_microbatches=None``) with XLA
(``use_xla=True``, its default) and without; and for W2 its fast gradient clipping
(ghost norms, ``layer_registry`` with Dense, Embedding, EinsumDense, LayerNormalization
and MultiHeadAttention). Its registry has no Conv2D, so W1 has no fast configuration.
On W1 also its DP Keras optimizers on a plain Keras 2 model: ``DPKerasAdamOptimizer``
(a loop over per-example microbatches) and ``VectorizedDPKerasAdamOptimizer``
(``tf.vectorized_map``), both with ``num_microbatches=None``: one microbatch per example.
W3 (the 10.9M-parameter transformer): Keras 2, DPModel and its fast clipping, without XLA;
``--memory`` adds their peak RSS, one subprocess each, as engines.py measures it.
Timing as in engines.py: warm-up, then round-robin windows, median examples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf
import tensorflow_privacy as tfp
from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry as lr
from tensorflow_privacy.privacy.fast_gradient_clipping.registry_functions import (
    einsum_dense,
    layer_normalization,
    multi_head_attention,
)

L = tf.keras.layers


class Positions(L.Layer):
    def call(self, tokens):
        shape = tf.shape(tokens)
        return tf.broadcast_to(tf.range(shape[1]), shape)


def mnist_cnn_layers():
    return [
        L.InputLayer((28, 28, 1)),
        L.Conv2D(16, 8, strides=2, padding="same", activation="tanh"),
        L.MaxPool2D(2, 1),
        L.Conv2D(32, 4, strides=2, padding="valid", activation="tanh"),
        L.MaxPool2D(2, 1),
        L.Flatten(),
        L.Dense(32, activation="tanh"),
        L.Dense(10),
    ]


def transformer_io(vocab, seq, dim, heads, blocks, ffn, classes=2):
    tokens = tf.keras.Input((seq,), dtype="int32")
    h = L.Embedding(vocab, dim)(tokens) + L.Embedding(seq, dim)(Positions()(tokens))
    for _ in range(blocks):
        h = L.LayerNormalization()(h + L.MultiHeadAttention(heads, dim // heads)(h, h))
        h = L.LayerNormalization()(h + L.Dense(dim)(L.Dense(ffn, activation="relu")(h)))
    return tokens, L.Dense(classes)(L.GlobalAveragePooling1D()(h))


def registry():
    reg = lr.make_default_layer_registry()
    reg.insert(L.EinsumDense, einsum_dense.einsum_layer_computation)
    reg.insert(L.LayerNormalization, layer_normalization.layer_normalization_computation)
    reg.insert(L.MultiHeadAttention, multi_head_attention.multi_head_attention_layer_computation)
    return reg


# tensorflow-privacy's DP Keras optimizers (Keras 2 legacy Adam), per-example microbatches.
DP_OPTIMIZERS = {
    "tfp_adam_opt": tfp.DPKerasAdamOptimizer,
    "tfp_vec_adam_opt": tfp.VectorizedDPKerasAdamOptimizer,
}
# Steps per timed window: the optimizers' per-example loops are ~100x slower.
STEPS = {"w1": 20, "w2": 10, "w3": 3, "tfp_adam_opt": 1, "tfp_vec_adam_opt": 4}
BATCH = {"w1": 256, "w2": 64, "w3": 32}
# The transformers of engines.py: W2 SST-2-sized, W3 10.9M parameters.
TRANSFORMERS = {
    "w2": dict(vocab=10_000, seq=64, dim=128, heads=4, blocks=2, ffn=512),
    "w3": dict(vocab=30_000, seq=128, dim=256, heads=4, blocks=4, ffn=1024),
}
PLAN = {
    "w1": ["keras", "tfp_xla", "tfp", "tfp_adam_opt", "tfp_vec_adam_opt"],
    "w2": ["keras", "tfp_xla", "tfp", "tfp_fast_xla", "tfp_fast"],
    "w3": ["keras", "tfp", "tfp_fast"],  # XLA compiles of W3 take minutes; not timed
}


def build(workload, config, warm_up=True):
    tf.keras.utils.set_random_seed(0)
    dp = dict(l2_norm_clip=1.0, noise_multiplier=1.0)
    optimizer = tf.keras.optimizers.SGD(0.05, momentum=0.9)
    if config in DP_OPTIMIZERS:  # a plain model; the DP optimizer clips per example
        optimizer = DP_OPTIMIZERS[config](num_microbatches=None, learning_rate=1e-3, **dp)
    if workload == "w1":
        if config == "keras" or config in DP_OPTIMIZERS:
            model = tf.keras.Sequential(mnist_cnn_layers())
        else:
            model = tfp.DPSequential(
                layers=mnist_cnn_layers(), use_xla=config.endswith("xla"), **dp
            )
        x = np.random.rand(256, 28, 28, 1).astype("float32")
        y = np.random.randint(0, 10, 256)
    else:
        vocab, seq, batch = (
            TRANSFORMERS[workload]["vocab"],
            TRANSFORMERS[workload]["seq"],
            BATCH[workload],
        )
        inputs, outputs = transformer_io(**TRANSFORMERS[workload])
        if config == "keras":
            model = tf.keras.Model(inputs, outputs)
        else:
            reg = registry() if config.startswith("tfp_fast") else None
            model = tfp.DPModel(
                inputs=inputs, outputs=outputs, use_xla=config.endswith("xla"),
                layer_registry=reg, **dp,
            )  # fmt: skip
        x = np.random.randint(1, vocab, (batch, seq)).astype("int32")
        y = np.random.randint(0, 2, batch)
    # The per-example (microbatch) path takes unreduced losses; the fast path refuses them.
    reduction = "auto" if config == "keras" or config.startswith("tfp_fast") else "none"
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    model.compile(optimizer=optimizer, loss=loss)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    if warm_up:
        model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)
    else:  # memory_child: make the train function without running it
        model.make_train_function()
    return model, iter(ds), len(x)


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def memory_child(workload, config, steps=5):
    """Peak RSS (VmHWM) of this process after building and training ``config``."""
    model, iterator, _ = build(workload, config, warm_up=False)
    before = _status_kb("VmRSS")
    for _ in range(3 + steps):
        logs = model.train_function(iterator)
    float(logs["loss"])
    print(json.dumps({"peak_rss_mb": _status_kb("VmHWM") / 1024,
                      "before_training_rss_mb": before / 1024}))  # fmt: skip


def memory(workload, config):
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--memory_child={workload}:{config}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_json")
    parser.add_argument("--workloads", default="w1,w2,w3")
    parser.add_argument("--memory", action="store_true", help="Also peak memory on W3.")
    parser.add_argument("--memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child.split(":"))
        return
    results = []
    for workload in args.workloads.split(","):
        configs = PLAN[workload]
        runs = {}
        for config in configs:
            try:
                runs[config] = build(workload, config)
            except Exception as error:  # noqa: BLE001 - report and go on
                print(f"{workload}/{config} failed: {type(error).__name__}: {error}", flush=True)
                results.append({"workload": workload, "config": config, "error": str(error)})
        rates = {c: [] for c in runs}
        for _ in range(5):
            for config, (model, iterator, batch) in runs.items():
                steps = STEPS.get(config, STEPS[workload])
                start = time.perf_counter()
                for _ in range(steps):
                    logs = model.train_function(iterator)
                float(logs["loss"])
                rates[config].append(batch * steps / (time.perf_counter() - start))
        for config, r in rates.items():
            row = {"workload": workload, "config": config, "examples_per_s": statistics.median(r)}
            row["ratio_keras"] = row["examples_per_s"] / statistics.median(rates["keras"])
            if args.memory and workload == "w3":
                row.update(memory(workload, config))
            results.append(row)
            print(json.dumps(row), flush=True)
        del runs
    meta = {"tensorflow": tf.__version__, "tensorflow_privacy": tfp.__version__}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

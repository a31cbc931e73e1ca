r"""Peak memory of KerasHub training, Keras vs DP, each configuration in its own process.

Two questions (docs/benchmarks.md, "KerasHub"):

* ``--model=gpt2``: the tied ``ReversibleEmbedding`` at a GPT-2 vocabulary (50,257) and
  a long sequence. ``dp`` is the current rule (no one-hot rows); ``dp_onehot`` swaps in
  :class:`OneHotTiedRule`, the tied rule as it was before (one-hot rows of size V for
  every lookup position, concatenated with the logit gradients), to measure what that
  cost. The model is ``GPT2CausalLM`` on a random-init ``GPT2Backbone`` (``--layers``,
  ``--hidden``; vocabulary 50,257), random ids, every position a target.
* ``--model=bert_small``: ``BertTextClassifier`` on a random-init ``BertBackbone`` with the
  architecture of BERT-small (vocabulary 30,522, 4 layers, hidden 512, 8 heads,
  feed-forward 2048: 28.8M parameters), padding as in ``benchmarks/kerashub.py``.

Usage, from the repository root::

  python -m benchmarks.kerashub_memory --model=gpt2 --seq=256 --batch=8 \
      --mem_configs=keras,dp,dp_onehot --output_json=benchmarks/results/....json

Per configuration a subprocess builds the model, records its resident size, trains
``--memory_steps`` steps after 3 warm-up steps (``benchmarks.engines.warm_up``), and reports
``VmHWM`` (the process' peak resident size, TensorFlow runtime included).
``--profile_peak=N`` instead lists the N largest groups of tensors alive at one step's
memory peak (``benchmarks/allocations.py``, TensorFlow's BFC allocator).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

import tf_autoclip as ac
from tf_autoclip.rules import kerashub as kerashub_rules
from tf_autoclip.rules.numerics import _Linear

try:
    from benchmarks import allocations
    from benchmarks.engines import ROOT, _status_kb, machine, run_steps, warm_up
except ModuleNotFoundError as e:  # `python benchmarks/kerashub_memory.py`
    raise SystemExit("Run from the repository root: python -m benchmarks.kerashub_memory") from e

import keras_hub

FLAGS = flags.FLAGS  # --memory_steps, --memory_child, --output_json: benchmarks.engines' flags
flags.DEFINE_string("model", "gpt2", "gpt2 or bert_small.")
flags.DEFINE_list(
    "mem_configs",
    ["keras", "dp", "dp_onehot"],
    "keras, dp, dp_onehot, dp_lora, dp_lowmem, dp_lora_lowmem...",
)
flags.DEFINE_integer("seq", 256, "Sequence length.")
flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_integer("layers", 2, "GPT-2 layers.")
flags.DEFINE_integer("hidden", 256, "GPT-2 hidden size (heads: hidden / 64).")
flags.DEFINE_string("norm", "mixed", "Norm method while tracing: mixed, ghost or explicit.")
flags.DEFINE_integer(
    "profile_peak", 0, "Instead of peak RSS: the N largest tensor groups alive at a step's peak."
)

GPT2_VOCAB, BERT_VOCAB = 50_257, 30_522


class OneHotTiedRule(kerashub_rules.ReversibleEmbeddingRule):
    """The tied rule before the rewrite: ``A = [onehot(ids); g]`` ([N, T+S, V]) and
    ``G = [b; h]`` as one ``_Linear`` (for this benchmark only)."""

    def _tied(self, layer, record):
        if "tied" in record.cache:
            return record.cache["tied"]
        reverse = self._reverse_rows(record)
        linear = None
        if reverse is not None:
            H, Gr = reverse
            A, G = [Gr], [H]
            lookup = self._lookup_rows(layer, record)
            if lookup is not None:
                ids, B = lookup
                A.insert(0, tf.one_hot(ids, layer.input_dim, dtype=tf.float32))
                G.insert(0, B)
            linear = _Linear(record, "tied_per_example", tf.concat(A, 1), tf.concat(G, 1))
        record.cache["tied"] = linear
        return linear

    def squared_norms(self, layer, record):
        linear = self._tied(layer, record)
        if not layer.tie_weights or linear is None:
            return super().squared_norms(layer, record)
        return [linear.sq_norm()]

    def clipped_sum(self, layer, record, factors):
        linear = self._tied(layer, record)
        if not layer.tie_weights or linear is None:
            return super().clipped_sum(layer, record, factors)
        return [linear.clipped_sum(factors[0])]


def model_and_data(config: str):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    b, seq = FLAGS.batch, FLAGS.seq
    if FLAGS.model == "gpt2":
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=GPT2_VOCAB, num_layers=FLAGS.layers, num_heads=FLAGS.hidden // 64,
            hidden_dim=FLAGS.hidden, intermediate_dim=4 * FLAGS.hidden,
            max_sequence_length=seq, dropout=0.0,
        )  # fmt: skip
        model = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
        ids = rng.integers(1, GPT2_VOCAB, size=(b, seq + 1)).astype("int32")
        x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((b, seq), "int32")}
        data = (x, ids[:, 1:], np.ones((b, seq), "float32"))
        reduction = "mean_with_sample_weight"
    elif FLAGS.model == "bert_small":
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=BERT_VOCAB, num_layers=4, num_heads=8, hidden_dim=512,
            intermediate_dim=2048, max_sequence_length=seq, dropout=0.1,
        )  # fmt: skip
        model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
        lengths = rng.integers(seq // 4, seq + 1, size=b)
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype("int32")
        ids = rng.integers(1, BERT_VOCAB, size=(b, seq)).astype("int32") * mask
        x = {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": mask}
        data = (x, rng.integers(0, 2, size=b).astype("int32"))
        reduction = "sum_over_batch_size"
    else:
        raise ValueError(f"unknown --model {FLAGS.model!r}")
    if "_lora" in config:
        backbone.enable_lora(4)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    if config.startswith("dp"):
        if config.startswith("dp_onehot"):
            ac.register_layer_rule(keras.layers.ReversibleEmbedding, OneHotTiedRule())
        model = ac.make_private(model, low_memory="lowmem" in config)
        optimizer = ac.DPAutoAdamW(learning_rate=1e-4, noise_multiplier=1.0, expected_batch_size=b)
    else:
        optimizer = keras.optimizers.AdamW(learning_rate=1e-4)
    model.compile(optimizer=optimizer, loss=loss, metrics=[])
    return model, tf.data.Dataset.from_tensors(data).repeat()


def memory_child(config: str) -> None:
    model, dataset = model_and_data(config)
    before = _status_kb("VmRSS")
    engine = ac.engines.auto_engine_name(model, None) if config.startswith("dp") else None
    warm_up(model, dataset, FLAGS.norm)
    if FLAGS.profile_peak:  # benchmarks/allocations.py: one step under the profiler
        logdir = tempfile.mkdtemp(prefix="tfac_memory_")
        tf.profiler.experimental.start(logdir)
        run_steps(model, iter(dataset), 1)
        tf.profiler.experimental.stop()
        print(json.dumps({"config": config, **allocations.live_at_peak(logdir)}))
        return
    run_steps(model, iter(dataset), FLAGS.memory_steps)
    peak = _status_kb("VmHWM")
    print(json.dumps({
        "config": config, "params": model.count_params(), "engine": engine,
        "peak_rss_mb": peak / 1024, "before_training_rss_mb": before / 1024,
    }))  # fmt: skip


def main(argv):
    del argv
    if FLAGS.memory_child:
        memory_child(FLAGS.memory_child)
        return
    started = datetime.datetime.now(datetime.UTC)
    load_before = list(os.getloadavg())
    results = []
    for config in FLAGS.mem_configs:
        args = [f"--{k}={getattr(FLAGS, k)}" for k in ("model", "seq", "batch", "layers",
                "hidden", "norm", "memory_steps", "profile_peak")]  # fmt: skip
        env = dict(os.environ)
        if FLAGS.profile_peak:
            env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"  # read when TensorFlow starts
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.kerashub_memory", f"--memory_child={config}", *args],
            capture_output=True, text=True, cwd=ROOT, env=env,
        )  # fmt: skip
        if out.returncode != 0:
            row = {"config": config, "error": out.stderr.strip().splitlines()[-1]}
        else:
            row = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(row)
        if FLAGS.profile_peak and "error" not in row:
            print(
                f"{config}: step peak {row['step_peak_mb']:.0f} MB in use "
                f"({row['in_use_at_step_start_mb']:.0f} MB at the step's start)"
            )
            allocations.print_rows(row, FLAGS.profile_peak)
            continue
        print(json.dumps(row), flush=True)
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "command": "python -m benchmarks.kerashub_memory " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "load_average_before_after": [load_before, list(os.getloadavg())],
        **{k: getattr(FLAGS, k) for k in ("model", "seq", "batch", "layers", "hidden", "norm")},
        "memory_steps": FLAGS.memory_steps,
    }
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    if FLAGS.profile_peak:
        return
    print("| config | params | peak RSS (MB) | peak − RSS before training (MB) |")
    print("|---|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['config']} | | failed: {r['error']} | |")
            continue
        print(
            f"| {r['config']} | {r['params']:,} | {r['peak_rss_mb']:.0f} "
            f"| {r['peak_rss_mb'] - r['before_training_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    app.run(main)

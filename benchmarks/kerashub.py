r"""Examples/s and peak memory of a KerasHub BERT classifier: Keras vs DP, full and LoRA.

Usage, from the repository root (the command behind docs/benchmarks.md, "KerasHub BERT"):

  python -m benchmarks.kerashub --memory \
      --output_json=benchmarks/results/kerashub.json --output_md=/tmp/kerashub.md

Model: ``keras_hub.models.BertTextClassifier`` on a random-init ``BertBackbone`` with the
architecture of the ``bert_tiny_en_uncased`` preset (vocabulary 30,522, 2 layers, hidden 128,
2 heads, feed-forward 512, dropout 0.1; 4.4M parameters), sequence ``--seq`` (64), batch
``--batch`` (32), 2 classes. Inputs: random token ids with ``padding_mask`` (lengths uniform in
[seq/4, seq]), ``segment_ids`` 0; random labels.

Configurations (``--kh_configs``):
  keras       Keras AdamW, full fine-tuning (non-DP)
  dp          ``ac.make_private(model)`` (engine "auto") + ``ac.DPAutoAdamW`` (AUTO-S,
              sigma = 1), full fine-tuning
  keras_lora  ``backbone.enable_lora(--lora_rank)``, Keras AdamW
  dp_lora     the same LoRA model made private, DPAutoAdamW
  *_xla       the same with ``compile(jit_compile=True)``
  keras_noise / keras_lora_noise   Keras AdamW plus, every step, one Gaussian draw per
              trainable parameter added to its gradient (``tf_autoclip.noise``'s one
              Philox draw): not DP (no clipping), a floor for any DP
              step, which must run Keras' forward and backward and draw that noise.

Ratios are to the Keras run of the same fine-tuning mode and to the fastest non-DP
configuration of that mode measured (with or without XLA). ``--time_noise_draw`` only times
the noise draw of the full model (``tf_autoclip.noise.standard_normals``).

Throughput and memory are measured as in ``benchmarks/engines.py`` (whose helpers and
``--windows``, ``--steps``, ``--memory``, ``--memory_steps``, ``--output_json`` and
``--output_md`` flags this module reuses): all configurations built and warmed up in one
process, then ``--windows`` timed windows of ``--steps`` train steps round-robin over them
(median examples/s, ratio to the Keras run of the same fine-tuning mode); peak RSS
(``VmHWM``) of each configuration in its own subprocess.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

import tf_autoclip as ac
from tf_autoclip import noise
from tf_autoclip.engines import bk

try:
    from benchmarks.engines import ROOT, _status_kb, machine, round_robin, run_steps, warm_up
except ModuleNotFoundError as e:  # `python benchmarks/kerashub.py`: the root is not on sys.path
    raise SystemExit(
        "Run from the repository root as a module: python -m benchmarks.kerashub ..."
    ) from e

try:
    import keras_hub
except ImportError as error:
    raise SystemExit(f"This benchmark needs keras-hub: pip install keras-hub ({error})") from None

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "kh_configs", ["keras", "dp", "keras_lora", "dp_lora"], "Configurations (module docstring)."
)
flags.DEFINE_integer("lora_rank", 4, "LoRA rank of the *_lora configurations.")
flags.DEFINE_integer("seq", 64, "Sequence length.")
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_bool(
    "time_noise_draw",
    False,
    "Only time the noise draw for every trainable parameter of the full model "
    "(as tf_autoclip.noise draws it), wall and CPU ms per draw, then exit.",
)
FLAGS.set_default("steps", 10)  # engines' flag: 0 there means "the workload's default"

VOCAB = 30_522


def model_for(config: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=128,
        intermediate_dim=512, max_sequence_length=FLAGS.seq, dropout=0.1,
    )  # fmt: skip
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    if mode(config) == "lora":
        backbone.enable_lora(FLAGS.lora_rank)
    return model


def batch() -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    b, seq = FLAGS.batch, FLAGS.seq
    lengths = rng.integers(seq // 4, seq + 1, size=b)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype("int32")
    ids = rng.integers(1, VOCAB, size=(b, seq)).astype("int32") * mask
    x = {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": mask}
    return x, rng.integers(0, 2, size=b).astype("int32")


class NoisyAdamW(keras.optimizers.AdamW):
    """AdamW on ``gradient + N(0, 1)`` per coordinate (``keras_noise``; not DP)."""

    def apply(self, grads, trainable_variables=None):
        seed = tf.stack([tf.cast(self.iterations, tf.int64), tf.constant(0, tf.int64)])
        grads = [tf.convert_to_tensor(g) for g in grads]
        draws = noise.standard_normals([g.shape for g in grads], seed)  # as DP steps draw
        return super().apply([g + z for g, z in zip(grads, draws)], trainable_variables)


def mode(config: str) -> str:
    """``"lora"`` or ``"full"``."""
    return "lora" if "_lora" in config else "full"


def compiled(config: str) -> tuple[keras.Model, tf.data.Dataset, dict]:
    """A compiled model for ``config``, its (infinite) dataset and facts about it."""
    model = model_for(config)
    info = {
        "params": model.count_params(),
        "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
    }
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if config.startswith("dp"):
        info["bk_unsupported_reason"] = bk.unsupported_reason(model, None)
        info["engine"] = ac.engines.auto_engine_name(model, None)
        model = ac.make_private(model)  # engine "auto"
        optimizer = ac.DPAutoAdamW(learning_rate=1e-4, noise_multiplier=1.0)
    elif config.endswith("_noise"):
        optimizer = NoisyAdamW(learning_rate=1e-4)
    else:
        optimizer = keras.optimizers.AdamW(learning_rate=1e-4)
    xla = config.endswith("_xla")
    model.compile(optimizer=optimizer, loss=loss, metrics=[], jit_compile=xla)
    return model, tf.data.Dataset.from_tensors(batch()).repeat(), info


def throughput(configs: list[str]) -> tuple[dict, dict, dict]:
    runs, infos = {}, {}
    for config in configs:
        model, dataset, infos[config] = compiled(config)
        warm_up(model, dataset, "mixed")
        iterator = iter(dataset)
        run_steps(model, iterator, 2)
        runs[config] = (model, iterator)
        print(f"  built {config}: {infos[config]}", flush=True)
    rates, cpu_rates = round_robin(runs, FLAGS.batch, FLAGS.steps)
    return rates, cpu_rates, infos


def memory_child(config: str) -> None:
    model, dataset, _ = compiled(config)
    before = _status_kb("VmRSS")
    warm_up(model, dataset, "mixed")
    run_steps(model, iter(dataset), FLAGS.memory_steps)
    peak = _status_kb("VmHWM")  # this process's peak RSS (see benchmarks/engines.py)
    print(json.dumps({"peak_rss_mb": peak / 1024, "before_training_rss_mb": before / 1024}))


def memory(config: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.kerashub", f"--memory_child={config}",
         f"--memory_steps={FLAGS.memory_steps}", f"--seq={FLAGS.seq}", f"--batch={FLAGS.batch}",
         f"--lora_rank={FLAGS.lora_rank}"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(results: list[dict]) -> str:
    lines = [
        "| config | trainable params | engine | examples/s | ÷ Keras (same mode) "
        "| ÷ fastest non-DP (same mode) | same, median of per-round ratios "
        "| ÷ Keras, CPU time | peak RSS (MB) | peak − RSS before training (MB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mem = ("", "")
        if "peak_rss_mb" in r:
            mem = (
                f"{r['peak_rss_mb']:.0f}",
                f"{r['peak_rss_mb'] - r['before_training_rss_mb']:.0f}",
            )
        lines.append(
            f"| {r['config']} | {r['trainable_params']:,} | {r.get('engine', '–')} "
            f"| {r['examples_per_s']:.0f} | {r['ratio_keras']:.2f} | {r['ratio_fastest']:.2f} "
            f"| {r['paired_ratio_fastest']:.2f} | {r['cpu_ratio_keras']:.2f} "
            f"| {mem[0]} | {mem[1]} |"
        )
    return "\n".join(lines) + "\n"


def time_noise_draw(repeats: int = 20) -> dict[str, float]:
    """Wall and CPU milliseconds of drawing N(0, 1) for every trainable parameter of the
    full model (``tf_autoclip.noise.standard_normals``, seeds from a step tensor)."""
    shapes = [tuple(v.shape) for v in model_for("keras").trainable_variables]

    @tf.function
    def draw(step):
        seed = tf.stack([tf.cast(step, tf.int64), tf.constant(0, tf.int64)])
        return tf.add_n([tf.reduce_sum(z) for z in noise.standard_normals(shapes, seed)])

    float(draw(tf.constant(0)))
    start, cpu_start = time.perf_counter(), time.process_time()
    for k in range(repeats):
        float(draw(tf.constant(k + 1)))  # a tensor: no retrace, no constant folding
    return {
        "parameters": int(sum(np.prod(s) for s in shapes)),
        "wall_ms": (time.perf_counter() - start) / repeats * 1e3,
        "cpu_ms": (time.process_time() - cpu_start) / repeats * 1e3,
    }


def main(argv):
    del argv
    if FLAGS.time_noise_draw:
        for _ in range(3):
            print(json.dumps(time_noise_draw()), flush=True)
        return
    if FLAGS.memory_child:
        memory_child(FLAGS.memory_child)
        return
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    configs = FLAGS.kh_configs
    rates, cpu_rates, infos = throughput(configs)
    medians = {c: statistics.median(r) for c, r in rates.items()}
    cpu_medians = {c: statistics.median(r) for c, r in cpu_rates.items()}
    results = []
    for config in configs:
        same = "keras_lora" if mode(config) == "lora" else "keras"
        # The fastest non-DP run of this mode (with or without XLA; not the noise floor).
        plain = [c for c in configs if c.startswith("keras") and "_noise" not in c]
        fastest = max((c for c in plain if mode(c) == mode(config)), key=medians.get, default=None)
        row = {
            "config": config,
            **infos[config],
            "examples_per_s": medians[config],
            "windows": rates[config],
            "ratio_keras": medians[config] / medians[same] if same in medians else float("nan"),
            "fastest_non_dp": fastest,
            "ratio_fastest": medians[config] / medians[fastest] if fastest else float("nan"),
            # Median over windows of this window's rate / the fastest's in the same round.
            "paired_ratio_fastest": (
                statistics.median(a / b for a, b in zip(rates[config], rates[fastest]))
                if fastest
                else float("nan")
            ),
            "examples_per_cpu_s": cpu_medians[config],
            "cpu_ratio_keras": (
                cpu_medians[config] / cpu_medians[same] if same in cpu_medians else float("nan")
            ),
        }
        if FLAGS.memory:
            row.update(memory(config))
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "windows"}), flush=True)
    load_after = os.getloadavg()
    table = markdown(results)
    print(table)
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "command": "python -m benchmarks.kerashub " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_hub": keras_hub.__version__,
        "model": "BertTextClassifier, bert_tiny_en_uncased architecture, random init",
        "seq": FLAGS.seq,
        "batch": FLAGS.batch,
        "lora_rank": FLAGS.lora_rank,
        "windows": FLAGS.windows,
        "steps_per_window": FLAGS.steps,
        "load_average_1min_before_after": [load_before[0], load_after[0]],
    }
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    if FLAGS.output_md:
        with open(FLAGS.output_md, "w") as f:
            f.write(table)


if __name__ == "__main__":
    app.run(main)

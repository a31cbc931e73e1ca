r"""Examples/s and peak memory: Keras non-DP vs every tf-autoclip engine, with XLA on and off.

Usage, from the repository root (the command behind docs/benchmarks.md; a module, so that
``from examples.models import ...`` finds the examples package):

  python -m benchmarks.engines --workloads=w1,w2,w3 --memory \
      --output_json=/tmp/engines.json --output_md=/tmp/engines.md

Workloads:
  w1  Tramèr & Boneh's MNIST CNN (26k parameters), batch 256.
  w2  SST-2-sized transformer: vocab 10k, sequence 64, 2 post-LN blocks, d 128, 4 heads,
      FFN 512, batch 64 (1.7M parameters).
  w3  A 10.9M-parameter transformer: vocab 30k, sequence 128, 4 blocks, d 256, FFN 1024,
      batch 32 (for peak memory).

Throughput: every configuration of a workload is built, traced and warmed up in this
process; then the timed windows (``--steps`` training steps each, the train function
called on a tf.data iterator of one cached batch, as ``fit`` does) go round-robin over
the configurations, so a change of machine load hits all of them alike. Reported: the
median examples/s over ``--windows`` windows, and its ratio to Keras non-DP with the
same ``jit_compile`` and to the faster of the two Keras runs; and the ratio of examples
per second of process CPU time (``time.process_time``), which other processes on a
shared machine disturb less than wall time.

Peak memory (``--memory``): each configuration runs in its own subprocess, which builds
the model, runs 3 warm-up and ``--memory_steps`` timed steps, and reports its peak
resident set size (``VmHWM`` of /proc/self/status: the whole process, TensorFlow
runtime included) and that peak minus the resident size just before the first step
(what training adds on top of the built model and the data).

Op profile (``--profile=N``): instead of timing, N training steps of each configuration
under ``tf.profiler``; op durations from the trace summed by op type (ms per step), the
largest ``--profile_top`` printed and all written to ``--output_json``.

DP configurations use DPAutoSGD (AUTO-S, all-layer clipping, sigma = 1, momentum 0.9);
Keras uses SGD with momentum 0.9. Data are random.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

import tf_autoclip as ac
from tf_autoclip import bk_engine, layer_rules  # noqa: F401  (registers "bk", "ghost")

try:
    from examples.models import tramer_boneh_cnn
except ModuleNotFoundError as e:  # `python benchmarks/engines.py`: the root is not on sys.path
    raise SystemExit(
        "Run from the repository root as a module: python -m benchmarks.engines ..."
    ) from e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

FLAGS = flags.FLAGS
flags.DEFINE_list("workloads", ["w1", "w2", "w3"], "Workloads: w1, w2, w3.")
flags.DEFINE_list(
    "configs",
    ["keras", "keras_xla", "vectorized", "vectorized_xla", "ghost", "ghost_xla", "bk", "bk_xla"],
    "Configurations: keras or an engine name, optionally with _xla (jit_compile=True); "
    "bk-ghost / bk-explicit force the norm method of the linear layers; bk_lowmem is bk "
    "with make_private(..., low_memory=True).",
)
flags.DEFINE_integer("windows", 5, "Timed windows per configuration (median reported).")
flags.DEFINE_integer("steps", 0, "Steps per window (0: the workload's default).")
flags.DEFINE_bool("memory", False, "Also measure peak memory, one subprocess per config.")
flags.DEFINE_integer("memory_steps", 5, "Training steps in each memory subprocess.")
flags.DEFINE_list("memory_workloads", ["w3"], "Workloads whose peak memory is measured.")
flags.DEFINE_list("skip", ["w3:vectorized", "w3:vectorized_xla"], "workload:config pairs to skip.")
flags.DEFINE_string("output_json", None, "Write the results here.")
flags.DEFINE_string("output_md", None, "Write the markdown table here.")
flags.DEFINE_string("memory_child", None, "Internal: workload:config to measure, then exit.")
flags.DEFINE_integer(
    "profile", 0,
    "Instead of timing: profile this many steps of each configuration with tf.profiler and "
    "print the ops with the largest summed durations (per step).",
)  # fmt: skip
flags.DEFINE_integer("profile_top", 25, "Ops listed per configuration with --profile.")
flags.DEFINE_bool("throughput", True, "Time the configurations (else: memory only).")
flags.DEFINE_string(
    "tfp_python", None,
    "Python of a tensorflow-privacy 0.9.0 venv (benchmarks/setup_tfp.sh makes "
    "/tmp/tfp-venv/bin/python): run benchmarks/tfp_bench.py right after, back to back.",
)  # fmt: skip


class Positions(keras.layers.Layer):
    """Position ids with a batch axis, ``[B, T]``: per-example rows for the engines."""

    def call(self, tokens):
        shape = keras.ops.shape(tokens)
        return keras.ops.broadcast_to(keras.ops.arange(shape[1]), shape)


# Row i of the positions depends on nothing but the sequence length: vouch for it, so that
# the one-pass engines (bk, ghost) serve the transformer workloads.
ac.register_per_example_layer(Positions)


def transformer(vocab, seq, dim, heads, blocks, ffn, classes) -> keras.Model:
    L = keras.layers
    tokens = keras.Input((seq,), dtype="int32")
    h = L.Embedding(vocab, dim)(tokens) + L.Embedding(seq, dim)(Positions()(tokens))
    for _ in range(blocks):
        h = L.LayerNormalization()(h + L.MultiHeadAttention(heads, dim // heads)(h, h))
        h = L.LayerNormalization()(h + L.Dense(dim)(L.Dense(ffn, activation="relu")(h)))
    h = L.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, L.Dense(classes)(h))


WORKLOADS = {
    # name: (builder, batch, input shape, input kind, classes, default steps per window)
    "w1": (tramer_boneh_cnn, 256, (28, 28, 1), "image", 10, 20),
    "w2": (lambda: transformer(10_000, 64, 128, 4, 2, 512, 2), 64, (64,), 10_000, 2, 10),
    "w3": (lambda: transformer(30_000, 128, 256, 4, 4, 1024, 2), 32, (128,), 30_000, 2, 3),
}


def batch_for(name: str):
    _, batch, shape, kind, classes, _ = WORKLOADS[name]
    rng = np.random.default_rng(0)
    if kind == "image":
        x = rng.random((batch, *shape), dtype=np.float32)
    else:
        x = rng.integers(1, kind, size=(batch, *shape)).astype("int32")
    return x, rng.integers(0, classes, size=(batch,)).astype("int32")


def compiled(name: str, config: str) -> tuple[keras.Model, tf.data.Dataset, str]:
    """A compiled model for ``config``, its (infinite) dataset and the bk norm method."""
    builder = WORKLOADS[name][0]
    keras.utils.set_random_seed(0)
    model = builder()
    jit = config.endswith("_xla")
    engine = config.removesuffix("_xla")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    method = "mixed"
    low_memory = engine == "bk_lowmem"  # make_private(..., low_memory=True)
    if low_memory:
        engine = "bk"
    if engine.startswith("bk-"):
        engine, method = "bk", engine.split("-", 1)[1]
    if engine == "keras":
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    else:
        model = ac.make_private(model, engine=engine, low_memory=low_memory)
        optimizer = ac.DPAutoSGD(learning_rate=0.05, momentum=0.9, noise_multiplier=1.0)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit)
    x, y = batch_for(name)
    return model, tf.data.Dataset.from_tensors((x, y)).repeat(), method


def warm_up(model: keras.Model, dataset: tf.data.Dataset, method: str) -> None:
    with layer_rules.norm_method(method):  # read while tracing
        model.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0)


def build(name: str, config: str) -> tuple[keras.Model, tf.data.Dataset]:
    """A compiled, warmed-up model for ``config`` and its (infinite) dataset."""
    model, dataset, method = compiled(name, config)
    warm_up(model, dataset, method)
    return model, dataset


def run_steps(model: keras.Model, iterator, steps: int) -> None:
    logs = None
    for _ in range(steps):
        logs = model.train_function(iterator)
    float(logs["loss"])  # wait for the last step


def throughput(name: str, configs: list[str]) -> dict[str, list[float]]:
    batch, steps = WORKLOADS[name][1], FLAGS.steps or WORKLOADS[name][5]
    runs = {}
    for config in configs:
        model, dataset = build(name, config)
        iterator = iter(dataset)
        run_steps(model, iterator, 2)
        runs[config] = (model, iterator)
        print(f"  built {name}/{config}: {model.count_params()} parameters", flush=True)
    return round_robin(runs, batch, steps)


def round_robin(runs: dict, batch: int, steps: int) -> tuple[dict, dict]:
    """Examples/s (wall and CPU) of each ``config -> (model, iterator)``, timed in turn
    for ``--windows`` windows of ``steps`` steps, so load changes hit every config."""
    rates: dict[str, list[float]] = {c: [] for c in runs}
    cpu_rates: dict[str, list[float]] = {c: [] for c in runs}
    for _ in range(FLAGS.windows):
        for config, (model, iterator) in runs.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            run_steps(model, iterator, steps)
            rates[config].append(batch * steps / (time.perf_counter() - start))
            cpu_rates[config].append(batch * steps / (time.process_time() - cpu_start))
        print("  window:", {c: round(r[-1]) for c, r in rates.items()}, flush=True)
    return rates, cpu_rates


def op_times(model: keras.Model, iterator, steps: int) -> dict[str, float]:
    """Summed durations (ms per step) of the TensorFlow ops of ``steps`` training steps,
    by op type, from a ``tf.profiler`` trace (host CPU; inter-op parallel ops overlap, so
    the sum can exceed the wall time)."""
    import collections
    import glob
    import tempfile

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp(prefix="tfac_profile_")
    tf.profiler.experimental.start(logdir)
    run_steps(model, iterator, steps)
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        names = {k: m.name for k, m in plane.event_metadata.items()}
        for line in plane.lines:
            if "tf_Compute" not in line.name and "tf_inter" not in line.name:
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "?")
                if ":" in name:  # "scope/op_name:OpType"
                    name = name.rsplit(":", 1)[1]
                totals[name] += event.duration_ps / 1e9 / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def profile(name: str, configs: list[str], steps: int) -> dict[str, dict[str, float]]:
    out = {}
    for config in configs:
        model, dataset = build(name, config)
        iterator = iter(dataset)
        run_steps(model, iterator, 2)
        times = op_times(model, iterator, steps)
        out[config] = times
        total = sum(times.values())
        print(f"{name}/{config}: {total:.2f} ms of ops per step (summed)", flush=True)
        for op, ms in list(times.items())[: FLAGS.profile_top]:
            print(f"    {op:40s} {ms:8.3f} ms", flush=True)
    return out


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def memory_child(spec: str) -> None:
    name, config = spec.split(":")
    model, dataset, method = compiled(name, config)
    before = _status_kb("VmRSS")
    warm_up(model, dataset, method)
    run_steps(model, iter(dataset), FLAGS.memory_steps)
    # VmHWM: this process's peak RSS. (getrusage's ru_maxrss would include the parent's
    # RSS at fork: Linux carries it over exec.)
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_rss_mb": peak / 1024, "before_training_rss_mb": before / 1024}))


def memory(name: str, config: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.engines", f"--memory_child={name}:{config}",
         f"--memory_steps={FLAGS.memory_steps}"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores (nproc), {cpu}, {platform.machine()}"


def main(argv):
    del argv
    if FLAGS.memory_child:
        memory_child(FLAGS.memory_child)
        return
    if FLAGS.profile:
        profiles = {n: profile(n, FLAGS.configs, FLAGS.profile) for n in FLAGS.workloads}
        if FLAGS.output_json:
            with open(FLAGS.output_json, "w") as f:
                json.dump(profiles, f, indent=2)
        return
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    results = []
    for name in FLAGS.workloads:
        configs = [c for c in FLAGS.configs if f"{name}:{c}" not in FLAGS.skip]
        print(f"{name}: timing {configs}", flush=True)
        if not FLAGS.throughput:
            for config in configs:
                row = {"workload": name, "config": config, **memory(name, config)}
                results.append(row)
                print(json.dumps(row), flush=True)
            continue
        rates, cpu_rates = throughput(name, configs)
        medians = {c: statistics.median(r) for c, r in rates.items()}
        cpu_medians = {c: statistics.median(r) for c, r in cpu_rates.items()}
        keras_best = max((medians[c] for c in ("keras", "keras_xla") if c in medians), default=0)
        for config in configs:
            same = "keras_xla" if config.endswith("_xla") else "keras"
            row = {
                "workload": name,
                "config": config,
                "params": WORKLOADS[name][0]().count_params() if config == configs[0] else None,
                "examples_per_s": medians[config],
                "windows": rates[config],
                "ratio_same_jit": medians[config] / medians[same] if same in medians else None,
                "ratio_best_keras": medians[config] / keras_best if keras_best else None,
                "examples_per_cpu_s": cpu_medians[config],
                "cpu_ratio_same_jit": (
                    cpu_medians[config] / cpu_medians[same] if same in cpu_medians else None
                ),
            }
            if FLAGS.memory and name in FLAGS.memory_workloads:
                row.update(memory(name, config))
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "windows"}), flush=True)
    tfp = run_tfp(FLAGS.tfp_python) if FLAGS.tfp_python else None
    load_after = os.getloadavg()
    table = markdown(results) if FLAGS.throughput else memory_markdown(results)
    if tfp is not None:
        table += "\n" + tfp_markdown(tfp["results"], results)
    print(table)
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "command": "python -m benchmarks.engines " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "load_average_1min_before_after": [load_before[0], load_after[0]],
    }
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump({"meta": meta, "results": results, "tensorflow_privacy": tfp}, f, indent=2)
    if FLAGS.output_md:
        with open(FLAGS.output_md, "w") as f:
            f.write(table)


def run_tfp(python: str) -> dict:
    """Runs benchmarks/tfp_bench.py under ``python`` (TF 2.15 + tensorflow-privacy)."""
    out = os.path.join(os.path.dirname(FLAGS.output_json or "/tmp/x"), "tfp_bench.json")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tfp_bench.py")
    print(f"tensorflow-privacy: {python} {script}", flush=True)
    command = [python, script, f"--output_json={out}", "--workloads=" + ",".join(FLAGS.workloads)]
    if FLAGS.memory:
        command.append("--memory")
    subprocess.run(command, check=True)
    with open(out) as f:
        return json.load(f)


def tfp_markdown(tfp_rows: list[dict], ours: list[dict]) -> str:
    """tensorflow-privacy's rows, with the ratio of tf-autoclip's fastest DP configuration
    (measured just before, same machine) to each."""
    best = {}
    for r in ours:
        if not r["config"].startswith("keras") and "examples_per_s" in r:
            best[r["workload"]] = max(best.get(r["workload"], 0.0), r["examples_per_s"])
    lines = [
        "| workload | config (TF 2.15, Keras 2) | examples/s | ÷ Keras 2 non-DP "
        "| tf-autoclip's fastest DP ÷ this | peak RSS (MB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in tfp_rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['config']} | failed: {r['error'][:60]} | | | |")
            continue
        ours_best = best.get(r["workload"])
        versus = "" if r["config"] == "keras" or not ours_best else (
            f"{ours_best / r['examples_per_s']:.1f}"
        )  # fmt: skip
        memory = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else ""
        lines.append(
            f"| {r['workload']} | {r['config']} | {r['examples_per_s']:.0f} "
            f"| {r['ratio_keras']:.3f} | {versus} | {memory} |"
        )
    return "\n".join(lines) + "\n"


def memory_markdown(results: list[dict]) -> str:
    lines = [
        "| workload | config | peak RSS (MB) | peak − RSS before training (MB) |",
        "|---|---|---:|---:|",
    ]
    for r in results:
        delta = r["peak_rss_mb"] - r["before_training_rss_mb"]
        lines.append(f"| {r['workload']} | {r['config']} | {r['peak_rss_mb']:.0f} | {delta:.0f} |")
    return "\n".join(lines) + "\n"


def markdown(results: list[dict]) -> str:
    has_memory = any("peak_rss_mb" in r for r in results)
    head = (
        "| workload | config | examples/s | ÷ Keras (same XLA) | ÷ best Keras "
        "| ÷ Keras, CPU time (same XLA) |"
    )
    rule = "|---|---|---:|---:|---:|---:|"
    if has_memory:
        head += " peak RSS (MB) | peak − RSS before training (MB) |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in results:
        same = "" if r["ratio_same_jit"] is None else f"{r['ratio_same_jit']:.2f}"
        best = "" if r["ratio_best_keras"] is None else f"{r['ratio_best_keras']:.2f}"
        cpu = "" if r["cpu_ratio_same_jit"] is None else f"{r['cpu_ratio_same_jit']:.2f}"
        line = (
            f"| {r['workload']} | {r['config']} | {r['examples_per_s']:.0f} | {same} | {best} "
            f"| {cpu} |"
        )
        if has_memory:
            if "peak_rss_mb" in r:
                delta = r["peak_rss_mb"] - r["before_training_rss_mb"]
                line += f" {r['peak_rss_mb']:.0f} | {delta:.0f} |"
            else:
                line += " | |"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)

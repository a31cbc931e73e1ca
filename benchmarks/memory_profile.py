r"""What is alive at a training step's memory peak: live tensors by op, Keras against DP.

  python -m benchmarks.memory_profile [--mem_workload=w3] [--mem_configs=keras,bk,bk_lowmem] \
      [--mem_batch=N] [--norm_method=mixed] [--top=25] [--rss] [--output_json=PATH]

Each configuration runs in its own process with TensorFlow's BFC allocator on the CPU
(``TF_CPU_ALLOCATOR_USE_BFC=true``), whose allocations the profiler records. After 2
warm-up steps, one training step runs under ``tf.profiler``; replaying its allocation and
deallocation events gives the bytes in use over time, the step's peak, and the tensors
alive at that peak, grouped by the op that made them (with shape). Unlike peak RSS this
names the tensors; it counts TensorFlow's allocations only (not the runtime, Python or
Eigen's thread pools), so its peaks are below ``benchmarks.engines --memory``'s.

``--rss``: instead, each configuration's peak resident set size (``VmHWM``) after 3
warm-up and 5 more steps with TensorFlow's default allocator, as ``benchmarks.engines
--memory`` measures it, at ``--mem_batch``.

``--norm_method``: how the linear layers' per-example norms are formed while tracing
(``tf_autoclip.rules.numerics.norm_method``), to compare the forms' memory.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
from absl import app, flags

from benchmarks import engines  # its flags too (--output_json)

flags.DEFINE_string("mem_workload", "w3", "Workload of benchmarks.engines: w1, w2, w3.")
flags.DEFINE_list(
    "mem_configs",
    ["keras", "bk"],
    "keras, or a DP engine: bk, ghost; bk_lowmem: bk, low_memory=True.",
)
flags.DEFINE_string("norm_method", "mixed", "mixed, ghost or explicit (DP configs).")
flags.DEFINE_bool("rss", False, "Instead: peak RSS after 3 + 5 steps (default allocator).")
flags.DEFINE_integer("mem_batch", 0, "Batch size (0: the workload's).")
flags.DEFINE_integer("top", 25, "Largest live groups printed per configuration.")
flags.DEFINE_string("mem_child", None, "Internal: run one configuration in this process.")
FLAGS = flags.FLAGS


def _events(logdir: str) -> list[tuple[int, bool, dict]]:
    """(time in ps, is allocation, stats) of every BFC allocator event, in time order."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    out = []
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        names = {k: m.name for k, m in plane.event_metadata.items()}
        stat_names = {k: m.name for k, m in plane.stat_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                kind = names.get(event.metadata_id)
                if kind not in ("MemoryAllocation", "MemoryDeallocation"):
                    continue
                stats = {}
                for s in event.stats:
                    which = s.WhichOneof("value")
                    value = getattr(s, which)
                    stats[stat_names.get(s.metadata_id)] = (
                        stat_names.get(value) if which == "ref_value" else value
                    )
                out.append((line.timestamp_ns * 1000 + event.offset_ps, kind[6] == "A", stats))
    out.sort(key=lambda e: e[0])
    return out


def peak_snapshot(events: list[tuple[int, bool, dict]]) -> tuple[int, int, dict[int, dict]]:
    """Bytes in use when the step starts, at its peak, and the allocations live then."""
    live: dict[int, dict] = {}
    peak, snapshot = -1, {}
    for _, is_alloc, stats in events:
        if is_alloc:
            live[stats["addr"]] = stats
        else:
            live.pop(stats["addr"], None)
        if stats["bytes_allocated"] > peak:
            peak, snapshot = stats["bytes_allocated"], dict(live)
    start = events[0][2]["bytes_allocated"] if events else 0
    return start, peak, snapshot


def _group(op: str) -> str:
    """An op name without the step function's prefix and per-layer numbering, so that
    e.g. the four blocks' feed-forward per-example gradients add up in one line."""
    op = op.replace("StatefulPartitionedCall/", "")
    return re.sub(r"_\d+(?=/|$)", "", op)


def child(config: str) -> dict:
    bfc = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC") == "true"
    if bfc == FLAGS.rss:
        raise RuntimeError("run by main(): the allocator is chosen before TensorFlow starts")
    import tensorflow as tf

    from tf_autoclip import layer_rules

    model, dataset = _compiled(config)
    with layer_rules.norm_method(FLAGS.norm_method):  # read while tracing
        model.fit(dataset, steps_per_epoch=3 if FLAGS.rss else 2, epochs=1, verbose=0)
    if FLAGS.rss:
        engines.run_steps(model, iter(dataset), 5)
        return {
            "config": config,
            "workload": FLAGS.mem_workload,
            "batch": int(dataset.element_spec[0].shape[0]),
            "peak_rss_mb": engines._status_kb("VmHWM") / 1024,
        }
    logdir = tempfile.mkdtemp(prefix="tfac_memory_")
    tf.profiler.experimental.start(logdir)
    engines.run_steps(model, iter(dataset), 1)
    tf.profiler.experimental.stop()
    return _live_at_peak(config, logdir)


def _compiled(config: str):
    import keras
    import tensorflow as tf

    import tf_autoclip as ac

    keras.utils.set_random_seed(0)
    model = engines.WORKLOADS[FLAGS.mem_workload][0]()
    if config == "keras":
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    else:
        engine, _, mode = config.partition("_")  # e.g. "bk_lowmem"
        model = ac.make_private(model, engine=engine, low_memory=mode == "lowmem")
        optimizer = ac.DPAutoSGD(learning_rate=0.05, momentum=0.9, noise_multiplier=1.0)
    model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x, y = engines.batch_for(FLAGS.mem_workload)
    if FLAGS.mem_batch:  # another batch size: the workload's batch cut or repeated
        x = np.resize(x, (FLAGS.mem_batch, *x.shape[1:]))
        y = np.resize(y, (FLAGS.mem_batch, *y.shape[1:]))
    return model, tf.data.Dataset.from_tensors((x, y)).repeat()


def _live_at_peak(config: str, logdir: str) -> dict:
    start, peak, snapshot = peak_snapshot(_events(logdir))
    groups: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    for stats in snapshot.values():
        key = (_group(str(stats.get("tf_op"))), str(stats.get("shape")))
        groups[key][0] += stats.get("allocation_bytes", 0)
        groups[key][1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    mb = 2.0**20
    return {
        "config": config,
        "workload": FLAGS.mem_workload,
        "norm_method": FLAGS.norm_method,
        "in_use_at_step_start_mb": start / mb,
        "step_peak_mb": peak / mb,
        "live_at_peak": [
            {"op": op, "shape": shape, "count": n, "mb": size / mb}
            for (op, shape), (size, n) in rows
        ],
    }


def main(argv):
    del argv
    if FLAGS.mem_child:
        print("RESULT " + json.dumps(child(FLAGS.mem_child)), flush=True)
        return
    results = []
    for config in FLAGS.mem_configs:
        cmd = [
            sys.executable, "-m", "benchmarks.memory_profile", f"--mem_child={config}",
            f"--mem_workload={FLAGS.mem_workload}", f"--norm_method={FLAGS.norm_method}",
            f"--mem_batch={FLAGS.mem_batch}",
        ]  # fmt: skip
        env = dict(os.environ)
        if FLAGS.rss:
            cmd.append("--rss")
            env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
        else:
            env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"  # read when TensorFlow starts
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"{config} failed:\n{out.stderr[-3000:]}")
        result = json.loads(lines[-1][len("RESULT ") :])
        results.append(result)
        if FLAGS.rss:
            print(json.dumps(result), flush=True)
            continue
        print(
            f"{FLAGS.mem_workload}/{config} (norms {FLAGS.norm_method}): step peak "
            f"{result['step_peak_mb']:.0f} MB in use "
            f"({result['in_use_at_step_start_mb']:.0f} MB at the step's start)",
            flush=True,
        )
        for row in result["live_at_peak"][: FLAGS.top]:
            print(f"  {row['mb']:8.1f} MB  {row['count']:3d} x {row['shape']:18s} {row['op']}")
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)

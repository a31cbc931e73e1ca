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

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from absl import app, flags

from benchmarks import allocations, engines  # engines: its flags too (--output_json)

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
    return {
        "config": config,
        "workload": FLAGS.mem_workload,
        "norm_method": FLAGS.norm_method,
        **allocations.live_at_peak(logdir),
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
        allocations.print_rows(result, FLAGS.top)
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)

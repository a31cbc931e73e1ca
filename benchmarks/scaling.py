r"""Scaling curves of the book-keeping engine: DP (``bk``) / Keras non-DP throughput and
peak memory against batch size, sequence length and parameter count.

Usage, from the repository root (the command behind the scaling section of
docs/benchmarks.md):

  python -m benchmarks.scaling --axes=batch,seq,params --memory_axes=params \
      --output_json=benchmarks/results/scaling.json --output_md=/tmp/scaling.md

Bounds instead of curves: ``--bound=w1,w2`` (Keras' step and the noise draw timed, the DP
step's least extra FLOPs counted) and ``--kernel_bound=w1`` (Keras' step, the noise draw
and the per-example convolution kernels timed round-robin: ``kernel_bound``).

Axes (transformers as in benchmarks/engines.py: token + position embeddings, post-LN
blocks of multi-head attention and a ReLU feed-forward layer of width 4d, mean pooling, 2
classes; random tokens and labels):
  batch   W2's model (vocabulary 10k, sequence 64, d 128, 2 blocks, 1.7M parameters) at
          batch 16, 64, 256.
  seq     W2's model at batch 32 and sequence 32, 64, 128, 256.
  params  W3-style models (vocabulary 30k, sequence 128, d and blocks growing) of about
          1M, 5M, 10M, 25M and 50M parameters, batch ``--params_batch`` (8: W3 has 32, but
          the 50M model runs seconds per step on 2 cores).

Each point builds Keras (SGD, momentum 0.9) and ``make_private(engine="bk")`` with
DPAutoSGD (sigma = 1) in one process, warms both up, then times ``--windows`` windows
round-robin over the two (``--steps`` steps each, fewer for the large models); reported:
median examples/s and the DP / Keras ratio. Peak memory (``--memory_axes``): each
(point, config) in its own subprocess, ``VmHWM`` after 2 warm-up and 2 timed steps, and
that peak minus the resident size before training. Keras is run without XLA here (on
W2 and W3 of benchmarks/engines.py Keras with and without XLA are within the noise of
each other).
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
from benchmarks import engines
from tf_autoclip import noise

ROOT = engines.ROOT
FLAGS = flags.FLAGS
flags.DEFINE_list("axes", ["batch", "seq", "params"], "Axes: batch, seq, params.")
flags.DEFINE_list("memory_axes", ["params"], "Axes whose points get peak-memory runs.")
flags.DEFINE_list(
    "bound", [],
    "Instead of the axes: for these benchmarks.engines workloads (w1, w2), time Keras' step "
    "and the noise draw (one Philox normal per parameter, tf_autoclip.noise.standard_normals) "
    "round-robin, and print the lower bound of the DP step (see LAYERS).",
)  # fmt: skip
flags.DEFINE_list(
    "kernel_bound", [],
    "Instead of the axes: for these convolutional workloads (w1), the least the DP step "
    "adds with TensorFlow's kernels: Keras' step, the noise draw and per-example "
    "convolution kernels timed round-robin (see kernel_bound).",
)  # fmt: skip
flags.DEFINE_list("params_points", ["1M", "5M", "10M", "25M", "50M"], "Points of the params axis.")
flags.DEFINE_integer("params_batch", 8, "Batch size on the params axis.")
# --windows, --steps, --output_json, --output_md and --memory_child are benchmarks.engines'
# flags (defined there, imported above); --windows defaults to 5, --steps to 0 (a default
# per point here).

# name: (vocabulary, d, blocks); sequence 128, heads d / 64 (at least 2), FFN 4d.
PARAMS = {
    "1M": (8_000, 96, 2),
    "5M": (30_000, 128, 4),
    "10M": (30_000, 256, 4),
    "25M": (30_000, 512, 4),
    "50M": (30_000, 768, 4),
}


# The parametrized layers of W1 and W2 (benchmarks/engines.py) as linear maps applied to
# T rows per example: (name, T, D, P, count, first). Keras' step does per example about
# 3 T*D*P multiply-adds per layer (forward, filter/weight gradient, input gradient; 2 for
# the first layer); W2 also 3 * 2 T^2 d for the attention scores and values per block.
LAYERS = {
    "w1": [
        ("conv1 8x8x1->16", 196, 64, 16, 1, True),
        ("conv2 4x4x16->32", 25, 256, 32, 1, False),
        ("dense 512->32", 1, 512, 32, 1, False),
        ("dense 32->10", 1, 32, 10, 1, False),
    ],
    "w2": [
        ("attention q,k,v,o 128->128", 64, 128, 128, 8, False),
        ("ffn 128->512", 64, 128, 512, 2, False),
        ("ffn 512->128", 64, 512, 128, 2, False),
        ("classifier 128->2", 1, 128, 2, 1, False),
    ],
}
EXTRA_KERAS = {"w1": 0, "w2": 3 * 2 * 2 * 64 * 64 * 128}  # W2: attention scores/values


def flop_bound(workload: str) -> dict:
    """Multiply-adds per example: Keras' step, and the least the DP step adds with the
    cheaper norm per layer. Explicit: the per-example gradient replaces Keras' weight
    gradient (same T*D*P), then its squares and the weighted sum (2*D*P); ghost: the Gram
    products (T^2*(D+P); the clipped sum replaces the weight gradient). Embeddings, layer
    norms and biases add O(T*d) per example: left out (under 0.1% here)."""
    keras_macs, extra, rows = EXTRA_KERAS[workload], 0, []
    for name, T, D, P, count, first in LAYERS[workload]:
        keras_macs += count * T * D * P * (2 if first else 3)
        explicit, ghost = 2 * D * P, T * T * (D + P)
        extra += count * min(explicit, ghost)
        rows.append((name, explicit, ghost, "explicit" if explicit <= ghost else "ghost"))
    return {"keras_macs": keras_macs, "dp_extra_macs": extra, "layers": rows}


def bound(workload: str) -> dict:
    """Keras' step time and the noise draw's, round-robin in this process."""
    model, dataset = engines.build(workload, "keras")
    iterator = iter(dataset)
    engines.run_steps(model, iterator, 2)
    shapes = [v.shape for v in model.trainable_variables]

    @tf.function
    def draw(seed):  # as tf_autoclip.noise draws it
        return tf.add_n([tf.reduce_sum(z) for z in noise.standard_normals(shapes, seed)])

    seed = tf.constant([1, 2], tf.int64)
    float(draw(seed))
    steps = engines.WORKLOADS[workload][5]
    keras_s, noise_s = [], []
    for _ in range(FLAGS.windows):
        start = time.perf_counter()
        engines.run_steps(model, iterator, steps)
        keras_s.append((time.perf_counter() - start) / steps)
        start = time.perf_counter()
        for _ in range(steps):
            value = draw(seed)
        float(value)
        noise_s.append((time.perf_counter() - start) / steps)
    flops = flop_bound(workload)
    t_keras, t_noise = statistics.median(keras_s), statistics.median(noise_s)
    t_flops = t_keras * flops["dp_extra_macs"] / flops["keras_macs"]
    return {
        "workload": workload,
        "parameters": model.count_params(),
        "keras_step_ms": 1e3 * t_keras,
        "noise_draw_ms": 1e3 * t_noise,
        "norm_and_sum_ms_at_keras_efficiency": 1e3 * t_flops,
        "best_ratio": t_keras / (t_keras + t_noise + t_flops),
        **flops,
    }


def _conv_kernels(model: keras.Model, batch: int) -> dict:
    """For each ``Conv2D`` of ``model``, at its activations' shapes (random values): the
    weight gradient Keras' step takes (one filter gradient over the batch, and the bias
    sum), and three ways to the per-example work the DP step needs instead: explicit
    per-example gradients by the grouped filter gradient (``rules.conv``'s path for few
    channels) or by patches and a batched matmul (its other path), or ghost norms'
    float32 Gram products of the patches and output gradients (the library's are float64,
    so this is the cheapest form). Returns ``{(form, layer name): tf.function}`` (each
    returns its tensors)."""
    from tf_autoclip.rules.base import Record
    from tf_autoclip.rules.conv import ConvRule

    rule, rng = ConvRule(), np.random.default_rng(0)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    records = []
    for layer in convs:
        record = Record(layer, rule, lambda t: None)
        shapes = (layer.input.shape[1:], layer.output.shape[1:])
        a, g = (tf.constant(rng.standard_normal((batch, *s)), tf.float32) for s in shapes)
        record.save(inputs=a, padding=layer.padding)
        record.grads["outputs"] = g
        records.append(record)

    def one(fn, record):
        def run():
            record.cache.clear()  # no work carried over between traces
            return fn(record.layer, record)

        return tf.function(run)

    def keras_weight_gradient(layer, record):
        a, g = record.saved["inputs"], record.grads["outputs"]
        kernel = tf.raw_ops.Conv2DBackpropFilter(
            input=a, filter_sizes=layer.kernel.shape, out_backprop=g,
            strides=[1, *layer.strides, 1], padding=layer.padding.upper(),
        )  # fmt: skip
        return kernel, tf.reduce_sum(g, [0, 1, 2])

    def grouped(layer, record):
        return rule._grouped_per_example(layer, record), rule._bias_per_example(layer, record)

    def patches(layer, record):
        return rule.per_example_gradients(layer, record)

    def ghost_f32(layer, record):
        A, G = (t[:, :, 0] for t in rule._parts(layer, record))
        aa, gg = tf.matmul(A, A, transpose_b=True), tf.matmul(G, G, transpose_b=True)
        return tf.reduce_sum(aa * gg, [1, 2]), rule._bias_per_example(layer, record)

    forms = {
        "keras_weight_gradient": keras_weight_gradient,
        "per_example_grouped": grouped,
        "per_example_patches": patches,
        "ghost_f32": ghost_f32,
    }
    return {
        (name, record.layer.name): one(fn, record)
        for record in records
        for name, fn in forms.items()
    }


def kernel_bound(workload: str) -> dict:
    """The least the DP step adds to Keras' with TensorFlow's own kernels, for a
    convolutional workload: timed round-robin in this process, Keras' step, the noise
    draw, and per convolution the forms of ``_conv_kernels``. Per layer the DP step must
    at least replace Keras' weight gradient by explicit per-example gradients (the faster
    form) or add ghost products (the clipped sum then takes Keras' weight gradient), so

        best ratio = Keras / (Keras + noise + sum over layers of min(explicit - Keras'
                     weight gradient, ghost)),

    each form timed per layer. Norms' squares, clip factors and the weighted sums are
    left out: the true least is larger, the best ratio smaller."""
    model, dataset = engines.build(workload, "keras")
    iterator = iter(dataset)
    engines.run_steps(model, iterator, 2)
    batch = engines.WORKLOADS[workload][1]
    kernels = _conv_kernels(model, batch)
    layers = list(dict.fromkeys(layer for _, layer in kernels))
    shapes = [v.shape for v in model.trainable_variables]

    @tf.function
    def draw(seed):  # as tf_autoclip.noise draws it
        return tf.add_n([tf.reduce_sum(z) for z in noise.standard_normals(shapes, seed)])

    seed = tf.constant([1, 2], tf.int64)
    for fn in kernels.values():
        fn()
    float(draw(seed))
    steps = engines.WORKLOADS[workload][5]
    times: dict = {name: [] for name in ["keras_step", "noise", *kernels]}

    def timed(name, run):
        start = time.perf_counter()
        for _ in range(steps):
            out = run()
        tf.nest.map_structure(lambda t: t.numpy(), out)  # wait for the last call
        times[name].append((time.perf_counter() - start) / steps)

    for _ in range(FLAGS.windows):
        timed("keras_step", lambda: model.train_function(iterator)["loss"])
        timed("noise", lambda: draw(seed))
        for name, fn in kernels.items():
            timed(name, fn)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    per_layer = {}
    for layer in layers:
        explicit = min(ms["per_example_grouped", layer], ms["per_example_patches", layer])
        extra = min(explicit - ms["keras_weight_gradient", layer], ms["ghost_f32", layer])
        per_layer[layer] = {
            **{form: ms[form, name] for form, name in kernels if name == layer},
            "least_extra": extra,
        }
    extra = sum(row["least_extra"] for row in per_layer.values())
    return {
        "workload": workload,
        "median_ms": {"keras_step": ms["keras_step"], "noise": ms["noise"], **per_layer},
        "least_extra_ms": extra + ms["noise"],
        "best_ratio": ms["keras_step"] / (ms["keras_step"] + ms["noise"] + extra),
    }


def points(axis: str) -> list[dict]:
    """The model and batch of every point of ``axis``."""
    w2 = {"vocab": 10_000, "seq": 64, "dim": 128, "blocks": 2}
    if axis == "batch":
        return [{"axis": axis, **w2, "batch": b} for b in (16, 64, 256)]
    if axis == "seq":
        return [{"axis": axis, **w2, "seq": s, "batch": 32} for s in (32, 64, 128, 256)]
    if axis == "params":
        out = []
        for name in FLAGS.params_points:
            vocab, dim, blocks = PARAMS[name]
            out.append(
                {"axis": axis, "name": name, "vocab": vocab, "seq": 128, "dim": dim,
                 "blocks": blocks, "batch": FLAGS.params_batch}
            )  # fmt: skip
        return out
    raise ValueError(f"unknown axis {axis!r}")


def build_model(point: dict) -> keras.Model:
    dim = point["dim"]
    heads = max(2, dim // 64)
    return engines.transformer(
        point["vocab"], point["seq"], dim, heads, point["blocks"], 4 * dim, 2
    )


def compiled(point: dict, config: str) -> tuple[keras.Model, tf.data.Dataset]:
    keras.utils.set_random_seed(0)
    model = build_model(point)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if config == "keras":
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    else:
        model = ac.make_private(model, engine="bk")
        optimizer = ac.DPAutoSGD(learning_rate=0.05, momentum=0.9, noise_multiplier=1.0)
    model.compile(optimizer=optimizer, loss=loss)
    rng = np.random.default_rng(0)
    x = rng.integers(1, point["vocab"], size=(point["batch"], point["seq"])).astype("int32")
    y = rng.integers(0, 2, size=(point["batch"],)).astype("int32")
    return model, tf.data.Dataset.from_tensors((x, y)).repeat()


def default_steps(point: dict, params: int) -> int:
    tokens = point["batch"] * point["seq"]
    work = params * tokens  # ~ the step's cost
    return max(1, min(10, int(2e10 / max(work, 1))))


def throughput(point: dict) -> dict:
    runs = {}
    for config in ("keras", "dp"):
        model, dataset = compiled(point, config)
        iterator = iter(dataset)
        model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0)
        engines.run_steps(model, iterator, 2)
        runs[config] = (model, iterator)
    params = runs["keras"][0].count_params()
    steps = FLAGS.steps or default_steps(point, params)
    rates: dict[str, list[float]] = {c: [] for c in runs}
    for _ in range(FLAGS.windows):
        for config, (model, iterator) in runs.items():
            start = time.perf_counter()
            engines.run_steps(model, iterator, steps)
            rates[config].append(point["batch"] * steps / (time.perf_counter() - start))
    medians = {c: statistics.median(r) for c, r in rates.items()}
    return {
        "params": params,
        "steps_per_window": steps,
        "keras_examples_per_s": medians["keras"],
        "dp_examples_per_s": medians["dp"],
        "ratio": medians["dp"] / medians["keras"],
        "windows": rates,
    }


def memory_child(spec: str) -> None:
    request = json.loads(spec)
    model, dataset = compiled(request["point"], request["config"])
    before = engines._status_kb("VmRSS")
    model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0)
    engines.run_steps(model, iter(dataset), 2)
    peak = engines._status_kb("VmHWM")
    print(json.dumps({"peak_rss_mb": peak / 1024, "before_training_rss_mb": before / 1024}))


def memory(point: dict, config: str) -> dict:
    spec = json.dumps({"point": point, "config": config})
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.scaling", f"--memory_child={spec}"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict]) -> str:
    lines = [
        "| axis | point | parameters | batch | sequence | Keras ex/s | DP (bk) ex/s | DP ÷ Keras "
        "| peak RSS Keras / DP (MB) | DP ÷ Keras, peak RSS | added by training Keras / DP (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        point = r["point"]
        label = point.get("name") or (
            f"batch {point['batch']}" if point["axis"] == "batch" else f"seq {point['seq']}"
        )
        mem = ["", "", ""]
        if "memory" in r:
            k, d = r["memory"]["keras"], r["memory"]["dp"]
            mem = [
                f"{k['peak_rss_mb']:.0f} / {d['peak_rss_mb']:.0f}",
                f"{d['peak_rss_mb'] / k['peak_rss_mb']:.2f}",
                f"{k['peak_rss_mb'] - k['before_training_rss_mb']:.0f} / "
                f"{d['peak_rss_mb'] - d['before_training_rss_mb']:.0f}",
            ]
        lines.append(
            f"| {point['axis']} | {label} | {r['params']:,} | {point['batch']} | {point['seq']} "
            f"| {r['keras_examples_per_s']:.0f} | {r['dp_examples_per_s']:.0f} "
            f"| {r['ratio']:.2f} | {' | '.join(mem)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if FLAGS.memory_child:
        memory_child(FLAGS.memory_child)
        return
    if FLAGS.bound or FLAGS.kernel_bound:
        load_before = os.getloadavg()
        results = [bound(w) for w in FLAGS.bound] + [kernel_bound(w) for w in FLAGS.kernel_bound]
        for result in results:
            print(json.dumps(result), flush=True)
        print("load average (1 min) before / after:", load_before[0], os.getloadavg()[0])
        if FLAGS.output_json:
            with open(FLAGS.output_json, "w") as f:
                json.dump({"load_before": load_before, "results": results}, f, indent=1)
        return
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    rows = []
    for axis in FLAGS.axes:
        for point in points(axis):
            row = {"point": point, **throughput(point)}
            if axis in FLAGS.memory_axes:
                row["memory"] = {c: memory(point, c) for c in ("keras", "dp")}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "windows"}), flush=True)
            if FLAGS.output_json:  # after every point: a slow point does not lose the rest
                write_json(rows, started, load_before)
    table = markdown(rows)
    print(table)
    if FLAGS.output_json:
        write_json(rows, started, load_before)
    if FLAGS.output_md:
        with open(FLAGS.output_md, "w") as f:
            f.write(table)


def write_json(rows, started, load_before) -> None:
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "command": "python -m benchmarks.scaling " + " ".join(sys.argv[1:]),
        "machine": engines.machine(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "load_average_1min_before_now": [load_before[0], os.getloadavg()[0]],
    }
    with open(FLAGS.output_json, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)

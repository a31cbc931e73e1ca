r"""Sweep: Abadi clipping needs (R, lr) tuned jointly; automatic clipping needs lr alone.

Trains the Tramèr & Boneh CNN on an MNIST subset with short runs, each one
``mnist_cnn.py``'s private ``train_and_evaluate`` (``ac.make_private``, the
``ac.DPAuto<Optimizer>``, ...) with its own clipping, threshold, optimizer and lr:

* Abadi clipping + SGD (momentum 0.9) on a grid of thresholds R x learning rates eta;
* Abadi clipping + Adam on the same R x a grid of Adam learning rates;
* automatic clipping (``--clipping`` auto-s or auto-v, default auto-s) + SGD and + Adam
  over the learning rate alone,

and draws the test accuracies as heat maps (``--output_png``). What it shows (Bu et
al. 2023, arXiv 2206.07136): for SGD, when R is small enough that every example is clipped,
Abadi's update depends on eta * R only, so the good runs lie along the diagonal
``eta * R = const``; Adam is invariant to the gradient's scale, so with Adam the
accuracy depends on lr and not on R; automatic clipping has no R at all and matches the
best Abadi runs at lr = eta * R (SGD) or the same lr (Adam).

All runs share sigma (calibrated from ``--target_epsilon`` for one run) and the data
subset. Each run alone is (epsilon, delta)-DP; the sweep as a whole is hyperparameter
tuning on the same data and is not covered by that guarantee.

Defaults: 10,000 training and 2,000 test examples, batch 256, 2 epochs (78 steps),
4 R x 5 eta (SGD) + 4 R x 3 lr (Adam) + 5 + 3 automatic runs = 40 runs, which took
11.5 minutes on 2 CPU cores shared with other jobs (7 s to 18 s per run). A smaller
grid, e.g. ``--l2_norm_clips=0.1,1 --sgd_learning_rates=0.05,0.5
--adam_learning_rates=0.001 --auto_sgd_learning_rates=0.05`` (8 runs), took 3 minutes.
Measured heat map: docs/results.md.

Example:
  python examples/clipping_sweep.py --data_dir=DATA \
      --output_png=/tmp/sweep.png --output_json=/tmp/sweep.json
"""

from __future__ import annotations

import dataclasses
import os
import time

import keras
import numpy as np
from absl import app, flags

if __package__:  # imported as examples.clipping_sweep (tests, python -m)
    from examples import common, mnist_cnn
else:  # python examples/clipping_sweep.py: this script's folder is on sys.path
    import common
    import mnist_cnn

flags.DEFINE_list("l2_norm_clips", ["0.01", "0.1", "1", "10"], "Abadi thresholds R.")
flags.DEFINE_list(
    "sgd_learning_rates", ["0.005", "0.05", "0.5", "5", "50"], "SGD learning rates eta (Abadi)."
)
flags.DEFINE_list("adam_learning_rates", ["0.0001", "0.001", "0.01"], "Adam learning rates.")
flags.DEFINE_list(
    "auto_sgd_learning_rates", ["0.0005", "0.005", "0.05", "0.5", "5"],
    "SGD learning rates of automatic clipping (comparable to eta * R of Abadi).",
)  # fmt: skip
flags.DEFINE_string("output_png", "clipping_sweep.png", "Where to write the heat maps.")

flags.adopt_module_key_flags(common)  # the common flags show in --help
FLAGS = flags.FLAGS
DEFAULTS = {
    "batch_size": 256,
    "epochs": 2,
    "max_train_examples": 10_000,
    "max_test_examples": 2_000,
    "momentum": 0.9,  # for the SGD runs (Tramèr & Boneh)
}
SCRIPT_FLAGS = (
    "l2_norm_clips", "sgd_learning_rates", "adam_learning_rates", "auto_sgd_learning_rates",
    "output_png",
)  # fmt: skip


def _floats(values: list[str]) -> list[float]:
    return [float(v) for v in values]


def plan_runs(config: common.Config) -> list[common.Config]:
    """One Config per run: Abadi x {SGD, Adam} over (R, lr), automatic x {SGD, Adam} over lr."""
    auto = config.clipping if config.clipping in ("auto-s", "auto-v") else "auto-s"
    base = dataclasses.replace(config, output_json=None)
    runs = []
    grids = (
        ("sgd", _floats(FLAGS.sgd_learning_rates), _floats(FLAGS.auto_sgd_learning_rates)),
        ("adam", _floats(FLAGS.adam_learning_rates), _floats(FLAGS.adam_learning_rates)),
    )
    for optimizer, abadi_lrs, auto_lrs in grids:
        momentum = config.momentum if optimizer == "sgd" else None
        for r in _floats(FLAGS.l2_norm_clips):
            for lr in abadi_lrs:
                runs.append(
                    dataclasses.replace(
                        base, clipping="abadi", l2_norm_clip=r, optimizer=optimizer,
                        learning_rate=lr, momentum=momentum,
                    )
                )  # fmt: skip
        for lr in auto_lrs:
            runs.append(
                dataclasses.replace(
                    base, clipping=auto, l2_norm_clip=None, optimizer=optimizer,
                    learning_rate=lr, momentum=momentum,
                )
            )  # fmt: skip
    return runs


def plot(runs: list[dict], path: str, title: str) -> None:
    """2 x 2 panels: Abadi + SGD / Adam over (R, lr); automatic + SGD / Adam over lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def grid(clipping: str, optimizer: str):
        chosen = [r for r in runs if r["optimizer"] == optimizer and (r["clipping"] == "abadi")
                  == (clipping == "abadi")]  # fmt: skip
        lrs = sorted({r["learning_rate"] for r in chosen})
        clips = sorted({r["l2_norm_clip"] for r in chosen}, key=lambda c: -1 if c is None else c)
        acc = np.full((len(lrs), len(clips)), np.nan)
        for r in chosen:
            acc[lrs.index(r["learning_rate"]), clips.index(r["l2_norm_clip"])] = r["test_accuracy"]
        return lrs, clips, acc

    fig = plt.figure(figsize=(11, 9.5), constrained_layout=True)
    spec = fig.add_gridspec(2, 2, height_ratios=[3, 1.2])
    panels = [
        (spec[0, 0], "abadi", "sgd", "Abadi clipping + SGD: accuracy follows lr·R"),
        (spec[0, 1], "abadi", "adam", "Abadi clipping + Adam: accuracy independent of R"),
        (spec[1, 0], "auto", "sgd", "Automatic clipping + SGD: no R"),
        (spec[1, 1], "auto", "adam", "Automatic clipping + Adam: no R"),
    ]
    image = None
    for cell, clipping, optimizer, panel_title in panels:
        lrs, clips, acc = grid(clipping, optimizer)
        if not lrs:
            continue
        ax = fig.add_subplot(cell)
        lr_name = "learning rate η" if optimizer == "sgd" else "learning rate"
        if clipping == "auto":  # one row: lr along x
            xlabel = "learning rate (compare η·R)" if optimizer == "sgd" else lr_name
            acc, xs, ys, ylabel = acc.T, lrs, [""], ""
        else:
            xs, ys, xlabel, ylabel = clips, lrs, "clipping threshold R", lr_name
        image = ax.imshow(acc, origin="lower", cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        ax.set_yticks(range(len(ys)), [f"{y:g}" if y != "" else "" for y in ys])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title, fontsize=10)
        for (i, j), value in np.ndenumerate(acc):
            if np.isfinite(value):
                color = "black" if value > 0.6 else "white"
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", color=color)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.6, label="test accuracy")
    fig.suptitle(title, fontsize=11)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.non_private:
        raise app.UsageError("The sweep compares clipping rules: --non_private has no meaning.")
    start = time.time()
    config = common.resolve_config(DEFAULTS, script_flags=SCRIPT_FLAGS)
    data = common.load_images("mnist", config)
    plans = plan_runs(config)
    runs, last = [], None
    for i, run_config in enumerate(plans):
        keras.backend.clear_session()
        last = mnist_cnn.train_and_evaluate(data, run_config, verbose=0)  # the DP training
        row = {
            "clipping": run_config.clipping,
            "optimizer": run_config.optimizer,
            "l2_norm_clip": run_config.l2_norm_clip,
            "learning_rate": run_config.learning_rate,
            "test_accuracy": last["test_accuracy"],
            "seconds": last["seconds"],
        }
        runs.append(row)
        settings = " ".join(f"{k}={v}" for k, v in row.items())
        print(f"[{i + 1}/{len(plans)}] {settings}", flush=True)
    best = {}
    for row in runs:
        key = f"{'abadi' if row['clipping'] == 'abadi' else row['clipping']}+{row['optimizer']}"
        if key not in best or row["test_accuracy"] > best[key]["test_accuracy"]:
            best[key] = row
    title = (
        f"MNIST, {last['num_train_examples']} train / {last['num_test_examples']} test "
        f"examples, {config.epochs} epoch(s), batch {config.batch_size}, "
        f"ε = {float(last['epsilon']):.3g}, δ = {config.delta:g} per run (σ = "
        f"{last['noise_multiplier']:.3g}, {last['steps']} steps)"
    )
    for key, row in best.items():
        print(f"best {key}: test_accuracy={row['test_accuracy']:.4f} "
              f"R={row['l2_norm_clip']} lr={row['learning_rate']:g}")  # fmt: skip
    plot(runs, FLAGS.output_png, title)
    print(f"Wrote {FLAGS.output_png}")
    record = {
        **{k: last[k] for k in ("epsilon", "delta", "noise_multiplier", "steps")},
        "test_accuracy": max(r["test_accuracy"] for r in runs),
        "epsilon_proven": last["epsilon_proven"],
        "best": best,
        "runs": runs,
        "output_png": FLAGS.output_png,
        "privacy_statement": last["privacy_statement"],
    }
    common.finish(
        record, config, start,
        notes=(f"Each of the {len(runs)} runs has this guarantee on its own; the sweep as a "
               "whole (hyperparameter tuning on the same data) is not covered.",),
    )  # fmt: skip
    return record


if __name__ == "__main__":
    common.run(main)

r"""Runs the MNIST / Fashion-MNIST comparison of the paper and renders its tables from JSON.

The comparison (Bu et al. 2023, Table 2; Tramèr & Boneh 2021 for Abadi's setting) at
ε = 3, δ = 1e-5 with the Tramèr & Boneh CNN of ``mnist_cnn.py``, 40 epochs, DP-SGD with
momentum 0.9, the same σ for every method of a data set:

* ``abadi``: Tramèr & Boneh's tuned setting (MNIST lr 0.5, R = 0.1, batch 512;
  Fashion-MNIST lr 4, R = 0.1, batch 2048);
* ``auto-v`` and ``auto-s`` (γ = 0.01): no threshold; lr = lr·R of the Abadi setting, the
  equivalent learning rate by the paper's theorem (``mnist_cnn.py``'s docstring).

Each (data set, method, seed) is one ``mnist_cnn.py`` run in its own process writing
``--runs_dir/<dataset>_<method>_seed<k>.json``; runs whose JSON already exists are skipped,
so the script can be stopped and resumed. Then the tables (mean ± sample std over seeds,
every run listed) are written between the ``<!-- paper_results:begin -->`` and
``<!-- paper_results:end -->`` markers of ``--markdown``. ``--norun`` only re-renders.

Any other flag of ``mnist_cnn.py`` given here (``--data_dir``, ``--learning_rate``,
``--epochs``, ``--jit_compile``, ...) is passed on to every run; a setting other than
``--data_dir`` is a different configuration, so it goes into the file names
(``mnist_auto-s_learning_rate0.1_seed0.json``) and gets its own row in the tables.

Example:
  python examples/paper_results.py --data_dir=../shared/data --seeds=0,1,2
"""

from __future__ import annotations

import glob
import json
import os
import platform
import statistics
import subprocess
import sys

from absl import app, flags

if __package__:  # imported as examples.paper_results (tests, python -m)
    from examples import common, mnist_cnn
else:  # python examples/paper_results.py: this script's folder is on sys.path
    import common
    import mnist_cnn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
METHODS = ("abadi", "auto-v", "auto-s")
DATASETS = ("mnist", "fashion_mnist")
BEGIN, END = "<!-- paper_results:begin -->", "<!-- paper_results:end -->"
# Published reference points (test accuracy, %, ε = 3): Tramèr & Boneh 2021, Table 8/9.
TRAMER_BONEH = {"mnist": 98.1, "fashion_mnist": 86.0}

flags.DEFINE_list("datasets", list(DATASETS), "Data sets to run.")
flags.DEFINE_list("methods", list(METHODS), "Clipping methods to run.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; one run per (data set, method, seed).")
flags.DEFINE_string("runs_dir", os.path.join(ROOT, "docs", "results"), "JSON files of the runs.")
flags.DEFINE_string("markdown", os.path.join(ROOT, "docs", "results.md"), "File to update.")
flags.DEFINE_bool("run", True, "Run missing configurations (else only render the tables).")
flags.adopt_module_key_flags(common)  # mnist_cnn.py's flags show in --help
FLAGS = flags.FLAGS
# Set per run by this script; every other mnist_cnn.py flag given here is passed on.
OWN = ("dataset", "clipping", "seed", "output_json")
# Passed on without changing what is measured, so not part of a run's file name.
NEUTRAL = ("data_dir",)


def passed_on() -> list[tuple[str, str]]:
    """(name, value) of the mnist_cnn.py flags given on this command line."""
    given = []
    for module in (common, mnist_cnn):
        for flag in FLAGS.get_key_flags_for_module(module):
            if flag.present and flag.name not in OWN:
                given.append((flag.name, flag.serialize()))
    return sorted(set(given))


def run_path(runs_dir: str, dataset: str, method: str, seed: str, variant: str = "") -> str:
    return os.path.join(runs_dir, f"{dataset}_{method}{variant}_seed{seed}.json")


def variant_suffix(given: list[tuple[str, str]]) -> str:
    """``_learning_rate0.1`` for ``--learning_rate=0.1``: a setting other than the default."""
    parts = []
    for name, serialized in given:  # "--name=value", or "--name" / "--noname" for a bool
        if name not in NEUTRAL:
            flag, _, value = serialized.lstrip("-").partition("=")
            parts.append(f"_{flag}{value}")
    return "".join(parts)


def run_missing() -> None:
    """Runs every configuration whose JSON is missing, one process at a time."""
    given = passed_on()
    variant = variant_suffix(given)
    for dataset in FLAGS.datasets:
        for seed in FLAGS.seeds:
            for method in FLAGS.methods:
                path = run_path(FLAGS.runs_dir, dataset, method, seed, variant)
                if os.path.exists(path):
                    continue
                command = [
                    sys.executable, os.path.join(HERE, "mnist_cnn.py"), f"--dataset={dataset}",
                    f"--clipping={method}", f"--seed={seed}", f"--output_json={path}",
                    *(serialized for _, serialized in given),
                ]  # fmt: skip
                print("Running:", " ".join(command), flush=True)
                subprocess.run(command, check=True)


def load_runs(runs_dir: str) -> list[dict]:
    runs = []
    for path in sorted(glob.glob(os.path.join(runs_dir, "*_seed*.json"))):
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        record["file"] = os.path.relpath(path, ROOT)
        runs.append(record)
    return runs


def _setting(record: dict) -> tuple:
    """What distinguishes one configuration from another (the seed does not)."""
    f = record["flags"]
    return (f["clipping"], f["learning_rate"], f["l2_norm_clip"], f["gamma"], f["batch_size"])


def _order(setting: tuple) -> tuple:
    return (METHODS.index(setting[0]), setting[1])


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _minutes(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s"


def render(runs: list[dict]) -> str:
    """The summary table per data set and one row per run; every run in ``runs`` shows."""
    lines = []
    for dataset in DATASETS:
        mine = [r for r in runs if r["flags"]["dataset"] == dataset]
        if not mine:
            continue
        f0 = mine[0]["flags"]
        lines += [
            f"### {'MNIST' if dataset == 'mnist' else 'Fashion-MNIST'}",
            "",
            f"ε = 3, δ = {f0['delta']:g}, expected batch {f0['batch_size']}, {f0['epochs']} "
            f"epochs ({mine[0]['steps']} Poisson steps), SGD momentum {f0['momentum']}, "
            f"σ = {mine[0]['noise_multiplier']:.4f}. Tramèr & Boneh report "
            f"{TRAMER_BONEH[dataset]}% for Abadi clipping at ε = 3.",
            "",
            "| method | lr | R | runs | test accuracy % (mean ± std) | ε | wall time per run |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for key in sorted({_setting(r) for r in mine}, key=_order):
            group = [r for r in mine if _setting(r) == key]
            f = group[0]["flags"]
            method = f["clipping"]
            accuracies = [100 * r["test_accuracy"] for r in group]
            seconds = [r["seconds"] for r in group]
            r_text = f["l2_norm_clip"] if method == "abadi" else "none"
            lines.append(
                f"| {method} | {f['learning_rate']:g} | {r_text} | {len(group)} | "
                f"**{_mean_std(accuracies)}** | {max(float(r['epsilon']) for r in group):.3f} | "
                f"{_minutes(statistics.mean(seconds))} (mean; "
                f"{_minutes(min(seconds))} to {_minutes(max(seconds))}) |"
            )
        lines += ["", "Every run:", "", "| method | lr | seed | test accuracy % | seconds | JSON |"]
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for r in sorted(mine, key=lambda r: (_order(_setting(r)), r["flags"]["seed"])):
            lines.append(
                f"| {r['flags']['clipping']} | {r['flags']['learning_rate']:g} | "
                f"{r['flags']['seed']} | "
                f"{100 * r['test_accuracy']:.2f} | {r['seconds']:.0f} | `{r['file']}` |"
            )
        lines.append("")
    return "\n".join(lines)


def update_markdown(path: str, table: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise app.UsageError(f"{path} needs the markers {BEGIN} and {END}.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    generated = (
        f"{BEGIN}\n<!-- generated by `python examples/paper_results.py --norun`; "
        f"do not edit by hand -->\n\n{table}\n{END}"
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + generated + tail)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for name in OWN:
        if FLAGS[name].present:
            raise app.UsageError(f"--{name} is set per run; use --datasets, --methods, --seeds.")
    if FLAGS.run:
        print(f"Machine: {platform.platform()}, {os.cpu_count()} CPUs", flush=True)
        run_missing()
    runs = load_runs(FLAGS.runs_dir)
    if not runs:
        raise app.UsageError(f"No run JSON in {FLAGS.runs_dir}; run without --norun first.")
    table = render(runs)
    update_markdown(FLAGS.markdown, table)
    print(table)
    print(f"Updated {FLAGS.markdown}")


if __name__ == "__main__":
    app.run(main)

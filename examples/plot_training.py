r"""Plot accuracy and epsilon over the epochs of a run of ``mnist_cnn.py`` (or sst2_transformer.py).

Reads ``--history_json``: either the ``--output_json`` file of a run (its ``history``
entry is used) or a bare history (``{"epoch": [...], "accuracy": [...],
"val_accuracy": [...], "epsilon": [...]}``, as Keras' ``History.history`` plus
``epoch``). Writes a PNG with training and test accuracy on the left axis and epsilon
(``PrivacyCallback``) on the right axis; a non-private run has no epsilon curve.

Note: the training accuracy is measured on the (Poisson-sampled) training batches while
training, without noise: it is not covered by the DP guarantee; the test accuracy is.

Example:
  python examples/mnist_cnn.py --data_dir=DATA --output_json=/tmp/mnist.json
  python examples/plot_training.py --history_json=/tmp/mnist.json --output_png=/tmp/mnist.png
"""

from __future__ import annotations

import json
import os

from absl import app, flags

flags.DEFINE_string("history_json", None, "Output JSON of a run, or a bare history JSON.")
flags.DEFINE_string("output_png", None, "PNG to write (default: next to --history_json).")
flags.mark_flag_as_required("history_json")

FLAGS = flags.FLAGS


def load_history(path: str) -> tuple[dict, dict]:
    """(history, run record) from a run's output JSON or a bare history JSON."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    history = data.get("history", data)
    if "epoch" not in history:
        lengths = {len(v) for v in history.values() if isinstance(v, list)}
        if not lengths:
            raise ValueError(f"{path} holds no per-epoch history.")
        history = {**history, "epoch": list(range(1, max(lengths) + 1))}
    return history, data if "history" in data else {}


def plot(history: dict, record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = history["epoch"]
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    curves = (
        ("accuracy", "train accuracy (not private)", "--"),
        ("val_accuracy", "test accuracy", "-"),
    )
    for key, label, style in curves:
        if key in history:
            ax.plot(epochs, history[key], style, marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if "epsilon" in history:
        eps_ax = ax.twinx()
        eps = [float(e) for e in history["epsilon"]]
        (line,) = eps_ax.plot(epochs, eps, color="tab:red", marker="s", markersize=3)
        delta = record.get("delta")
        eps_ax.set_ylabel("ε" + (f" (δ = {delta:g})" if delta else ""), color="tab:red")
        eps_ax.set_ylim(bottom=0)
        handles.append(line)
        labels.append("ε")
    ax.legend(handles, labels, loc="lower right")
    flags_ = record.get("flags", {})
    parts = [record.get("dataset", ""), flags_.get("clipping", ""), flags_.get("optimizer", "")]
    if flags_.get("non_private"):
        parts.append("non-private")
    if "test_accuracy" in record:
        parts.append(f"final test accuracy {100 * record['test_accuracy']:.2f}%")
    ax.set_title(", ".join(p for p in parts if p) or "training history", fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    history, record = load_history(FLAGS.history_json)
    path = FLAGS.output_png or os.path.splitext(FLAGS.history_json)[0] + ".png"
    plot(history, record, path)
    print(f"Wrote {path}")


if __name__ == "__main__":
    app.run(main)

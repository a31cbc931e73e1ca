r"""BandMF next to DP-SGD: the MNIST CNN trained twice at the same (ε, δ).

Both runs are ``examples/mnist_cnn.py``'s training (automatic clipping, momentum SGD,
Poisson sampling) with the same flags; they differ only in the noise:

- DP-SGD: independent noise every step (``correlated_noise=None``);
- BandMF with ``--num_bands`` b (``tf_autoclip.BandMF(b)``): noise correlated across steps
  (``tf_autoclip.correlated_noise``), on batches of ``poisson_sample(...,
  min_separation=b)``. Its σ is calibrated for the same target ε with the amplified-BandMF
  accounting, so it is larger than DP-SGD's; the noise that reaches the model's sum of
  updates is smaller.

Prints BandMF's privacy statement, each run's test accuracy, σ and ε, and writes both
records to ``--output_json``.

Examples:
  python examples/bandmf_mnist.py --data_dir=DATA --num_bands=4 --epochs=10
  python examples/bandmf_mnist.py --data_dir=DATA --num_bands=8 --target_epsilon=1
"""

from __future__ import annotations

import json
import os
import time

from absl import app

if __package__:
    from examples import common, mnist_cnn
else:
    import common
    import mnist_cnn

FLAGS = mnist_cnn.FLAGS


def compare(data: tuple, config: common.Config, bands: int, verbose: int = 2) -> list[dict]:
    """DP-SGD, then BandMF with ``bands`` bands, each trained as ``mnist_cnn`` does."""
    records = []
    for b in (1, bands):
        config.extra["num_bands"] = b
        record = mnist_cnn.train_and_evaluate(data, config, verbose=verbose)
        record.update(num_bands=b, noise="DP-SGD" if b == 1 else f"BandMF({b})")
        records.append(record)
    return records


def main(argv: list[str]) -> list[dict]:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.num_bands < 2:
        raise app.UsageError("--num_bands must be >= 2 (1 is the DP-SGD run it is compared to).")
    start = time.time()
    defaults = mnist_cnn.default_hyperparameters(FLAGS.dataset, FLAGS.clipping, FLAGS.optimizer)
    config = common.resolve_config(defaults, script_flags=("dataset", "num_bands"))
    if config.non_private:
        raise app.UsageError("--non_private has no noise to compare.")
    data = common.load_images(FLAGS.dataset, config)
    records = compare(data, config, FLAGS.num_bands)
    print("\n" + records[-1]["privacy_statement"] + "\n")  # BandMF's guarantee
    for record in records:
        print(
            f"{record['noise']:>10}: test_accuracy={record['test_accuracy']:.4f} "
            f"epsilon={record['epsilon']:.3f} delta={record['delta']:g} "
            f"sigma={record['noise_multiplier']:.3f} steps={record['steps']} "
            f"seconds={record['seconds']:.0f}"
        )
    if config.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(config.output_json)), exist_ok=True)
        summary = {
            "flags": config.to_dict(),
            "runs": records,
            "seconds": time.time() - start,
            "code_version": common.code_version(),
        }
        with open(config.output_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        print(f"Wrote {config.output_json}")
    return records


if __name__ == "__main__":
    common.run(main)

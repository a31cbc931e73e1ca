r"""DP training of the Tramèr & Boneh (2021) CNN on MNIST / Fashion-MNIST, automatic clipping.

Model (26,010 parameters): Conv2D 16@8x8 stride 2 "same" + tanh, MaxPool 2x2 stride 1,
Conv2D 32@4x4 stride 2 "valid" + tanh, MaxPool 2x2 stride 1, Flatten, Dense 32 + tanh,
Dense 10 (logits). Inputs are the pixels scaled to [0, 1] (pixel / 255), no other
normalization (Tramèr & Boneh, "Differentially Private Learning Needs Better Features
(or Much More Data)", ICLR 2021: their end-to-end CNN for MNIST).

Defaults: automatic clipping (``--clipping=auto-s``), DP-SGD with momentum 0.9, target
epsilon 3 at delta 1e-5, 40 epochs, batch size 512 (MNIST) / 2048 (Fashion-MNIST, as in
Tramèr & Boneh), Poisson sampling.

**Why the automatic-clipping learning rate is eta * R.** Tramèr & Boneh train with Abadi
clipping: MNIST lr eta = 0.5 at R = 0.1 (sigma 1.23, 98.1%), Fashion-MNIST eta = 4 at
R = 0.1 (sigma 2.15, 86.0%). Abadi clips example i to ``min(1, R / ||g_i||) g_i``; when
R is small enough that every example is clipped this is ``R g_i / ||g_i||``, so the
DP-SGD update is

    -eta / B * (sum_i R g_i / ||g_i|| + sigma R z)
        = -(eta R) / B * (sum_i g_i / ||g_i|| + sigma z),

which is automatic clipping (AUTO-V, or AUTO-S as gamma -> 0) with learning rate
``eta * R`` and the same sigma: Bu et al.'s equivalence of Abadi's clipping at small R
and automatic clipping for non-adaptive optimizers (arXiv 2206.07136). Momentum is
linear in the gradients, so the equivalence holds for momentum SGD too. Hence the AUTO
defaults: lr = 0.5 * 0.1 = 0.05 (MNIST) and 4 * 0.1 = 0.4 (Fashion-MNIST). With
``--clipping=abadi`` the defaults are Tramèr & Boneh's own (lr 0.5 resp. 4,
``--l2_norm_clip=0.1``). sigma is calibrated from ``--target_epsilon`` for the run
actually made: 1.12 (MNIST) and 1.92 (Fashion-MNIST) for the defaults, with this
library's RDP accountant; pass ``--noise_multiplier=1.23`` (resp. 2.15) for Tramèr &
Boneh's values.

Examples:
  python examples/mnist_cnn.py --data_dir=DATA --epochs=1  # DATA/mnist.npz
  python examples/mnist_cnn.py --dataset=fashion_mnist --output_json=/tmp/fashion.json
  python examples/mnist_cnn.py --clipping=abadi --l2_norm_clip=0.1 --learning_rate=0.5
  python examples/mnist_cnn.py --non_private --learning_rate=0.05
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from models import NUM_PARAMETERS  # noqa: E402
from models import tramer_boneh_cnn as build_model  # noqa: E402

flags.DEFINE_enum("dataset", "mnist", ["mnist", "fashion_mnist"], "Data set.")

flags.adopt_module_key_flags(common)  # the common flags show in --help
FLAGS = flags.FLAGS
# Tramèr & Boneh (2021), Abadi clipping at epsilon = 3: learning rate eta, threshold R.
TRAMER_BONEH = {"mnist": (0.5, 0.1), "fashion_mnist": (4.0, 0.1)}


def default_hyperparameters(dataset: str, clipping: str, optimizer: str | None) -> dict:
    """Per-data-set defaults; the AUTO learning rate is eta * R (module docstring)."""
    eta, r = TRAMER_BONEH[dataset]
    abadi = clipping in ("abadi", "global")
    defaults = {
        "optimizer": "sgd",
        "learning_rate": eta if abadi else eta * r,
        "batch_size": 512 if dataset == "mnist" else 2048,
        "epochs": 40,
        "l2_norm_clip": r if abadi else None,
    }
    if (optimizer or "sgd") == "sgd":
        defaults["momentum"] = 0.9
    return defaults


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    start = time.time()
    defaults = default_hyperparameters(FLAGS.dataset, FLAGS.clipping, FLAGS.optimizer)
    config = common.resolve_config(defaults, script_flags=("dataset",))
    data = common.load_images(FLAGS.dataset, config)
    record = common.train_and_evaluate(build_model, data, config)
    record.update(dataset=FLAGS.dataset, model_parameters=NUM_PARAMETERS)
    common.finish(record, config, start)
    return record


if __name__ == "__main__":
    common.run(main)

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

The library's calls are in ``train_and_evaluate`` below (``ac.poisson_sample``, the
``ac.DPAuto<Optimizer>``, ``ac.make_private``, ``ac.PrivacyCallback``,
``ac.privacy_statement``); flags, data loading, the Keras fit and the results (printed
lines, ``--output_json``) are the examples' shared plumbing in ``common.py``.

Examples:
  python examples/mnist_cnn.py --data_dir=DATA --epochs=1  # DATA/mnist.npz
  python examples/mnist_cnn.py --dataset=fashion_mnist --output_json=/tmp/fashion.json
  python examples/mnist_cnn.py --clipping=abadi --l2_norm_clip=0.1 --learning_rate=0.5
  python examples/mnist_cnn.py --non_private --learning_rate=0.05
  python examples/mnist_cnn.py --num_bands=4   # BandMF noise (examples/bandmf_mnist.py)
"""

from __future__ import annotations

import math
import time

import keras
from absl import app, flags

import tf_autoclip as ac

if __package__:  # imported as examples.mnist_cnn (tests, python -m examples.mnist_cnn)
    from examples import common
    from examples.models import NUM_PARAMETERS
    from examples.models import tramer_boneh_cnn as build_model
else:  # python examples/mnist_cnn.py: this script's folder is on sys.path
    import common
    from models import NUM_PARAMETERS
    from models import tramer_boneh_cnn as build_model

flags.DEFINE_enum("dataset", "mnist", ["mnist", "fashion_mnist"], "Data set.")
flags.DEFINE_integer(
    "num_bands", 1,
    "BandMF correlated noise with this many bands (tf_autoclip.BandMF); 1: DP-SGD. Needs "
    "--sampling=poisson (batches at least num_bands steps apart).",
)  # fmt: skip

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


def train_and_evaluate(data: tuple, config: common.Config, verbose: int = 2) -> dict:
    """Trains the CNN with differential privacy as ``config`` says; returns the result record.

    ``data`` is ``(x_train, y_train, x_test, y_test)``. ``--non_private`` trains the plain
    Keras baseline instead (``common.train_non_private``).
    """
    if config.non_private:
        return common.train_non_private(build_model, data, config, verbose=verbose)
    start = time.time()
    x_train, y_train, _, _ = data
    n = common.num_train_examples(data, config)  # also checks --batch_size
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)

    # BandMF (--num_bands > 1): noise correlated across steps; None is DP-SGD.
    bands = config.extra.get("num_bands", 1)
    band_mf = ac.BandMF(bands) if bands > 1 else None
    if band_mf is not None and config.sampling != "poisson":
        raise app.UsageError("--num_bands > 1 needs --sampling=poisson (its ε assumes it).")

    # Batches. Poisson sampling (each example joins each batch with probability
    # q = batch_size / n, independently) is what the accountant assumes: epsilon is proven.
    # With BandMF an example's batches are also at least num_bands steps apart.
    sampler = None
    if config.sampling == "poisson":
        sampler = ac.poisson_sample(
            x_train, y_train, expected_batch_size=config.batch_size, epochs=config.epochs,
            seed=config.seed, min_separation=bands,
        )  # fmt: skip
        planned_steps = sampler.steps
    else:  # shuffled fixed-size batches: the Poisson epsilon is then a heuristic
        planned_steps = common.shuffled_steps(config, n)

    # The noise multiplier sigma: --noise_multiplier, or the one that reaches
    # --target_epsilon after planned_steps steps.
    q = config.batch_size / n
    sigma = config.noise_multiplier
    if sigma is None:
        sigma = ac.compute_noise_multiplier(
            config.target_epsilon, config.delta, q, steps=planned_steps,
            accountant=config.accountant, correlated_noise=band_mf,
        )  # fmt: skip

    # The DP optimizer: ac.DPAutoSGD by default (--optimizer=adam: ac.DPAutoAdam, ...).
    dp_optimizer_class = getattr(ac, "DPAuto" + common.OPTIMIZERS[config.optimizer].__name__)
    optimizer = dp_optimizer_class(
        **common.optimizer_kwargs(config),  # learning_rate, momentum, weight_decay
        noise_multiplier=sigma,
        clipping=config.clipping,  # auto-s / auto-v: no threshold; abadi / global: R
        gamma=config.gamma,
        l2_norm_clip=config.l2_norm_clip if config.clipping in ("abadi", "global") else None,
        expected_batch_size=config.batch_size,
        seed=config.seed,
        correlated_noise=band_mf,
    )

    # The model, made private: fit computes per-example gradients and clips them.
    model = ac.make_private(build_model())

    # Tracks epsilon per epoch (history["epsilon"]) and stops at --target_epsilon.
    privacy = ac.PrivacyCallback(
        num_examples=n,
        delta=config.delta,
        target_epsilon=config.target_epsilon,
        accountant=config.accountant,
        sampling="poisson",  # the accounting sigma is calibrated with
        batch_size=config.batch_size,
        verbose=0,  # an early stop is reported in the record instead
    )
    record = common.fit_and_evaluate(
        model, optimizer, data, config, start=start, sampler=sampler, callbacks=[privacy],
        noise_multiplier=sigma, verbose=verbose,
    )  # fmt: skip

    # The guarantee of the steps actually run.
    steps = record["steps"]
    epsilon = ac.compute_epsilon(
        sigma, q, steps, config.delta, config.accountant, correlated_noise=band_mf
    )
    overflow = 0.0 if sampler is None else sampler.overflow_probability
    statement = ac.privacy_statement(
        sigma, q, steps, config.delta, num_examples=n, batch_size=config.batch_size,
        accountant=config.accountant, overflow_probability=overflow, correlated_noise=band_mf,
    )  # fmt: skip
    # A bound for batches in any order (shuffled ones): one full-batch step per pass.
    passes = math.ceil(steps / ac.accounting.steps_per_pass(n, config.batch_size))
    return common.add_privacy(
        record,
        planned_steps=planned_steps,
        epsilon=epsilon,
        epsilon_shuffle_bound=math.inf  # no such bound for correlated noise
        if band_mf is not None
        else ac.compute_epsilon(sigma, 1.0, passes, config.delta, config.accountant),
        sampling_probability=q,
        overflow_probability=overflow,
        privacy_statement=statement,
    )


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    start = time.time()
    defaults = default_hyperparameters(FLAGS.dataset, FLAGS.clipping, FLAGS.optimizer)
    config = common.resolve_config(defaults, script_flags=("dataset", "num_bands"))
    data = common.load_images(FLAGS.dataset, config)
    record = train_and_evaluate(data, config)
    record.update(dataset=FLAGS.dataset, model_parameters=NUM_PARAMETERS, num_bands=FLAGS.num_bands)
    common.finish(record, config, start)
    return record


if __name__ == "__main__":
    common.run(main)

r"""User-level DP on MNIST: each "user" owns several records; one user weighs at most S.

The MNIST training images are dealt out to users, ``--examples_per_user`` each (default
10: 6,000 users), at random (``--seed``). Example-level DP would protect one image; here
the unit of privacy is the user: two data sets are adjacent when they differ in all the
records of one user. Three calls make the guarantee user-level:

* ``ac.poisson_sample(x, y, user_ids=..., max_examples_per_user=...)`` samples each
  *user* with probability q per step and puts all of that user's records (at most
  ``--max_examples_per_user``) into the batch, their user index under ``x["user_id"]``;
* ``ac.make_private(model, user_id_key="user_id")`` strips the ids and clips each user's
  summed gradient: ``c_u (sum_{i in u} g_i)`` with ``c_u = 1 / (||sum_i g_i|| + gamma)``
  (automatic clipping), so 1 record or 50, the user moves the sum by at most S;
* ``ac.privacy_statement(..., unit="user")`` reports ε with q the user sampling rate.

``--batch_size`` is the expected number of *users* per step (the optimizer's
``expected_batch_size``: the noisy sum is divided by it), ``--epochs`` passes over the
users. The model is the Tramèr & Boneh CNN of ``mnist_cnn.py``; per-user clipping runs on
the vectorized engine (per-example gradients, summed per user, then clipped).

Examples:
  python examples/user_level.py --data_dir=DATA  # DATA/mnist.npz
  python examples/user_level.py --data_dir=DATA --max_train_examples=20000 --epochs=2
"""

from __future__ import annotations

import time

import keras
import numpy as np
from absl import app, flags

import tf_autoclip as ac

if __package__:  # imported as examples.user_level (tests, python -m examples.user_level)
    from examples import common
    from examples.models import tramer_boneh_cnn as build_model
else:  # python examples/user_level.py: this script's folder is on sys.path
    import common
    from models import tramer_boneh_cnn as build_model

flags.DEFINE_integer("examples_per_user", 10, "Training records dealt to each user.")
flags.DEFINE_integer(
    "max_examples_per_user", None,
    "Records of a sampled user that enter a batch (default: --examples_per_user).",
)  # fmt: skip
flags.adopt_module_key_flags(common)
FLAGS = flags.FLAGS

DEFAULTS = {"optimizer": "sgd", "momentum": 0.9, "learning_rate": 0.5, "batch_size": 128,
            "epochs": 3}  # fmt: skip


def assign_users(n: int, per_user: int, seed: int | None) -> np.ndarray:
    """A user id for each of ``n`` records: a random deal, ``per_user`` records each."""
    rng = np.random.default_rng(seed)
    return rng.permutation(n) // per_user


def train_and_evaluate(data: tuple, config: common.Config, verbose: int = 2) -> dict:
    """Trains with user-level DP as ``config`` says; returns the result record."""
    if config.sampling != "poisson" or config.non_private:
        raise app.UsageError("This example trains with user-level DP on Poisson-sampled users.")
    start = time.time()
    x_train, y_train, _, _ = data
    per_user = config.extra["examples_per_user"]
    cap = config.extra["max_examples_per_user"] or per_user
    user_ids = assign_users(len(y_train), per_user, config.seed)
    num_users = len(np.unique(user_ids))
    if not 0 < config.batch_size <= num_users:
        raise app.UsageError(f"--batch_size (users per step) must be in [1, {num_users}].")
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    # Each step samples every user with probability q = batch_size / num_users.
    sampler = ac.poisson_sample(
        x_train, y_train, user_ids=user_ids, max_examples_per_user=cap,
        expected_batch_size=config.batch_size, epochs=config.epochs, seed=config.seed,
    )  # fmt: skip
    q = sampler.sampling_probability
    sigma = config.noise_multiplier
    if sigma is None:
        sigma = ac.compute_noise_multiplier(
            config.target_epsilon, config.delta, q, steps=sampler.steps,
            accountant=config.accountant,
        )  # fmt: skip
    dp_optimizer_class = getattr(ac, "DPAuto" + common.OPTIMIZERS[config.optimizer].__name__)
    optimizer = dp_optimizer_class(
        **common.optimizer_kwargs(config),
        noise_multiplier=sigma,
        clipping=config.clipping,
        gamma=config.gamma,
        l2_norm_clip=config.l2_norm_clip if config.clipping in ("abadi", "global") else None,
        expected_batch_size=sampler.expected_batch_size,  # users per step
    )
    model = ac.make_private(build_model(), user_id_key="user_id")
    record = common.fit_and_evaluate(
        model, optimizer, data, config, start=start, sampler=sampler, noise_multiplier=sigma,
        verbose=verbose,
    )  # fmt: skip

    steps = record["steps"]
    statement = ac.privacy_statement(
        sigma, q, steps, config.delta, num_examples=num_users, batch_size=config.batch_size,
        accountant=config.accountant, overflow_probability=sampler.overflow_probability,
        unit="user",
    )  # fmt: skip
    passes = -(-steps // sampler.steps_per_epoch)
    record.update(num_users=num_users, examples_per_user=per_user, max_examples_per_user=cap)
    return common.add_privacy(
        record,
        planned_steps=sampler.steps,
        epsilon=ac.compute_epsilon(sigma, q, steps, config.delta, config.accountant),
        epsilon_shuffle_bound=ac.compute_epsilon(
            sigma, 1.0, passes, config.delta, config.accountant
        ),
        sampling_probability=q,
        overflow_probability=sampler.overflow_probability,
        privacy_statement=statement,
    )


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    start = time.time()
    config = common.resolve_config(
        DEFAULTS, script_flags=("examples_per_user", "max_examples_per_user")
    )
    data = common.load_images("mnist", config)
    record = train_and_evaluate(data, config)
    common.finish(record, config, start, notes=("Unit of privacy: the user (user-level DP).",))
    return record


if __name__ == "__main__":
    common.run(main)

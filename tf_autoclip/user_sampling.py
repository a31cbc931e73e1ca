"""Poisson sampling of users, for user-level DP (``poisson_sample(..., user_ids=...)``).

With user-level DP the unit of privacy is the user: two data sets are adjacent when they
differ in all the records of one user. Each step samples every **user** independently
with probability q and puts all of that user's records (at most ``max_examples_per_user``
of them: the user's first ones in index order) into the batch, so the accountant's
Poisson-sampling ε holds with q = the user sampling rate, and the user-level clipping of
``make_private(model, user_id_key="user_id")`` bounds a sampled user's whole contribution
by S.

Each element is ``(x, y, sample_weight)`` padded to a static ``padded_batch_size`` rows
(``max_examples_per_user`` rows for each of at most ``max_users`` users), where ``x`` is a
dict: the inputs' own dict, or ``{"inputs": x}`` for non-dict inputs, plus the users'
indices under ``x["user_id"]`` (``USER_ID_KEY``: the position of the user's id in the
sorted distinct ids; -1 on padding rows, whose sample weight is 0). The cap and the
padded size depend only on the number of users U, q and the number of steps, never on
how many records each user has; more than ``max_users`` sampled users (probability at
most ``overflow_probability``, computed for U + 1 users as in
:mod:`tf_autoclip.sampling`) keeps a random ``max_users`` of them, accounted for in δ.

Example:
    >>> import numpy as np
    >>> x = np.arange(12, dtype="float32").reshape(6, 2)
    >>> users = np.array([3, 3, 3, 5, 8, 8])
    >>> s = sample_users(x, None, None, user_ids=users, max_examples_per_user=2,
    ...                  sampling_probability=1.0, steps=1, seed=0)
    >>> s.num_users, s.expected_batch_size, s.padded_batch_size
    (3, 3.0, 8)
    >>> xb, _, w = next(iter(s.dataset))  # room for 4 users (a neighbour may have one more)
    >>> xb["user_id"].numpy().tolist()  # user 3's first 2 records, user 5's, user 8's
    [0, 0, 1, 2, 2, -1, -1, -1]
    >>> w.numpy().tolist()
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
import tensorflow as tf

from tf_autoclip import sampling

USER_ID_KEY = "user_id"


def sample_users(
    x: Any,
    y: Any,
    sample_weight: Any,
    *,
    user_ids: Any,
    max_examples_per_user: int | None,
    sampling_probability: float | None = None,
    expected_batch_size: float | None = None,
    steps: int | None = None,
    epochs: int | None = None,
    overflow_probability: float | None = None,
    seed: int | None = None,
    initial_step: int = 0,
    padded_batch_size: None = None,
) -> sampling.PoissonSampler:
    """User-level Poisson sampling (module docstring); ``poisson_sample`` delegates here.

    ``sampling_probability`` / ``expected_batch_size`` are per user (q, and q·U users per
    batch: the optimizer's ``expected_batch_size``); ``epochs`` are expected passes over
    the users. Returns a :class:`tf_autoclip.sampling.PoissonSampler` whose ``num_users``
    is U and ``padded_batch_size`` the static number of rows.
    """
    if padded_batch_size is not None:
        raise ValueError("With user_ids the padded batch size is chosen from U, q and the cap.")
    data, n = sampling._validated_data(x, y, sample_weight)
    if isinstance(data["x"], dict) and USER_ID_KEY in data["x"]:
        raise ValueError(f"x already has a {USER_ID_KEY!r} entry, where the user ids go.")
    table = _user_table(user_ids, n, max_examples_per_user)
    num_users, cap = table.shape
    q, expected = sampling._sampling_rate(num_users, sampling_probability, expected_batch_size)
    steps, initial_step = sampling._step_range(q, steps, epochs, initial_step)
    max_users, eta = sampling._padded_size(num_users, q, steps, None, overflow_probability)
    seed = secrets.randbits(63) if seed is None else int(seed)
    dataset = _make_dataset(data, table, q, max_users, initial_step, steps, seed)
    dataset.tf_autoclip_user_id_key = USER_ID_KEY  # training.configure_for_data
    return sampling.sampler_for(
        dataset, n, q, expected, max_users * cap, steps, eta, initial_step, seed, num_users
    )


def _user_table(user_ids: Any, n: int, cap: int | None) -> np.ndarray:
    """``[U, cap]`` int64: the rows of each user (first ``cap``, index order), -1 after."""
    if cap is None:
        raise ValueError(
            "poisson_sample(..., user_ids=...) needs max_examples_per_user: the padded batch "
            "size must not depend on how many records the largest user has (it would be "
            "released through the batch shape). Records of a user beyond it are not used."
        )
    cap = sampling._non_negative_int("max_examples_per_user", cap)
    if cap < 1:
        raise ValueError("max_examples_per_user must be >= 1.")
    ids = np.asarray(user_ids.numpy() if isinstance(user_ids, tf.Tensor) else user_ids)
    if ids.shape != (n,):
        raise ValueError(f"user_ids must have shape ({n},), one id per example; got {ids.shape}.")
    _, users = np.unique(ids, return_inverse=True)
    order = np.argsort(users, kind="stable")  # by user, then by row index
    counts = np.bincount(users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(n) - np.repeat(starts, counts)  # position of each row in its user
    table = np.full((len(counts), cap), -1, np.int64)
    keep = rank < cap
    table[users[order][keep], rank[keep]] = order[keep]
    return table


def _make_dataset(
    data: dict[str, Any],
    table: np.ndarray,
    q: float,
    max_users: int,
    initial_step: int,
    steps: int,
    seed: int,
) -> tf.data.Dataset:
    """Steps ``initial_step .. steps - 1``: each samples users, then takes their rows."""
    num_users, cap = table.shape
    size = max_users * cap
    threshold = sampling._inclusion_threshold(q)
    key = tf.constant([seed % 2**63, (seed // 2**63) % 2**63], dtype=tf.int64)
    rows_of = tf.constant(table)

    def batch_for_step(step: tf.Tensor) -> tuple[Any, Any, tf.Tensor]:
        step_key = tf.random.experimental.stateless_fold_in(key, step)
        users, _ = sampling._sample_indices(step_key, num_users, threshold, max_users)
        rows = tf.gather(rows_of, users)  # [k, cap]
        valid = rows >= 0
        selected = tf.boolean_mask(rows, valid)
        owners = tf.boolean_mask(tf.repeat(users[:, None], cap, axis=1), valid)
        kept = tf.size(selected)
        xb, yb, weights = sampling._padded_batch(data, selected, kept, size)
        ids = tf.concat([owners, -tf.ones([size - kept], tf.int64)], axis=0)
        ids.set_shape([size])
        xb = {**xb, USER_ID_KEY: ids} if isinstance(xb, dict) else {"inputs": xb, USER_ID_KEY: ids}
        return xb, yb, weights

    return (
        tf.data.Dataset.range(initial_step, steps)
        .map(batch_for_step, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )

"""``privacy_statement``: a human-readable report of a DP training run's (ε, δ).

Built on the accountant of ``accounting.py`` (which re-exports it); see that module for
how ε is computed. The report gives two numbers, both for example-level DP with
add/remove-one adjacency:

1. **Poisson sampling**: ``compute_epsilon(σ, q, steps, δ)``. This is a proof
   only if each step's batch really was Poisson-sampled with probability q
   (e.g. :func:`tf_autoclip.sampling.poisson_sample`). For shuffled
   fixed-size batches it is a widely used heuristic, not a guarantee:
   shuffling can be less private than Poisson accounting suggests (Chua et
   al., "How Private are DP-SGD Implementations?", ICML 2024).
2. **Shuffled fixed-size batches, conservative**: it assumes only that in
   every pass over the data (``steps_per_epoch`` consecutive steps) each
   example is in at most one batch, at a position that does not depend on
   whether the differing example is present. Adding or removing one example
   then changes one noisy sum per pass by at most the sensitivity, and
   every other step's input is unchanged, so by adaptive composition the
   run is at most as revealing as ``ceil(steps / steps_per_epoch)``
   Gaussian releases with noise multiplier σ, with no amplification
   (q = 1). This matches tensorflow-privacy's "each example occurring once
   per epoch" bound, except that σ is used as given: the tf-autoclip
   optimizers bound each example's own contribution, so no factor 2 for
   microbatches is needed.

With ``unit="user"`` the report is for **user-level** DP, add/remove-one-*user*
adjacency (two data sets differ in all the records of one user): the same accountant with
q the per-step *user* sampling rate, ``num_examples`` the number of users and
``batch_size`` the expected users per batch. It holds for training that clips each
user's summed gradient (``make_private(model, user_id_key=...)`` or
``private_gradients(..., user_ids=...)``) on batches of sampled users
(``poisson_sample(..., user_ids=...)``; bound 2 needs every user's records in at most one
batch per pass). Example batches that happen to carry user ids do not qualify: one
user's records then spread over many steps of a pass.
"""

from __future__ import annotations

import math

from tf_autoclip.accounting import (
    _check_accountant,
    _check_delta,
    _check_noise_multiplier,
    _check_num_examples,
    _check_positive,
    _check_real,
    _check_sampling_probability,
    _check_steps,
    _epsilon,
    _warn_if_delta_too_large,
    steps_per_pass,
)
from tf_autoclip.correlated_noise import BandMF, num_bands_of


def privacy_statement(
    noise_multiplier: float,
    sampling_probability: float,
    steps: int,
    delta: float,
    num_examples: int | None = None,
    batch_size: float | None = None,
    accountant: str = "rdp",
    *,
    steps_per_epoch: int | None = None,
    overflow_probability: float = 0.0,
    unit: str = "example",
    correlated_noise: BandMF | None = None,
) -> str:
    """Human-readable report of the (ε, δ) guarantee of a finished DP training run.

    It gives two ε, for example-level DP with add/remove-one adjacency (or ``unit``): (1) with
    Poisson sampling and (2) a conservative bound for shuffled fixed-size batches. The
    module docstring (:mod:`tf_autoclip.statement`) says what each assumes.

    Args:
        noise_multiplier: σ = noise std / per-example sensitivity, used as given.
        sampling_probability: q (Poisson) or batch_size / num_examples (shuffled).
        steps: optimizer steps taken.
        delta: δ in (0, 1).
        num_examples: size of the training set; enables the δ < 1/n check.
        batch_size: expected (Poisson) or fixed (shuffled) batch size; must equal
            q · num_examples when both are given.
        accountant: ``"rdp"`` or ``"pld"``.
        steps_per_epoch: steps per pass over the data for bound 2. Default:
            ``ceil(num_examples / batch_size)`` (or ``ceil(1 / q)``), the steps of a Keras
            epoch, which keeps the last, partial batch (10,000 examples at B = 64: 157
            steps, so 5 epochs are 5 passes). If the last partial batch was dropped
            (``drop_remainder=True``), pass ``floor(num_examples / batch_size)``: with the
            default, a run of many such epochs can be counted as fewer passes than it made.
        overflow_probability: probability η that Poisson batches were ever truncated to
            their padded size during the run (see :class:`tf_autoclip.sampling.PoissonSampler`);
            bound 1 then holds with δ + (1 + e^ε)·η, which the report states.
        unit: ``"example"`` (default) or ``"user"`` (user-level DP, module docstring).
        correlated_noise: ``BandMF(b)``: bound 1 is then that of
            ``compute_epsilon(..., correlated_noise=...)`` on b-min-separated Poisson
            batches, and bound 2 is not given (it assumes independent noise per step).

    Returns the report as a multi-line string.

    Example:
        >>> print(privacy_statement(1.1, 256 / 60000, 14040, 1e-5, num_examples=60000,
        ...                         batch_size=256))  # doctest: +ELLIPSIS
        Example-level (ε, δ)-differential privacy, add-or-remove-one adjacency...
    """
    sigma = _check_noise_multiplier(noise_multiplier)
    q = _check_sampling_probability(sampling_probability)
    steps = _check_steps(steps)
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    eta = _check_overflow_probability(overflow_probability)
    wording = _wording(unit)
    n = _check_data_size(q, num_examples, batch_size)
    _warn_if_delta_too_large(delta, n)
    steps_per_epoch = _steps_per_epoch(steps_per_epoch, q, n, batch_size)
    bands = num_bands_of(correlated_noise)
    text = _statement_text(accountant, sigma, q, n, steps, delta, eta, steps_per_epoch, bands)
    for example_wording, unit_wording in wording:
        text = text.replace(example_wording, unit_wording)
    return text


def _wording(unit: str) -> tuple[tuple[str, str], ...]:
    if unit not in _UNITS:
        raise ValueError(f"unit must be one of {sorted(_UNITS)}, got {unit!r}.")
    return _UNITS[unit]


# The report's example-level wording, and what replaces it for each unit.
_UNITS: dict[str, tuple[tuple[str, str], ...]] = {
    "example": (),
    "user": (
        ("Example-level (ε, δ)-differential privacy, add-or-remove-one adjacency",
         "User-level (ε, δ)-differential privacy, add-or-remove-one-user adjacency"),
        ("per-example sensitivity", "per-user sensitivity"),
        (" examples)", " users)"),
        ("each example in each step", "each user, with all its records, in each step"),
        ("each example in at most one batch", "each user's records in at most one batch"),
        ("whether any single training example was used", "whether any single user's records "
         "were used"),
        ("derived from them.", "derived from them.\n  A user's records are clipped "
         "together: their summed gradient weighs at most the sensitivity, however many."),
        (",\n  and user-level privacy when one person contributes several examples.",
         ",\n  and anything that links users to each other (records of one person under "
         "several user ids)."),
        ("expected/fixed batch size", "expected/fixed users per batch"),
    ),
}  # fmt: skip


def _check_overflow_probability(overflow_probability: float) -> float:
    eta = _check_real("overflow_probability", overflow_probability)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"overflow_probability must be in [0, 1], got {eta}.")
    return eta


def _check_data_size(q: float, num_examples: int | None, batch_size: float | None) -> int | None:
    """n (None if not given), after checking that ``batch_size`` is q·n."""
    n = None if num_examples is None else _check_num_examples(num_examples)
    if batch_size is not None:
        b = _check_positive("batch_size", batch_size)
        if n is not None and not math.isclose(q, b / n, rel_tol=1e-9, abs_tol=1e-15):
            raise ValueError(
                f"sampling_probability={q:g} but batch_size / num_examples = {b}/{n} = "
                f"{b / n:g}: pass the (expected) number of examples per step as batch_size."
            )
    return n


def _steps_per_epoch(
    steps_per_epoch: int | None, q: float, n: int | None, batch_size: float | None
) -> int:
    """The given steps per pass over the data (>= 1), or those of a Keras epoch."""
    if steps_per_epoch is None:
        if n is not None and batch_size is not None:
            steps_per_epoch = steps_per_pass(n, batch_size)
        elif q > 0:
            steps_per_epoch = steps_per_pass(1.0, q)
        else:
            steps_per_epoch = 1
    steps_per_epoch = _check_steps(steps_per_epoch, "steps_per_epoch")
    if steps_per_epoch < 1:
        raise ValueError("steps_per_epoch must be >= 1.")
    return steps_per_epoch


def _statement_text(
    accountant: str,
    sigma: float,
    q: float,
    n: int | None,
    steps: int,
    delta: float,
    eta: float,
    steps_per_epoch: int,
    bands: int = 1,
) -> str:
    """``privacy_statement``'s report, from its validated arguments."""
    passes = math.ceil(steps / steps_per_epoch)
    eps_poisson = _epsilon(sigma, q, steps, delta, accountant, bands)
    eps_shuffle = _epsilon(sigma, 1.0, passes, delta, accountant)
    data = f"{n} examples" if n is not None else "the training set"
    batch = f"expected/fixed batch size {q * n:.6g}, " if n is not None else ""
    lines = [
        "Example-level (ε, δ)-differential privacy, add-or-remove-one adjacency "
        f"({accountant.upper()} accountant):",
        f"  noise multiplier σ = {sigma:g} (noise std / per-example sensitivity, as given; "
        "no microbatch adjustment)",
        f"  sampling probability q = {q:.6g} ({batch}{data})",
        f"  steps = {steps} (≈ {steps * q:.4g} epochs), δ = {delta:.3g}",
        "",
        f"  ε = {eps_poisson:.4g}  with Poisson sampling (each example in each step "
        "independently with probability q).",
        "      Proven only if batches were Poisson-sampled (tf_autoclip.sampling); for "
        "shuffled batches this is a heuristic.",
    ]
    if bands > 1:
        lines[-2:] = [
            f"  ε = {eps_poisson:.4g}  with BandMF noise of {bands} bands on Poisson batches at "
            f"least {bands} steps apart",
            f"      (each example in the steps of its residue class mod {bands}, each "
            f"independently with probability {bands}·q;",
            "      Choquette-Choo et al. 2023, Theorem 4). Proven only for batches of "
            f"poisson_sample(..., min_separation={bands}).",
        ]
    if eta > 0.0:
        delta_total = delta + (1.0 + math.exp(min(eps_poisson, 700.0))) * eta
        lines.append(
            f"      Padded Poisson batches overflowed with probability <= {eta:.3g}, so this "
            f"holds with δ + (1 + e^ε)·{eta:.3g} = {delta_total:.6g} instead of δ."
        )
    if bands > 1:
        lines.append("  No bound for shuffled batches: BandMF's noise is correlated across steps.")
    else:
        lines += [
            f"  ε = {eps_shuffle:.4g}  conservative bound for shuffled fixed-size batches: "
            f"{passes} pass(es) of <= {steps_per_epoch} steps,",
            "      each example in at most one batch per pass, each pass counted as one "
            "un-subsampled Gaussian release (q = 1).",
        ]
    lines += [
        "",
        "Covers: whether any single training example was used, as visible from everything "
        "computed from the",
        "  noised gradients: the released model, every intermediate checkpoint, and anything "
        "derived from them.",
        "Does not cover: hyperparameter tuning or repeated runs on the same data, "
        "data-dependent preprocessing",
        "  (fitted vocabularies, normalization statistics, ...), training loss/accuracy logged "
        "from raw data,",
        "  and user-level privacy when one person contributes several examples.",
    ]
    return "\n".join(lines)

"""``privacy_statement``: a human-readable report of a DP training run's (ε, δ).

Built on the accountant of ``accounting.py`` (which re-exports it); see that module for
how ε is computed.
"""

from __future__ import annotations

import math

from tf_autoclip.accounting import (
    _check_accountant,
    _check_delta,
    _check_noise_multiplier,
    _check_num_examples,
    _check_real,
    _check_sampling_probability,
    _check_steps,
    _epsilon,
    _warn_if_delta_too_large,
    steps_per_pass,
)


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
) -> str:
    """Human-readable report of the (ε, δ) guarantee of a finished DP training run.

    It gives two numbers, both for example-level DP with add/remove-one adjacency:

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
            ``ceil(num_examples / batch_size)`` (or ``ceil(1 / q)``), the steps of
            a Keras epoch, which keeps the last, partial batch (10,000 examples
            at B = 64: 157 steps, so 5 epochs are 5 passes). If the last partial
            batch was dropped (``drop_remainder=True``), pass
            ``floor(num_examples / batch_size)``: with the default, a run of many
            such epochs can be counted as fewer passes than it made.
        overflow_probability: probability η that Poisson batches were ever
            truncated to their padded size during the run (see
            :class:`tf_autoclip.sampling.PoissonSampler`); bound 1 then holds
            with δ + (1 + e^ε)·η, which the report states.

    Returns:
        The report as a multi-line string.

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
    eta = _check_real("overflow_probability", overflow_probability)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"overflow_probability must be in [0, 1], got {eta}.")
    n = None if num_examples is None else _check_num_examples(num_examples)
    if batch_size is not None:
        b = _check_real("batch_size", batch_size)
        if not 0.0 < b < math.inf:
            raise ValueError(f"batch_size must be finite and > 0, got {b}.")
        if n is not None and not math.isclose(q, b / n, rel_tol=1e-9, abs_tol=1e-15):
            raise ValueError(
                f"sampling_probability={q:g} but batch_size / num_examples = {b}/{n} = "
                f"{b / n:g}: pass the (expected) number of examples per step as batch_size."
            )
    if n is not None:
        _warn_if_delta_too_large(delta, n)

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
    passes = math.ceil(steps / steps_per_epoch)

    eps_poisson = _epsilon(sigma, q, steps, delta, accountant)
    eps_shuffle = _epsilon(sigma, 1.0, passes, delta, accountant)

    return _statement_text(
        accountant=accountant,
        sigma=sigma,
        q=q,
        n=n,
        steps=steps,
        delta=delta,
        eta=eta,
        steps_per_epoch=steps_per_epoch,
        passes=passes,
        eps_poisson=eps_poisson,
        eps_shuffle=eps_shuffle,
    )


def _statement_text(
    *,
    accountant: str,
    sigma: float,
    q: float,
    n: int | None,
    steps: int,
    delta: float,
    eta: float,
    steps_per_epoch: int,
    passes: int,
    eps_poisson: float,
    eps_shuffle: float,
) -> str:
    """``privacy_statement``'s report, from its validated arguments and the two ε."""
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
    if eta > 0.0:
        delta_total = delta + (1.0 + math.exp(min(eps_poisson, 700.0))) * eta
        lines.append(
            f"      Padded Poisson batches overflowed with probability <= {eta:.3g}, so this "
            f"holds with δ + (1 + e^ε)·{eta:.3g} = {delta_total:.6g} instead of δ."
        )
    lines += [
        f"  ε = {eps_shuffle:.4g}  conservative bound for shuffled fixed-size batches: "
        f"{passes} pass(es) of <= {steps_per_epoch} steps,",
        "      each example in at most one batch per pass, each pass counted as one "
        "un-subsampled Gaussian release (q = 1).",
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

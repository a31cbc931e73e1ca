"""White-box gradient canaries: many audit trials in one Keras training run.

**The model.** ``p = <e_t, x>``: an ``Embedding`` row ``e_t`` (picked by the example's
integer input ``t``) dotted with the example's input ``x``, with loss ``-p``. An example's
gradient is ``-x`` in row ``t`` and zero elsewhere, whatever the weights: gradients are
chosen directly (Nasr et al. 2023's "gradient canaries", Dirac canaries in their own
coordinates).

**One row, one trial.** Row ``t`` holds ``num_benign`` fixed benign examples and one canary
slot: ``x = canary_norm · e_0`` when canary ``t`` is included, zeros when it is not (a zero
gradient, clipped to zero: exactly the data set without the canary). Clipping is per
example and each example's gradient lives in its own row, so each row receives its own
clipped sum plus the optimizer's i.i.d. Gaussian noise, divided by
``expected_batch_size = num_benign`` (a fixed denominator, as the accountant assumes).
``chunk`` rows share one ``train_on_batch`` call: a chunk is one training run of
``steps`` full-batch (q = 1) steps in which ``chunk`` canaries are inserted; the weights are
reset to zero between chunks.

**The score.** ``s_t = B / lr · <θ_t - θ_t⁰, u>``, u = e_0 (B = ``num_benign``): for
DP-SGD, the released noisy sums projected on the canary's direction, summed over the
steps. The canary's gradient norm is far above any clipping threshold, so it adds the
sensitivity S per step; the noise adds ``N(0, steps · (σS)²)``. Included canaries score
higher.

Everything runs through the library's normal path: ``make_private``, Keras'
``train_on_batch``, the per-example engine, ``clip_and_sum``, the optimizer's noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import keras
import numpy as np

from tf_autoclip.audit import estimators
from tf_autoclip.training import make_private

__all__ = [
    "AuditResult",
    "CanaryScores",
    "canary_loss",
    "gradient_canary_audit",
    "gradient_canary_model",
    "gradient_canary_scores",
]


@dataclasses.dataclass(frozen=True)
class CanaryScores:
    """One score per canary and whether it was included (membership, the secret)."""

    scores: np.ndarray
    included: np.ndarray

    @property
    def in_scores(self) -> np.ndarray:
        return self.scores[self.included]

    @property
    def out_scores(self) -> np.ndarray:
        return self.scores[~self.included]


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Canary scores and the ε lower bounds computed from them (see ``estimators``)."""

    canaries: CanaryScores
    delta: float
    confidence: float
    one_run_epsilon: float  # rigorous: Steinke et al. 2023
    num_guesses: int
    num_correct: int
    gdp_mu: float  # point estimate (mean_in - mean_out) / std
    gdp_epsilon: float  # Gaussian-model estimate: Nasr et al. 2023

    def __str__(self) -> str:
        return (
            f"{self.canaries.scores.size} canaries ({int(self.canaries.included.sum())} "
            f"included): one-run ε ≥ {self.one_run_epsilon:.3f} ({self.num_correct} of "
            f"{self.num_guesses} guesses right), GDP μ̂ = {self.gdp_mu:.3f}, ε ≥ "
            f"{self.gdp_epsilon:.3f} (Gaussian model); δ = {self.delta:g}, "
            f"{self.confidence:.0%} confidence"
        )


def canary_loss(y_true, y_pred):  # noqa: ARG001
    """``-p``: the gradient of example ``(t, x)`` is ``-x`` in Embedding row ``t``."""
    return -y_pred[:, 0]


def gradient_canary_model(num_rows: int, dim: int = 2, engine: str = "vectorized"):
    """The private model ``p = <e_t, x>`` (``num_rows`` Embedding rows of ``dim``)."""
    row = keras.Input((1,), dtype="int32")
    x = keras.Input((dim,))
    table = keras.layers.Embedding(num_rows, dim, embeddings_initializer="zeros", name="trials")
    p = keras.layers.Dot(axes=1)([keras.layers.Flatten()(table(row)), x])
    return make_private(keras.Model([row, x], p), engine=engine)


def _check_optimizer(optimizer) -> float:
    """The learning rate of a stateless SGD (state would carry canaries across chunks)."""
    if not isinstance(optimizer, keras.optimizers.SGD) or float(optimizer.momentum) != 0.0:
        raise ValueError(
            "optimizer_fn must return a DP SGD without momentum (e.g. ac.DPAutoSGD("
            "learning_rate=1.0, noise_multiplier=..., expected_batch_size="
            "expected_batch_size)): the model and optimizer are reused across chunks, and "
            f"optimizer state would carry a canary into later chunks. Got {optimizer!r}."
        )
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def gradient_canary_scores(
    optimizer_fn: Callable[..., keras.optimizers.Optimizer],
    included: Sequence[bool],
    *,
    steps: int = 1,
    num_benign: int = 3,
    dim: int = 2,
    canary_norm: float = 100.0,
    chunk: int = 1000,
    engine: str = "vectorized",
    data_seed: int = 7,
) -> CanaryScores:
    """Trains with one gradient canary per entry of ``included``; returns their scores.

    Args:
        optimizer_fn: ``optimizer_fn(expected_batch_size=num_benign)`` returns the DP
            optimizer under audit: an SGD without momentum, e.g. ``ac.DPAutoSGD``.
        included: per canary, whether it is inserted (its secret membership bit).
        steps: full-batch steps per chunk (the mechanism audited is ``steps`` releases).
        num_benign: fixed benign examples per row (the data set D), ``N(0, 1)^dim`` drawn
            with ``data_seed``.
        dim: parameters per row.
        canary_norm: the canary gradient's norm (should exceed any clipping threshold).
        chunk: rows (canaries) per ``train_on_batch`` call.
        engine: the per-example engine of ``make_private``.
    """
    member = np.asarray(included, dtype=bool).ravel()
    if member.size == 0:
        raise ValueError("included must name at least one canary.")
    rows_per_call = min(int(chunk), member.size)
    model = gradient_canary_model(rows_per_call, dim, engine)
    optimizer = optimizer_fn(expected_batch_size=num_benign)
    lr = _check_optimizer(optimizer)
    model.compile(optimizer=optimizer, loss=canary_loss)
    table = model.get_layer("trials").embeddings
    benign = np.random.default_rng(data_seed).normal(size=(num_benign, dim)).astype("float32")
    per_row = num_benign + 1
    rows = np.repeat(np.arange(rows_per_call, dtype="int32"), per_row)[:, None]
    y = np.zeros((rows_per_call * per_row, 1), "float32")
    scores = []
    for start in range(0, member.size, rows_per_call):
        bits = np.zeros(rows_per_call, bool)  # padding rows of a last, short chunk: out
        bits[: member.size - start] = member[start : start + rows_per_call]
        canaries = np.zeros((rows_per_call, 1, dim), "float32")
        canaries[bits, 0, 0] = canary_norm  # u = e_0
        x = np.concatenate([np.broadcast_to(benign, (rows_per_call, num_benign, dim)),
                            canaries], axis=1).reshape(-1, dim)  # fmt: skip
        table.assign(keras.ops.zeros_like(table))
        for _ in range(steps):
            model.train_on_batch([rows, x], y)
        # θ - θ⁰ = lr · Σ_steps (Σ_i c_i x_i - noise) / B, projected on u = e_0.
        scores.append(keras.ops.convert_to_numpy(table)[:, 0].astype(np.float64) * num_benign / lr)
    return CanaryScores(np.concatenate(scores)[: member.size], member)


def gradient_canary_audit(
    optimizer_fn: Callable[..., keras.optimizers.Optimizer],
    num_canaries: int,
    delta: float,
    *,
    confidence: float = 0.95,
    seed: int = 0,
    **kwargs,
) -> AuditResult:
    """A one-run audit: ``num_canaries`` gradient canaries, each included with
    probability 1/2 (drawn with ``seed``), scored by ``gradient_canary_scores`` (``kwargs``
    go there), then bounded with ``one_run_epsilon_from_scores`` (rigorous) and
    ``gdp_epsilon`` (Gaussian-model estimate)."""
    member = np.random.default_rng(seed).random(num_canaries) < 0.5
    canaries = gradient_canary_scores(optimizer_fn, member, **kwargs)
    eps, guesses, correct = estimators.one_run_epsilon_from_scores(
        canaries.scores, member, delta, confidence=confidence
    )
    mu_hat, _ = estimators.gdp_mu_lower_bound(canaries.in_scores, canaries.out_scores)
    gdp = estimators.gdp_epsilon(canaries.in_scores, canaries.out_scores, delta, confidence)
    return AuditResult(canaries, delta, confidence, eps, guesses, correct, mu_hat, gdp)

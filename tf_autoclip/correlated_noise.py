"""Correlated noise across steps: the banded matrix factorization mechanism (BandMF).

DP-SGD adds independent noise ``z_t`` to every step's clipped sum. BandMF
(Choquette-Choo et al., NeurIPS 2023, arXiv 2306.08153; McKenna, arXiv 2405.15913) adds
``w = C^{-1} z`` instead, with ``C`` a lower-triangular banded Toeplitz matrix of
``num_bands`` (b) coefficients ``c_0 .. c_{b-1}``:

    w_t = (z_t - sum_{j=1}^{b-1} c_j w_{t-j}) / c_0,        z_t ~ N(0, (sigma S)^2 I).

The released gradients ``G + C^{-1} z`` are post-processing of ``C G + z``, a Gaussian
mechanism whose per-step sensitivity is S times a column norm of C. The coefficients are
scaled to unit L2 norm, so every column has norm <= 1 and ``noise_multiplier`` keeps its
meaning. Later noise partly cancels earlier noise in the model's sum of updates, so the
trained model is less noisy than with DP-SGD at the same sigma.

**Privacy** (Choquette-Choo et al. 2023, Theorem 4, "amplified BandMF"): if every example
is in batches at least b steps apart (b-min-separation) and, in the steps it may join,
each of them independently with probability q_b, BandMF with any b-banded C of column
norms <= 1 is as private as DP-SGD with sampling probability q_b and ``ceil(T / b)``
steps. ``tf_autoclip.poisson_sample(..., min_separation=b)`` samples that way (each
example gets a secret random residue class of steps modulo b, and joins those steps with
probability ``q_b = b q``), and ``compute_epsilon(..., correlated_noise=BandMF(b))``
accounts for it; ``q`` stays the expected batch size over n. With ``b = 1``, C = I:
exactly DP-SGD, same noise, same epsilon.

**Noise buffers.** The last b - 1 noise draws ``w_{t-1} .. w_{t-b+1}`` are optimizer
state held outside Keras' tracking: never in a checkpoint, saved model or config. Anyone
holding them could subtract the past noise from the released updates. A restarted or
reloaded optimizer starts with zero buffers: the noise of the run is then C'^{-1} z with
C' block-diagonal in b-banded blocks, still b-banded with column norms <= 1, so the same
accounting holds.

Coefficients:

- ``"sqrt"`` (default): the first b coefficients of the square root of the prefix-sum
  matrix, ``binom(2j, j) / 4^j`` (Fichtenberger, Henzinger & Upadhyay, ICML 2023), i.e.
  the banded square-root factorization of Kalinin & Lampert (NeurIPS 2024,
  arXiv 2405.13763); needs no horizon.
- ``"optimized"``: minimize the prefix-sum error ``||A C^{-1}||_F^2`` over b-banded
  Toeplitz C with unit column norm for ``num_steps`` steps (L-BFGS from ``"sqrt"``).
- a sequence of b numbers (``c_0 > 0``).

>>> BandMF(1).coefficients.tolist()
[1.0]
>>> BandMF(3).coefficients.round(3).tolist()
[0.848, 0.424, 0.318]
>>> BandMF(4).prefix_error(100) < BandMF(1).prefix_error(100)
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from scipy import optimize, signal

__all__ = ["BandMF", "NoiseCorrelator"]

_STRATEGIES = ("sqrt", "optimized")


@keras.saving.register_keras_serializable(package="tf_autoclip")
class BandMF:
    """Banded matrix factorization noise (module docstring): ``correlated_noise=BandMF(b)``.

    Args:
      num_bands: b >= 1, the number of nonzero diagonals of C (1: DP-SGD).
      coefficients: ``"sqrt"`` (default), ``"optimized"`` or b numbers; scaled to unit norm.
      num_steps: the training horizon, needed by ``"optimized"`` only.

    The coefficients are public (they are in the optimizer's config); the noise is not.
    """

    def __init__(
        self,
        num_bands: int,
        coefficients: str | Sequence[float] = "sqrt",
        num_steps: int | None = None,
    ) -> None:
        if isinstance(num_bands, bool) or not isinstance(num_bands, (int, np.integer)):
            raise ValueError(f"num_bands must be an integer >= 1, got {num_bands!r}.")
        if num_bands < 1:
            raise ValueError(f"num_bands must be >= 1, got {num_bands}.")
        self.num_bands = int(num_bands)
        self.num_steps = None if num_steps is None else int(num_steps)
        if isinstance(coefficients, str):
            raw = _named_coefficients(coefficients, self.num_bands, self.num_steps)
        else:
            raw = np.asarray(coefficients, np.float64)
            if raw.shape != (self.num_bands,):
                raise ValueError(
                    f"coefficients must hold num_bands={self.num_bands} numbers, got shape "
                    f"{raw.shape}."
                )
        self.coefficients = _unit_norm(raw)

    # -- the strategy --------------------------------------------------------------
    def strategy_matrix(self, num_steps: int) -> np.ndarray:
        """C for ``num_steps`` steps, ``[T, T]`` lower-triangular b-banded Toeplitz."""
        matrix = np.zeros((num_steps, num_steps))
        for j, c in enumerate(self.coefficients[:num_steps]):
            matrix += np.diag(np.full(num_steps - j, c), -j)
        return matrix

    def prefix_error(self, num_steps: int) -> float:
        """``||A C^{-1}||_F^2`` for the prefix-sum workload A over ``num_steps`` steps: the
        summed variance (per coordinate, sigma = 1) of the noise in the ``num_steps``
        partial sums of updates. DP-SGD (b = 1) has ``T (T + 1) / 2``."""
        return _prefix_error(self.coefficients, num_steps)

    # -- serialization ---------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {"num_bands": self.num_bands, "coefficients": self.coefficients.tolist()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BandMF:
        return cls(**config)

    def __eq__(self, other: object) -> bool:
        return (  # a config round trip re-normalizes: equal up to rounding
            isinstance(other, BandMF)
            and self.num_bands == other.num_bands
            and np.allclose(self.coefficients, other.coefficients, rtol=1e-12, atol=0.0)
        )

    def __hash__(self) -> int:
        return hash(self.num_bands)

    def __repr__(self) -> str:
        return f"BandMF(num_bands={self.num_bands})"


def num_bands_of(correlated_noise: BandMF | dict | None) -> int:
    """b of a ``correlated_noise`` argument (1 for None, DP-SGD)."""
    return 1 if correlated_noise is None else as_band_mf(correlated_noise).num_bands


def as_band_mf(correlated_noise: Any) -> BandMF | None:
    """``correlated_noise`` as a :class:`BandMF` (a config dict is rebuilt), or None."""
    if correlated_noise is None or isinstance(correlated_noise, BandMF):
        return correlated_noise
    if isinstance(correlated_noise, dict):
        return BandMF.from_config(correlated_noise)
    raise ValueError(
        f"correlated_noise must be tf_autoclip.BandMF(num_bands) or None, got {correlated_noise!r}."
    )


def _named_coefficients(name: str, bands: int, num_steps: int | None) -> np.ndarray:
    if name not in _STRATEGIES:
        raise ValueError(f"coefficients must be one of {_STRATEGIES} or numbers, got {name!r}.")
    sqrt = np.array([math.comb(2 * j, j) / 4.0**j for j in range(bands)])
    if name == "sqrt" or bands == 1:
        return sqrt
    if num_steps is None or num_steps < bands:
        raise ValueError(
            'coefficients="optimized" needs num_steps >= num_bands (the training horizon).'
        )
    result = optimize.minimize(
        lambda c: _prefix_error(_unit_norm(c), num_steps), sqrt, method="L-BFGS-B"
    )
    best = result.x if result.fun < _prefix_error(_unit_norm(sqrt), num_steps) else sqrt
    return best if best[0] > 0 else -best


def _unit_norm(coefficients: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(coefficients)) or coefficients[0] <= 0:
        raise ValueError(f"coefficients must be finite with c_0 > 0, got {coefficients}.")
    return coefficients / np.linalg.norm(coefficients)


def _prefix_error(coefficients: np.ndarray, num_steps: int) -> float:
    impulse = np.zeros(num_steps)
    impulse[0] = 1.0
    inverse = signal.lfilter([1.0], coefficients, impulse)  # C^{-1}'s first column
    partial_sums = np.cumsum(inverse)  # A C^{-1} is Toeplitz with these entries
    return float(np.sum(np.arange(num_steps, 0, -1) * partial_sums**2))


class _Untracked:
    """A plain holder: Keras and ``tf.train.Checkpoint`` do not track what it holds."""

    def __init__(self) -> None:
        self.buffers: list[tf.Variable] | None = None


class NoiseCorrelator:
    """The runtime half of BandMF: turns each step's fresh noise ``z_t`` into ``w_t``.

    Holds the last b - 1 draws of every variable in variables that are never saved (see
    the module docstring). Call :meth:`correlate` once per release.

    >>> c = NoiseCorrelator(BandMF(2, coefficients=[1.0, 1.0]))
    >>> [round(float(c.correlate([tf.constant([1.0])], True)[0][0]), 3) for _ in range(3)]
    [1.414, 0.0, 1.414]
    """

    def __init__(self, band_mf: BandMF) -> None:
        self.band_mf = band_mf
        self._state = _Untracked()

    def correlate(self, noise: Sequence[tf.Tensor], is_update_step: Any) -> list[tf.Tensor]:
        """``w_t`` per variable; buffers advance only on update steps (else noise is 0)."""
        c = self.band_mf.coefficients
        if len(c) == 1:
            return list(noise)
        buffers = self._buffers(noise)
        update = tf.convert_to_tensor(is_update_step, tf.bool)
        out, assigns = [], []
        for z, buffer in zip(noise, buffers, strict=True):
            past = tf.tensordot(tf.constant(c[1:], tf.float32), buffer, axes=1)
            w = (z - past) / tf.constant(c[0], tf.float32)
            shifted = tf.concat([w[None], buffer[:-1]], axis=0)
            assigns.append(buffer.assign(tf.where(update, shifted, buffer)))
            out.append(tf.where(update, w, tf.zeros_like(w)))
        with tf.control_dependencies(assigns):
            return [tf.identity(w) for w in out]

    def reset(self) -> None:
        """Forget the buffered noise (a new, separately accounted stream)."""
        if self._state.buffers is not None:
            for buffer in self._state.buffers:
                buffer.assign(tf.zeros_like(buffer))

    def _buffers(self, noise: Sequence[tf.Tensor]) -> list[tf.Variable]:
        shapes = [tuple(z.shape) for z in noise]
        if any(None in s for s in shapes):
            raise ValueError("BandMF needs statically shaped gradients.")
        depth = len(self.band_mf.coefficients) - 1
        if self._state.buffers is None:
            with tf.init_scope():  # created once, outside any tf.function being traced
                self._state.buffers = [
                    tf.Variable(tf.zeros((depth, *s)), trainable=False, name="bandmf_buffer")
                    for s in shapes
                ]
        held = [tuple(b.shape[1:]) for b in self._state.buffers]
        if held != shapes:
            raise ValueError(
                "This optimizer's BandMF noise buffers were built for variables of shapes "
                f"{held}, but it is now asked to noise gradients of shapes {shapes}. Use one "
                "DP optimizer per model."
            )
        return self._state.buffers

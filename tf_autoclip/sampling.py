"""Poisson-subsampled batches for ``keras.Model.fit`` with static shapes.

The privacy accountant (:mod:`tf_autoclip.accounting`) proves its ε for **Poisson
sampling**: at every step each of the ``n`` training examples enters the batch
independently with probability ``q``, so the batch size is random (Binomial(n, q)).
:func:`poisson_sample` builds a ``tf.data.Dataset`` that does exactly this and keeps
shapes static (for XLA and ``tf.function``) by padding each batch to a fixed
``padded_batch_size`` B (with ``user_ids=``, users are sampled instead of examples, for
user-level DP: :mod:`tf_autoclip.user_sampling`):

* each element is ``(x, y, sample_weight)``: rows ``0..k-1`` are the ``k`` sampled
  examples (in index order), rows ``k..B-1`` are padding filled with zeros (no data from
  any example), and ``sample_weight`` is the 0/1 mask (times the user's own weights, if
  given). The tf-autoclip models guarantee that a row with weight 0 contributes exactly
  zero to the private gradient;
* the optimizer must divide the noisy sum by the *expected* batch size ``q·n``: pass
  ``sampler.expected_batch_size`` to the optimizer's ``expected_batch_size``. Dividing by
  a data-independent constant is post-processing, so this costs no privacy.

**How B is chosen.** By default B is the smallest size such that the probability that
*any* of the ``steps`` batches overflows is at most ``η = 1e-6 · default_delta(n)``, i.e.
``steps · P[Binomial(n + 1, q) > B] ≤ η`` (``n + 1`` covers a neighbouring data set with
one more example).

**Overflow.** If more than B examples are sampled, a uniformly random subset of B of them
is kept. Truncation never raises any example's inclusion probability, but it does make
the batch differ from a Poisson sample, so it is not covered by the Poisson accountant.
It is accounted for instead: the truncated and untruncated runs coincide unless an
overflow happens, which has probability at most η under both neighbouring data sets, so
(ε, δ)-DP of the Poisson run implies (ε, δ + (1 + e^ε)·η)-DP of the padded run. Pass
``sampler.overflow_probability`` to :func:`tf_autoclip.accounting.privacy_statement`,
which reports this δ; with the default η the extra term is at most 2.3% of
``default_delta(n)`` for ε ≤ 10.

**Randomness.** Step ``t`` draws its own sample from a key derived from ``(seed, t)``
with TensorFlow's counter-based stateless RNG, so the run is reproducible and can be
resumed with ``initial_step``. Inclusion is decided by comparing a uniform 64-bit integer
with ``floor(q · 2^64)``, so the real inclusion probability is never above ``q``.
Amplification by subsampling requires the sample to be secret: keep ``seed=None`` (a
fresh seed from the OS) in real training, and never publish or reuse a seed across runs
on the same data.

Example:
    >>> import numpy as np
    >>> from tf_autoclip.sampling import poisson_sample
    >>> x = np.random.rand(1000, 3).astype("float32")
    >>> y = np.random.rand(1000, 1).astype("float32")
    >>> s = poisson_sample(x, y, expected_batch_size=50, epochs=2, seed=0)
    >>> s.sampling_probability, s.steps_per_epoch, s.steps, s.padded_batch_size
    (0.05, 20, 40, 104)
    >>> xb, yb, w = next(iter(s.dataset))
    >>> tuple(xb.shape), tuple(w.shape)
    ((104, 3), (104,))

    Then train with ``model.fit(s.dataset, epochs=s.epochs, steps_per_epoch=s.steps_per_epoch,
    shuffle=False)`` and an optimizer built with ``expected_batch_size=s.expected_batch_size``.
    The dataset ends after ``s.steps`` batches, so training cannot run past the accounted steps.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import warnings
from fractions import Fraction
from typing import Any

import numpy as np
import tensorflow as tf
from scipy import stats

from tf_autoclip import accounting
from tf_autoclip.accounting import default_delta

__all__ = ["PoissonSampler", "poisson_sample"]
_OVERFLOW_FRACTION_OF_DELTA = 1e-6  # default overflow budget η, relative to default_delta(n)


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
    """Result of :func:`poisson_sample`: the dataset and the numbers to train with.

    Attributes:
        dataset: ``tf.data.Dataset`` of ``(x, y, sample_weight)`` batches of static leading
            size ``padded_batch_size``, one per step from ``initial_step`` to ``steps - 1``.
        num_examples: n.
        sampling_probability: q, the per-step inclusion probability.
        expected_batch_size: q·n; pass it to the optimizer's ``expected_batch_size``.
        padded_batch_size: B, the static batch size.
        steps: total number of Poisson steps of the run (the dataset ends there).
        steps_per_epoch: ``max(1, round(1 / q))`` steps, one epoch in expectation.
        epochs: ``ceil(steps / steps_per_epoch)``, for ``fit(epochs=...)``.
        overflow_probability: η, a bound on P(any step samples more than B) (module doc).
        initial_step: first step produced by ``dataset`` (for resuming).
        seed: the sampling seed. It must stay secret (it is not shown in repr).
        num_users: U for user-level sampling (q, the expected batch size and epochs are
            then per user; :mod:`tf_autoclip.user_sampling`), else None.
        min_separation: b: an example's batches are at least b steps apart (BandMF).
    """

    dataset: tf.data.Dataset
    num_examples: int
    sampling_probability: float
    expected_batch_size: float
    padded_batch_size: int
    steps: int
    steps_per_epoch: int
    epochs: int
    overflow_probability: float
    initial_step: int = 0
    seed: int = dataclasses.field(default=0, repr=False)
    num_users: int | None = None
    min_separation: int = 1


def poisson_sample(
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    *,
    sampling_probability: float | None = None,
    expected_batch_size: float | None = None,
    steps: int | None = None,
    epochs: int | None = None,
    padded_batch_size: int | None = None,
    overflow_probability: float | None = None,
    seed: int | None = None,
    initial_step: int = 0,
    user_ids: Any = None,
    max_examples_per_user: int | None = None,
    min_separation: int = 1,
) -> PoissonSampler:
    """Poisson-sampled, zero-padded ``(x, y, sample_weight)`` batches for ``Model.fit``.

    Args:
        x: inputs: an array, or a dict / list / tuple of arrays, all with first dimension n.
        y: targets with the same first dimension, or None.
        sample_weight: optional per-example weights in [0, 1] (first dimension n), times the
            0/1 sampling mask; weights above 1 would raise an influence beyond the sensitivity.
        sampling_probability: q in (0, 1]. Give exactly one of this and ``expected_batch_size``.
        expected_batch_size: q·n, in (0, n].
        steps: total number of steps T. Give exactly one of ``steps`` and ``epochs``.
        epochs: number of epochs; ``steps = ceil(epochs / q)``
            (``accounting.steps_for_epochs``, the conversion ``from_target_epsilon`` uses).
        padded_batch_size: B. Default: chosen from ``overflow_probability`` (module docstring).
        overflow_probability: budget η for the probability that any step overflows B; default
            ``1e-6 * default_delta(n)``. Ignored (but reported) when ``padded_batch_size`` is given.
        seed: sampling seed; None draws a secret one from the OS.
        initial_step: first step to produce (resume a run at ``optimizer.iterations``, same seed).
        user_ids, max_examples_per_user: user-level DP: sample users, each with all its
            records (at most ``max_examples_per_user``); see :mod:`tf_autoclip.user_sampling`.
        min_separation: b >= 1, for BandMF with b bands (``tf_autoclip.correlated_noise``):
            each example gets a secret uniformly random residue class r of steps modulo b
            and joins only the steps t with t mod b = r, each with probability b q, so its
            batches are at least b steps apart. The marginal inclusion probability per step
            stays q (and so do the batch sizes); needs b q <= 1. 1: plain Poisson sampling.

    Returns:
        A :class:`PoissonSampler`. Raises ValueError on inconsistent or invalid arguments.
    """
    separation = _positive_int("min_separation", min_separation)
    if user_ids is not None:  # user-level: every argument, as given, to user_sampling
        if separation != 1:
            raise ValueError("min_separation (BandMF) is not available with user_ids yet.")
        arguments = dict(locals())
        del arguments["min_separation"], arguments["separation"]
        from tf_autoclip import user_sampling  # it builds on this module's helpers

        return user_sampling.sample_users(**arguments)
    data, n = _validated_data(x, y, sample_weight)
    q, expected_batch_size = _sampling_rate(n, sampling_probability, expected_batch_size)
    steps, initial_step = _step_range(q, steps, epochs, initial_step)
    padded_batch_size, eta = _padded_size(n, q, steps, padded_batch_size, overflow_probability)
    accounting.band_reduction(q, steps, separation)  # checks b q <= 1
    seed = secrets.randbits(63) if seed is None else int(seed)
    dataset = _make_dataset(data, n, q, padded_batch_size, initial_step, steps, seed, separation)
    dataset.tf_autoclip_min_separation = separation
    sampler = sampler_for(dataset, n, q, expected_batch_size, padded_batch_size, steps, eta,
                          initial_step, seed)  # fmt: skip
    return dataclasses.replace(sampler, min_separation=separation)


def sampler_for(
    dataset: tf.data.Dataset, n: int, q: float, expected: float, size: int, steps: int,
    eta: float, initial_step: int, seed: int, num_users: int | None = None,
) -> PoissonSampler:  # fmt: skip
    """The :class:`PoissonSampler` of ``dataset`` (marked for ``poisson_batches_of``)."""
    dataset.tf_autoclip_expected_batch_size = expected
    per_epoch = max(1, round(1.0 / q))  # one epoch in expectation
    epochs = math.ceil(steps / per_epoch)
    return PoissonSampler(
        dataset, n, q, expected, size, steps, per_epoch, epochs, eta, initial_step, seed, num_users
    )


def poisson_batches_of(dataset: Any) -> float | None:
    """The expected batch size of a ``poisson_sample`` dataset, or None for other data.

    A private model's fit reads it: it sets the optimizer's divisor to q·n and refuses
    microbatches.

    >>> s = poisson_sample(np.zeros((10, 1)), expected_batch_size=2, steps=1, seed=0)
    >>> poisson_batches_of(s.dataset), poisson_batches_of(np.zeros(3))
    (2, None)
    """
    return getattr(dataset, "tf_autoclip_expected_batch_size", None)


# --------------------------------------------------------------------------- #
# Helpers.
# --------------------------------------------------------------------------- #
def _validated_data(x: Any, y: Any, sample_weight: Any) -> tuple[dict[str, Any], int]:
    """``{"x": ..., "y": ..., "w": ...}`` as tensors (None entries left out), and n."""
    raw = {"x": x, "y": y, "w": sample_weight}
    data = {
        k: tf.nest.map_structure(tf.convert_to_tensor, v) for k, v in raw.items() if v is not None
    }
    n = _num_examples(data)
    if "w" in data:
        _check_weights(data["w"])
    return data, n


def _sampling_rate(
    n: int, sampling_probability: float | None, expected_batch_size: float | None
) -> tuple[float, float]:
    """q and the expected batch size q·n, from exactly one of them."""
    if (sampling_probability is None) == (expected_batch_size is None):
        raise ValueError("Give exactly one of sampling_probability and expected_batch_size.")
    if sampling_probability is not None:
        q = float(sampling_probability)
        if not 0.0 < q <= 1.0:
            raise ValueError(f"sampling_probability must be in (0, 1], got {q}.")
        return q, q * n
    if not 0.0 < expected_batch_size <= n:
        raise ValueError(
            f"expected_batch_size must be in (0, num_examples={n}], got {expected_batch_size}."
        )
    return expected_batch_size / n, expected_batch_size


def _step_range(q: float, steps: int | None, epochs: int | None, first: int) -> tuple[int, int]:
    """The total steps (from exactly one of ``steps`` and ``epochs``) and the first step."""
    if (steps is None) == (epochs is None):
        raise ValueError("Give exactly one of steps and epochs.")
    if epochs is not None:
        epochs = _non_negative_int("epochs", epochs)
        steps = accounting.steps_for_epochs(epochs, q)  # what from_target_epsilon assumes
    steps = _non_negative_int("steps", steps)
    first = _non_negative_int("initial_step", first)
    if first > steps:
        raise ValueError(f"initial_step={first} is beyond the last step ({steps}).")
    return steps, first


def _padded_size(
    n: int, q: float, steps: int, padded_batch_size: int | None, overflow_probability: float | None
) -> tuple[int, float]:
    """B (given, or the smallest within the overflow budget η) and its overflow probability."""
    budget = _OVERFLOW_FRACTION_OF_DELTA * default_delta(max(n, 3))
    if overflow_probability is not None:
        budget = float(overflow_probability)
        if not 0.0 < budget < 1.0:
            raise ValueError(f"overflow_probability must be in (0, 1), got {budget}.")
    if padded_batch_size is None:
        padded_batch_size = _smallest_padded_size(n, q, steps, budget)
    else:
        padded_batch_size = _non_negative_int("padded_batch_size", padded_batch_size)
        if padded_batch_size < 1:
            raise ValueError("padded_batch_size must be >= 1.")
    eta = _overflow_probability(n, q, steps, padded_batch_size)
    if eta > budget:
        warnings.warn(
            f"padded_batch_size={padded_batch_size} overflows with probability up to {eta:.3g} "
            f"over {steps} steps (budget {budget:.3g}); overflowing batches are truncated, "
            "which adds (1 + e^ε)·overflow_probability to δ. Report it with "
            "privacy_statement(..., overflow_probability=sampler.overflow_probability) or "
            "leave padded_batch_size=None.",
            UserWarning,
            stacklevel=3,
        )
    return padded_batch_size, eta


def _positive_int(name: str, value: Any) -> int:
    value = _non_negative_int(name, value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return value


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return int(value)


def _num_examples(data: dict[str, Any]) -> int:
    sizes = set()
    for leaf in tf.nest.flatten(data):
        if leaf.shape.rank == 0:
            raise ValueError("Every array in x, y and sample_weight needs a first (example) axis.")
        sizes.add(int(leaf.shape[0]))
    if len(sizes) != 1:
        raise ValueError(
            "x, y and sample_weight must have the same number of examples, got sizes "
            f"{sorted(sizes)}."
        )
    n = sizes.pop()
    if n < 1:
        raise ValueError("Cannot sample from an empty data set.")
    return n


def _check_weights(weights: Any) -> None:
    for w in tf.nest.flatten(weights):
        values = np.asarray(w, dtype=np.float64)
        if not np.all((values >= 0.0) & (values <= 1.0)):
            raise ValueError(
                "sample_weight values must lie in [0, 1]: a weight above 1 scales an example's "
                "influence beyond the sensitivity the noise is calibrated to. Rescale the "
                "weights (e.g. divide by their maximum) and adjust the learning rate instead."
            )


def _overflow_probability(n: int, q: float, steps: int, size: int) -> float:
    """Upper bound on P(any of `steps` batches has more than `size` examples), n + 1 examples."""
    per_step = float(stats.binom.sf(size, n + 1, q))
    return min(1.0, steps * per_step)


def _smallest_padded_size(n: int, q: float, steps: int, budget: float) -> int:
    if steps == 0:
        return max(1, math.ceil(q * n))
    size = int(stats.binom.isf(budget / steps, n + 1, q))
    size = min(max(size, 1), n + 1)
    while size <= n and _overflow_probability(n, q, steps, size) > budget:
        size += 1
    while size > 1 and _overflow_probability(n, q, steps, size - 1) <= budget:
        size -= 1
    return size


def _inclusion_threshold(q: float) -> int | None:
    """floor(q · 2^64) as an integer, or None for q = 1 (every example included)."""
    threshold = math.floor(Fraction(q) * 2**64)
    return None if threshold >= 2**64 else threshold


def _make_dataset(
    data: dict[str, Any],
    n: int,
    q: float,
    size: int,
    initial_step: int,
    steps: int,
    seed: int,
    separation: int = 1,
) -> tf.data.Dataset:
    """Steps ``initial_step .. steps - 1``: one Poisson sample per step, padded to ``size``
    (with ``separation`` b > 1, among the examples of the step's residue class mod b)."""
    threshold = _inclusion_threshold(q * separation)
    key = tf.constant([seed % 2**63, (seed // 2**63) % 2**63], dtype=tf.int64)
    residues = residue_classes(key, n, separation)

    def batch_for_step(step: tf.Tensor) -> tuple[Any, Any, tf.Tensor]:
        step_key = tf.random.experimental.stateless_fold_in(key, step)
        eligible = None if residues is None else tf.equal(residues, step % separation)
        selected, kept = _sample_indices(step_key, n, threshold, size, eligible)
        return _padded_batch(data, selected, kept, size)

    return (
        tf.data.Dataset.range(initial_step, steps)
        .map(batch_for_step, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def residue_classes(key: tf.Tensor, n: int, separation: int) -> tf.Tensor | None:
    """Each example's residue class of steps modulo b (uniform, fixed by the secret key), or
    None for b = 1. Drawn per example, so adding or removing one leaves the others'."""
    if separation == 1:
        return None
    draws = tf.random.stateless_uniform(
        [n],
        seed=tf.random.experimental.stateless_fold_in(key, -1),  # steps fold in t >= 0
        minval=None,
        maxval=None,
        dtype=tf.uint64,
    )
    return tf.cast(draws % separation, tf.int64)


def _sample_indices(
    step_key: tf.Tensor, n: int, threshold: int | None, size: int, eligible: Any = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """One step's sampled indices (sorted; a random ``size`` of them on overflow), and count.

    ``eligible``: a ``[n]`` mask of the examples this step may sample (all if None)."""
    if threshold is None:
        chosen = tf.ones([n], tf.bool)
    else:
        draws = tf.random.stateless_uniform(
            [n],
            seed=tf.random.experimental.stateless_fold_in(step_key, 0),
            minval=None,
            maxval=None,
            dtype=tf.uint64,
        )
        chosen = draws < tf.constant(threshold, tf.uint64)
    if eligible is not None:
        chosen = tf.logical_and(chosen, eligible)
    selected = tf.where(chosen)[:, 0]
    count = tf.size(selected)

    def truncate() -> tf.Tensor:
        shuffled = tf.random.experimental.stateless_shuffle(
            selected, seed=tf.random.experimental.stateless_fold_in(step_key, 1)
        )
        return tf.sort(shuffled[:size])

    selected = tf.cond(count > size, truncate, lambda: selected)
    return selected, tf.minimum(count, size)


def _padded_batch(
    data: dict[str, Any], selected: tf.Tensor, kept: tf.Tensor, size: int
) -> tuple[Any, Any, tf.Tensor]:
    """``(x, y, sample_weight)`` of the ``selected`` rows, zero-padded to ``size`` rows."""
    padding = size - kept

    def take(t: tf.Tensor) -> tf.Tensor:
        rows = tf.gather(t, selected)
        paddings = tf.concat([[[0, padding]], tf.zeros([t.shape.rank - 1, 2], tf.int32)], axis=0)
        out = tf.pad(rows, paddings, constant_values=tf.zeros([], t.dtype))
        out.set_shape([size, *t.shape[1:]])
        return out

    mask = tf.concat([tf.ones([kept]), tf.zeros([padding])], axis=0)
    mask.set_shape([size])

    def weigh(t: tf.Tensor) -> tf.Tensor:
        w = tf.cast(take(t), tf.float32)
        return w * tf.reshape(mask, [size] + [1] * (w.shape.rank - 1))

    weights = tf.nest.map_structure(weigh, data["w"]) if "w" in data else mask
    xb = tf.nest.map_structure(take, data["x"])
    yb = tf.nest.map_structure(take, data["y"]) if "y" in data else None
    return xb, yb, weights

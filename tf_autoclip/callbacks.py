"""Keras callback that tracks ε during training and enforces a privacy budget.

Example:
    >>> import keras
    >>> from tf_autoclip.callbacks import PrivacyCallback
    >>> cb = PrivacyCallback(num_examples=60000, batch_size=256, target_epsilon=3.0)
    >>> f"{cb.delta:.3g}"  # default_delta(60000)
    '1.51e-06'

    Use it as ``model.fit(..., callbacks=[cb, keras.callbacks.CSVLogger(...)])``:
    ``logs["epsilon"]`` then appears in the progress bar, ``History``, and the
    loggers listed after it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import keras

from tf_autoclip import _keras_compat
from tf_autoclip.accounting import (
    _check_accountant,
    _check_delta,
    _check_num_examples,
    _check_steps,
    _warn_if_delta_too_large,
    compute_epsilon,
    default_delta,
    steps_per_pass,
)

__all__ = ["PrivacyCallback"]

_SAMPLINGS = ("poisson", "shuffle")
# Beyond this many releases (2^40) the budget is treated as never exhausted.
_MAX_SEARCH_STEPS = 2**40


class PrivacyCallback(keras.callbacks.Callback):
    """Logs ε as ``logs["epsilon"]`` and stops training before it exceeds a budget.

    ε is computed from the compiled optimizer's attributes, so it follows the
    optimizer's state, including after ``keras.models.load_model`` or a
    checkpoint restore:

    * ``noise_multiplier`` (σ, noise std / sensitivity, assumed constant over
      the whole run; with ``num_microbatches`` the optimizer doubles the noise
      std, so σ keeps its meaning and is used as is);
    * ``iterations``: the noisy releases so far (saved with the model). With
      ``gradient_accumulation_steps=k`` Keras counts one iteration per k
      batches (``floor(batches / k)``), and noise is added once per k batches:
      one release samples a *logical batch* of k batches;
    * ``expected_batch_size``: the logical batch the noisy sum is divided by
      (k batches of ``expected_batch_size / k`` examples);
    * ``gradient_accumulation_steps`` (k, default 1).

    ``sampling="poisson"`` gives the ε of Poisson sampling with
    ``q = logical batch / num_examples`` per release (use
    :mod:`tf_autoclip.sampling`); ``sampling="shuffle"`` gives the conservative
    bound for shuffled fixed-size batches: each pass over the data
    (``steps_per_epoch`` batches, default ``ceil(num_examples / batch_size)``,
    a Keras epoch) adds one un-subsampled Gaussian release per example, see
    :func:`tf_autoclip.accounting.privacy_statement`. With k > 1 a release can
    straddle the end of one pass and the start of the next and then holds an
    example up to ``m`` times (sensitivity m, worth m² unit releases), so each
    pass is counted as m releases, m being the most passes one release can
    touch (m = 1 when k divides ``steps_per_epoch``).

    ``logs["epsilon"]`` is written at every epoch end and, with
    ``every_n_steps``, at the batch ends where the release count crosses a
    multiple of it. Place this callback *before* ``CSVLogger`` / ``TensorBoard``
    in the ``callbacks`` list so that they see the value.

    With ``target_epsilon``, training never takes a step that would bring ε
    above the target: after each execution the callback sets
    ``model.stop_training`` if the next execution (``steps_per_execution``
    batches) would complete a release beyond the budget, or if the budget is
    spent (no batch is then accumulated for a release that cannot happen), and
    ``on_train_begin`` raises ``RuntimeError`` in the same cases (Keras runs at
    least one execution before it looks at ``stop_training``).

    Args:
        num_examples: size n of the training set.
        delta: δ; default :func:`tf_autoclip.accounting.default_delta` (n).
        target_epsilon: optional ε budget (> 0).
        every_n_steps: also log ε every this many noisy releases (optimizer
            ``iterations``).
        accountant: ``"rdp"`` or ``"pld"``.
        sampling: ``"poisson"`` or ``"shuffle"``.
        batch_size: (expected) examples per batch, as given to ``fit`` (a release
            samples ``gradient_accumulation_steps`` of them). Default: the
            optimizer's ``expected_batch_size / gradient_accumulation_steps``.
            If the optimizer has an ``expected_batch_size``, they must agree
            (``ValueError`` otherwise).
        steps_per_epoch: for ``sampling="shuffle"``: batches per pass over the
            data. Default ``ceil(num_examples / batch_size)`` (Keras keeps the last,
            partial batch); pass ``floor(num_examples / batch_size)`` if the
            remainder is dropped.
        verbose: print a message when training is stopped (1) or not (0).

    Example:
        >>> cb = PrivacyCallback(num_examples=1000, delta=1e-5, target_epsilon=2.0)
        >>> cb.sampling, cb.accountant
        ('poisson', 'rdp')
    """

    def __init__(
        self,
        num_examples: int,
        delta: float | None = None,
        target_epsilon: float | None = None,
        every_n_steps: int | None = None,
        accountant: str = "rdp",
        sampling: str = "poisson",
        batch_size: int | None = None,
        verbose: int = 1,
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.num_examples = _check_num_examples(num_examples)
        self.delta = default_delta(self.num_examples) if delta is None else _check_delta(delta)
        _warn_if_delta_too_large(self.delta, self.num_examples)
        if target_epsilon is not None:
            target_epsilon = float(target_epsilon)
            if not 0.0 < target_epsilon < math.inf:
                raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon}.")
        self.target_epsilon = target_epsilon
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}.")
        self.every_n_steps = every_n_steps
        self.accountant = _check_accountant(accountant)
        if sampling not in _SAMPLINGS:
            raise ValueError(f"sampling must be 'poisson' or 'shuffle', got {sampling!r}.")
        self.sampling = sampling
        if batch_size is not None and not 0 < batch_size <= self.num_examples:
            raise ValueError(
                f"batch_size must be in (0, num_examples={self.num_examples}], got {batch_size}."
            )
        self.batch_size = batch_size
        if steps_per_epoch is not None and _check_steps(steps_per_epoch, "steps_per_epoch") < 1:
            raise ValueError("steps_per_epoch must be >= 1.")
        self.steps_per_epoch = steps_per_epoch
        self.verbose = verbose
        # Largest release count whose ε is within target_epsilon (set in on_train_begin).
        self.max_steps: int | None = None
        self._cached_epsilon: dict[tuple[float, float, int], float] = {}
        self._last_steps = 0

    # -- optimizer state ---------------------------------------------------------------
    def _optimizer(self):
        optimizer = self.model.optimizer
        # Unwrap keras.optimizers.LossScaleOptimizer (mixed precision).
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        if getattr(optimizer, "noise_multiplier", None) is None:
            raise ValueError(
                f"PrivacyCallback needs a DP optimizer with a `noise_multiplier` attribute, got "
                f"{type(optimizer).__name__}. Compile the model with a tf_autoclip optimizer, "
                "e.g. tf_autoclip.DPAutoAdam(noise_multiplier=..., expected_batch_size=...)."
            )
        return optimizer

    def _accumulation_steps(self) -> int:
        return max(1, int(getattr(self._optimizer(), "gradient_accumulation_steps", None) or 1))

    def _params(self) -> tuple[float, float, int, int]:
        """(σ, examples per release, batches per release k, batches per pass)."""
        optimizer = self._optimizer()
        sigma = float(optimizer.noise_multiplier)
        k = self._accumulation_steps()
        expected = getattr(optimizer, "expected_batch_size", None)
        if self.batch_size is not None:
            batch_size = float(self.batch_size)
            if expected is not None and not math.isclose(k * batch_size, expected, rel_tol=1e-9):
                accumulation = f" × gradient_accumulation_steps={k}" if k > 1 else ""
                raise ValueError(
                    f"PrivacyCallback(batch_size={self.batch_size}) contradicts the optimizer: it "
                    f"divides each noisy sum by expected_batch_size={expected} examples, but "
                    f"batch_size{accumulation} = {k * batch_size:g}. batch_size is the batch "
                    "size given to fit (one of the "
                    f"{k} batches of a noisy step); omit it to use the optimizer's "
                    f"expected_batch_size / {k} = {expected / k:g}."
                )
        elif expected is not None:
            batch_size = float(expected) / k
        else:
            raise ValueError(
                "PrivacyCallback cannot tell the sampling probability: pass batch_size= "
                "(examples per batch given to fit) or set the optimizer's expected_batch_size."
            )
        logical = k * batch_size
        if not 0 < logical <= self.num_examples:
            raise ValueError(
                f"A noisy step samples {logical:g} examples (batch_size={batch_size:g} × "
                f"gradient_accumulation_steps={k}), which is not in (0, num_examples="
                f"{self.num_examples}]: the sampling probability would exceed 1."
            )
        num_microbatches = getattr(optimizer, "num_microbatches", None)
        if (
            num_microbatches is not None
            and self.batch_size is not None
            and self.batch_size % num_microbatches
        ):
            raise ValueError(
                f"PrivacyCallback(batch_size={self.batch_size}) contradicts the optimizer's "
                f"num_microbatches={num_microbatches}: batches must be a multiple of it."
            )
        per_pass = self.steps_per_epoch or steps_per_pass(self.num_examples, batch_size)
        return sigma, logical, k, per_pass

    def _steps_done(self) -> int:
        """Noisy releases so far: Keras' ``iterations`` (``floor(batches / k)``)."""
        return int(keras.ops.convert_to_numpy(self._optimizer().iterations))

    def _batches_done(self) -> int:
        """Batches applied so far (released or still accumulating)."""
        optimizer = self._optimizer()
        raw = _keras_compat.applied_batches(optimizer)
        if raw is None:
            return self._steps_done() * self._accumulation_steps()
        return int(keras.ops.convert_to_numpy(raw))

    def _steps_per_execution(self) -> int:
        return max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))

    # -- accounting --------------------------------------------------------------------
    def _unit_releases(self, steps: int) -> int:
        """Shuffle bound: unit-sensitivity Gaussian releases equivalent to ``steps`` releases."""
        _, _, k, per_pass = self._params()
        passes = math.ceil(steps * k / per_pass)  # passes touched by the released batches
        # Most passes one window of k batches can touch (windows start at multiples of k,
        # passes at multiples of per_pass, so window offsets within a pass are multiples of
        # g = gcd): an example then appears up to m times in one release.
        g = math.gcd(k, per_pass)
        m = (per_pass - g + k - 1) // per_pass + 1
        # Σ_j c_j² <= m Σ_j c_j <= m · passes (c_j: appearances of one example in release j).
        return m * passes

    def epsilon(self, steps: int | None = None) -> float:
        """ε after ``steps`` noisy releases (default: the optimizer's ``iterations``)."""
        sigma, logical, _, _ = self._params()
        if steps is None:
            steps = self._steps_done()
        band_mf = getattr(self._optimizer(), "correlated_noise", None)
        if self.sampling == "poisson":
            key = (sigma, logical / self.num_examples, steps, band_mf)
        elif band_mf is not None and band_mf.num_bands > 1:
            raise ValueError(_SHUFFLE_WITH_BANDMF)
        else:
            key = (sigma, 1.0, self._unit_releases(steps), None)
        if key not in self._cached_epsilon:
            *args, noise = key
            self._cached_epsilon[key] = compute_epsilon(
                *args, self.delta, self.accountant, correlated_noise=noise
            )
        return self._cached_epsilon[key]

    def _max_steps_within_target(self) -> int:
        """Largest release count T with ε(T) <= target_epsilon (exact, by bisection)."""
        return _largest_within(lambda t: self.epsilon(t) <= self.target_epsilon)

    def _next_steps(self) -> tuple[int, int]:
        """(releases now, releases that continuing for one more execution commits to)."""
        steps, k = self._steps_done(), self._accumulation_steps()
        after = (self._batches_done() + self._steps_per_execution()) // k
        # Even an execution that completes no release accumulates batches for the next one.
        return steps, max(steps + 1, after)

    # -- Keras hooks -------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._cached_epsilon = {}
        self._params()  # validates the optimizer now rather than mid-epoch
        steps, upto = self._next_steps()
        self._last_steps = steps
        if self.target_epsilon is None:
            return
        self.max_steps = self._max_steps_within_target()
        if upto > self.max_steps:
            raise RuntimeError(
                f"PrivacyCallback: refusing to train. After {steps} noisy steps, the next "
                f"{self._steps_per_execution()} batch(es) would lead to {upto} steps and ε = "
                f"{self.epsilon(upto):.4g} > target_epsilon = {self.target_epsilon:g} "
                f"(δ = {self.delta:.3g}); the budget allows {self.max_steps} steps in total. "
                "Raise target_epsilon or noise_multiplier, or stop here."
            )

    def on_train_batch_end(self, batch, logs=None):
        if self.every_n_steps is None and self.target_epsilon is None:
            return
        steps, upto = self._next_steps()
        previous, self._last_steps = self._last_steps, steps
        n = self.every_n_steps
        if n is not None and logs is not None and steps // n != previous // n:
            logs["epsilon"] = self.epsilon(steps)
        if self.target_epsilon is not None and upto > self.max_steps:
            self.model.stop_training = True
            if self.verbose:
                print(
                    f"\nPrivacyCallback: stopping after {steps} steps at ε = "
                    f"{self.epsilon(steps):.4g} (δ = {self.delta:.3g}): the next "
                    f"{self._steps_per_execution()} batch(es) would exceed target_epsilon = "
                    f"{self.target_epsilon:g}."
                )

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epsilon"] = self.epsilon()

    def on_train_end(self, logs=None):
        k = self._accumulation_steps()
        pending = self._batches_done() % k
        if pending:
            warnings.warn(
                f"PrivacyCallback: training ended with {pending} of the "
                f"gradient_accumulation_steps={k} batches of the next noisy step accumulated. "
                "They are not released and not counted in ε, but the optimizer's accumulators "
                "hold their clipped sum without noise: do not save or publish the optimizer "
                "state before the step completes.",
                UserWarning,
                stacklevel=2,
            )


_SHUFFLE_WITH_BANDMF = (
    "PrivacyCallback(sampling='shuffle') has no bound for BandMF noise (correlated_noise): "
    "its per-pass bound assumes independent noise per step. Sample with "
    "poisson_sample(..., min_separation=num_bands) and use sampling='poisson'."
)


def _largest_within(ok: Callable[[int], bool]) -> int:
    """Largest k >= 0 with ok(k), for ok monotone (true then false) and ok(0) true."""
    lo, hi = 0, 1
    while ok(hi):
        lo, hi = hi, 2 * hi
        if hi > _MAX_SEARCH_STEPS:
            return _MAX_SEARCH_STEPS
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo

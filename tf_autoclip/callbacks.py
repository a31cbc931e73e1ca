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
from collections.abc import Callable

import keras

from tf_autoclip.accounting import (
    _check_accountant,
    _check_delta,
    _check_num_examples,
    _warn_if_delta_too_large,
    compute_epsilon,
    default_delta,
)

__all__ = ["PrivacyCallback"]

_SAMPLINGS = ("poisson", "shuffle")
# Beyond this many steps (2^40) the budget is treated as never exhausted.
_MAX_SEARCH_STEPS = 2**40


class PrivacyCallback(keras.callbacks.Callback):
    """Logs ε as ``logs["epsilon"]`` and stops training before it exceeds a budget.

    ε is computed from three attributes of the compiled optimizer, so it
    follows the optimizer's state, including after ``keras.models.load_model``
    or a checkpoint restore:

    * ``noise_multiplier`` (σ, noise std / sensitivity, assumed constant over
      the whole run);
    * ``iterations`` (steps applied so far; saved with the model);
    * ``expected_batch_size`` (used when ``batch_size`` is not given).

    ``sampling="poisson"`` gives the ε of Poisson sampling with
    ``q = batch_size / num_examples`` (use :mod:`tf_autoclip.sampling`);
    ``sampling="shuffle"`` gives the conservative bound for shuffled
    fixed-size batches (each pass of ``floor(num_examples / batch_size)``
    steps counted as one un-subsampled Gaussian release, see
    :func:`tf_autoclip.accounting.privacy_statement`).

    ``logs["epsilon"]`` is written at every epoch end and, with
    ``every_n_steps``, at the batch ends where the step count crosses a
    multiple of it. Place this callback *before* ``CSVLogger`` / ``TensorBoard``
    in the ``callbacks`` list so that they see the value.

    With ``target_epsilon``, training never takes a step that would bring ε
    above the target: after each execution the callback sets
    ``model.stop_training`` if the next execution (``steps_per_execution``
    steps) would exceed it, and ``on_train_begin`` raises ``RuntimeError`` if
    even the next execution is too much (Keras runs at least one execution
    before it looks at ``stop_training``).

    Args:
        num_examples: size n of the training set.
        delta: δ; default :func:`tf_autoclip.accounting.default_delta` (n).
        target_epsilon: optional ε budget (> 0).
        every_n_steps: also log ε every this many optimizer steps.
        accountant: ``"rdp"`` or ``"pld"``.
        sampling: ``"poisson"`` or ``"shuffle"``.
        batch_size: (expected) examples per step; default the optimizer's
            ``expected_batch_size``.
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
        self.verbose = verbose
        # Largest step count whose ε is within target_epsilon (set in on_train_begin).
        self.max_steps: int | None = None
        self._cached_params: tuple[float, float] | None = None
        self._cached_epsilon: dict[int, float] = {}
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

    def _sigma_and_batch_size(self) -> tuple[float, float]:
        optimizer = self._optimizer()
        sigma = float(optimizer.noise_multiplier)
        batch_size = self.batch_size
        if batch_size is None:
            batch_size = getattr(optimizer, "expected_batch_size", None)
        if batch_size is None:
            raise ValueError(
                "PrivacyCallback cannot tell the sampling probability: pass batch_size= "
                "(expected examples per step) or set the optimizer's expected_batch_size."
            )
        if not 0 < batch_size <= self.num_examples:
            raise ValueError(
                f"batch_size must be in (0, num_examples={self.num_examples}], got {batch_size}."
            )
        params = (sigma, float(batch_size))
        if params != self._cached_params:
            self._cached_params, self._cached_epsilon = params, {}
        return params

    def _steps_done(self) -> int:
        return int(keras.ops.convert_to_numpy(self._optimizer().iterations))

    def _steps_per_execution(self) -> int:
        return max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))

    # -- accounting --------------------------------------------------------------------
    def _steps_per_pass(self) -> int:
        """floor(n / batch_size): never more than the real steps per pass over the data."""
        _, batch_size = self._sigma_and_batch_size()
        return max(1, math.floor(self.num_examples / batch_size))

    def epsilon(self, steps: int | None = None) -> float:
        """ε after ``steps`` optimizer steps (default: the optimizer's ``iterations``)."""
        sigma, batch_size = self._sigma_and_batch_size()
        if steps is None:
            steps = self._steps_done()
        if steps not in self._cached_epsilon:
            if self.sampling == "poisson":
                q = batch_size / self.num_examples
                eps = compute_epsilon(sigma, q, steps, self.delta, self.accountant)
            else:
                passes = math.ceil(steps / self._steps_per_pass())
                eps = compute_epsilon(sigma, 1.0, passes, self.delta, self.accountant)
            self._cached_epsilon[steps] = eps
        return self._cached_epsilon[steps]

    def _max_steps_within_target(self) -> int:
        """Largest step count T with ε(T) <= target_epsilon (exact, by bisection)."""
        unit = 1 if self.sampling == "poisson" else self._steps_per_pass()
        # In "shuffle" mode ε only changes at pass boundaries: search over whole passes.
        within = _largest_within(lambda k: self.epsilon(k * unit) <= self.target_epsilon)
        return within * unit if within < _MAX_SEARCH_STEPS else _MAX_SEARCH_STEPS

    # -- Keras hooks -------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._cached_params = None
        self._sigma_and_batch_size()  # validates the optimizer now rather than mid-epoch
        self._last_steps = steps = self._steps_done()
        if self.target_epsilon is None:
            return
        self.max_steps = self._max_steps_within_target()
        chunk = self._steps_per_execution()
        if steps + chunk > self.max_steps:
            raise RuntimeError(
                f"PrivacyCallback: refusing to train. After {steps} steps, the next "
                f"{chunk} step(s) would give ε = {self.epsilon(steps + chunk):.4g} > "
                f"target_epsilon = {self.target_epsilon:g} (δ = {self.delta:.3g}); the budget "
                f"allows {self.max_steps} steps in total. Raise target_epsilon or "
                "noise_multiplier, or stop here."
            )

    def on_train_batch_end(self, batch, logs=None):
        if self.every_n_steps is None and self.target_epsilon is None:
            return
        steps, chunk = self._steps_done(), self._steps_per_execution()
        previous, self._last_steps = self._last_steps, steps
        n = self.every_n_steps
        if n is not None and logs is not None and steps // n != previous // n:
            logs["epsilon"] = self.epsilon(steps)
        if self.target_epsilon is not None and steps + chunk > self.max_steps:
            self.model.stop_training = True
            if self.verbose:
                print(
                    f"\nPrivacyCallback: stopping after {steps} steps at ε = "
                    f"{self.epsilon(steps):.4g} (δ = {self.delta:.3g}): the next {chunk} "
                    f"step(s) would exceed target_epsilon = {self.target_epsilon:g}."
                )

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epsilon"] = self.epsilon()


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

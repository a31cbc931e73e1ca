"""DP optimizers: any Keras optimizer, made to apply only private gradients.

``make_dp_optimizer_class(base)`` returns ``DPAuto<Base>``: the base optimizer with
the DP settings (clipping rule, noise multiplier, batch-size normalization, seed).
The private gradient of a batch is

    (sum_i c_i * g_i + sigma * S * z) / B,    z ~ N(0, I),

computed by ``tf_autoclip.private_gradients`` (or a private model's ``fit``) from the
settings held here; the base optimizer's own update then runs unchanged on it.
``apply_gradients`` refuses any gradient that this optimizer did not privatize, so a
model that is not private cannot train with a DP optimizer by mistake.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_autoclip import _keras_compat, mechanism
from tf_autoclip import batch_size as batch_size_lib
from tf_autoclip import clipping as clipping_lib
from tf_autoclip import correlated_noise as correlated_noise_lib
from tf_autoclip import noise as noise_lib


class NonPrivateGradientError(RuntimeError):
    """A DP optimizer was asked to apply gradients that were not privatized."""


_NON_PRIVATE_MESSAGE = (
    "{name} was asked to apply gradients that did not come through the private path, "
    "so training would not be differentially private. Wrap the model before compiling: "
    "`model = tf_autoclip.make_private(model)`, or in a custom training loop use "
    "`grads = tf_autoclip.private_gradients(model, x, y, optimizer=opt)` and pass exactly "
    "those tensors to `opt.apply_gradients`."
)

_BANDMF_REPLICAS = (
    "correlated_noise (BandMF) does not run under several replicas (tf.distribute) yet: "
    "its noise buffers would have to stay identical on every replica. Train on one "
    "replica, or use correlated_noise=None (DP-SGD)."
)

_REFUSED_BASE_ARGUMENTS = {
    "clipnorm": "use clipping='abadi' with l2_norm_clip=R for per-example clipping",
    "clipvalue": "use clipping='abadi' with l2_norm_clip=R for per-example clipping",
    "global_clipnorm": "use clipping='abadi' with l2_norm_clip=R for per-example clipping",
    "loss_scale_factor": "loss scaling is not supported by DP optimizers yet",
}


class DPOptimizerMixin:
    """Adds differential privacy to a Keras optimizer class (see module docstring).

    Args (keyword-only, besides the base optimizer's own):
      noise_multiplier: sigma >= 0; the noise std is ``sigma * S`` (S the sensitivity).
      clipping: ``"auto-s"`` (default), ``"auto-v"``, ``"abadi"`` or ``"global"``.
      gamma: stability constant of auto-s (default 0.01).
      l2_norm_clip: threshold R for ``"abadi"`` and ``"global"``.
      clipping_style: ``"all-layer"``, ``"per-layer"`` or a list of variable groups.
      expected_batch_size: the B the noisy sum is divided by (a data-independent
        constant). Default: fixed at the size of the first batch; a later batch of
        another size (e.g. the last, partial batch of an epoch) is refused, since
        dividing by it would release its size. Under Poisson sampling it is ``q * n``,
        which a private model's ``fit`` on ``poisson_sample``'s dataset sets itself.
      num_microbatches: clip the mean gradient of each of this many microbatches
        instead of each example. Adding or removing one example changes one
        microbatch, whose clipped mean can move by up to ``2 S``: the noise std is
        then ``2 * sigma * S`` so that ``noise_multiplier`` keeps its meaning for
        the accountant (this assumes neighbouring batches differ in one microbatch).
      seed: ``None`` (default): the noise key comes from the operating system's entropy
        and is never saved. An integer makes the noise reproducible, and so predictable
        by whoever knows it: for tests only (see ``tf_autoclip.noise``).
      correlated_noise: ``None`` (default, DP-SGD: independent noise per step) or
        ``tf_autoclip.BandMF(num_bands)``: noise correlated across steps, accounted with
        ``compute_epsilon(..., correlated_noise=...)`` on batches from
        ``poisson_sample(..., min_separation=num_bands)`` (``tf_autoclip.correlated_noise``).

    The base optimizer's ``gradient_accumulation_steps=k`` makes virtual batches: the
    clipped sums of k batches are accumulated and noise is added once, on the step that
    applies the update (``iterations`` counts these logical steps). Under
    ``tf.distribute`` the noise is added once to the global sum (see ``privatize``).
    ``clipnorm``, ``clipvalue``, ``global_clipnorm`` and ``loss_scale_factor`` are refused.
    """

    def __init__(
        self,
        *args: Any,
        noise_multiplier: float,
        clipping: str = "auto-s",
        gamma: float | None = None,
        l2_norm_clip: float | None = None,
        clipping_style: clipping_lib.ClippingStyle = "all-layer",
        expected_batch_size: int | None = None,
        num_microbatches: int | None = None,
        seed: int | None = None,
        correlated_noise: correlated_noise_lib.BandMF | None = None,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        for key, why in _REFUSED_BASE_ARGUMENTS.items():
            if kwargs.get(key) is not None:
                raise ValueError(f"{name} does not take {key}: {why}.")
        noise_multiplier = _real("noise_multiplier", noise_multiplier, minimum=0.0)
        if expected_batch_size is not None:
            expected_batch_size = _real("expected_batch_size", expected_batch_size, minimum=0.0)
            if expected_batch_size == 0:
                raise ValueError("expected_batch_size must be > 0, got 0.")
        if num_microbatches is not None:
            num_microbatches = _positive_int("num_microbatches", num_microbatches)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}.")
        config = clipping_lib.ClippingConfig(clipping, gamma, l2_norm_clip, clipping_style)
        band_mf = correlated_noise_lib.as_band_mf(correlated_noise)
        super().__init__(*args, **kwargs)
        self.noise_multiplier = noise_multiplier
        self.clipping_config = config
        self.expected_batch_size = expected_batch_size
        self.num_microbatches = num_microbatches
        self.seed = seed
        self._noise_key = noise_lib.NoiseKey(seed)
        self.correlated_noise = band_mf
        self._correlator = band_mf and correlated_noise_lib.NoiseCorrelator(band_mf)
        self._fixed_batch_size = batch_size_lib.FixedBatchSize()
        self._privatized: set[Any] = set()

    # -- the mechanism -------------------------------------------------------------
    def privatize(
        self,
        clipped_sum: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        num_units: tf.Tensor | int,
        data_independent_gradients: Sequence[tf.Tensor | None] | None = None,
    ) -> list[tf.Tensor]:
        """Noise and normalize a clipped sum; the result is what ``apply_gradients`` accepts.

        ``(clipped_sum + N(0, (sigma * S)^2 I)) / B``, where the divisor ``B`` and the
        sensitivity ``S`` are data-independent constants (``expected_batch_size``, or the
        batch size fixed at the first batch) and the noise seed a pure function of
        ``(key, step, draw)`` (``tf_autoclip.noise``).

        Args:
          clipped_sum: ``sum_i c_i g_i``, one tensor per variable.
          batch_size: rows in the batch (padding included).
          num_units: clipped units in the batch (examples, or microbatches).
          data_independent_gradients: gradients that do not depend on the data (weight
            regularizers), added after the noise.
        """
        rows = tf.cast(batch_size, tf.float32)
        units = tf.cast(num_units, tf.float32)
        replicas = _replicas_in_sync()
        if replicas > 1:  # the global batch is what the mechanism sees
            rows, units = tf.distribute.get_replica_context().all_reduce("sum", [rows, units])
        steps = self.gradient_accumulation_steps or 1
        fixed_rows = None
        if self.expected_batch_size is None or self.num_microbatches is not None:
            fixed_rows = self._fixed_batch_size.check(rows)
        calibration = mechanism.calibrate(
            noise_multiplier=self.noise_multiplier,
            sensitivity=self.clipping_config.sensitivity,
            fixed_rows=fixed_rows,
            expected_batch_size=self.expected_batch_size,
            num_units=units if self.num_microbatches is not None else None,
            accumulation_steps=steps,
            is_update_step=(self._iterations + 1) % steps == 0 if steps > 1 else True,
            replicas=replicas,
        )
        if self._correlator is not None and replicas > 1:
            raise ValueError(_BANDMF_REPLICAS)
        seed = self._noise_key.next_seed(self._step_counter())
        grads = mechanism.release(clipped_sum, calibration, seed, self._correlator)
        if data_independent_gradients is not None:
            grads = [
                g if extra is None else g + tf.cast(extra, g.dtype) / replicas
                for g, extra in zip(grads, data_independent_gradients, strict=True)
            ]
        self._privatized.update(g.ref() for g in grads)
        return grads

    def _step_counter(self) -> tf.Variable:
        """Counts every call of ``apply`` (accumulation steps included); saved."""
        raw = _keras_compat.applied_batches(self)
        return raw if raw is not None else self.iterations

    def apply(self, grads, trainable_variables=None):
        """Applies private gradients; raises ``NonPrivateGradientError`` for any other."""
        refs = [_ref(g) for g in grads if g is not None]
        if not all(r is not None and r in self._privatized for r in refs):
            raise NonPrivateGradientError(_NON_PRIVATE_MESSAGE.format(name=type(self).__name__))
        # Discard only these: replicas of a MirroredStrategy trace in parallel threads.
        self._privatized.difference_update(refs)
        return super().apply(grads, trainable_variables)

    def save_own_variables(self, store: Any) -> None:
        """Keras saving (``model.save``, ``save_weights``, ``ModelCheckpoint``,
        ``BackupAndRestore``): gradient accumulators are written as zeros.

        Between the updates of a virtual batch they hold the clipped sum of its first
        batches without noise (noise enters once, on the update step). Restoring zeros
        only shortens that one virtual batch; its divisor stays the same.
        """
        pending = {id(v) for v in _keras_compat.gradient_accumulators(self)}
        if not pending:  # no accumulation (and tf_keras' OptimizerV2 has no such saving)
            parent = getattr(super(), "save_own_variables", None)
            if parent is not None:
                parent(store)
            return
        for index, variable in enumerate(self.variables):  # as Keras' own, but for `pending`
            value = variable.numpy()
            store[str(index)] = np.zeros_like(value) if id(variable) in pending else value

    # -- construction from a privacy target --------------------------------------------
    @classmethod
    def from_target_epsilon(
        cls,
        *,
        target_epsilon: float,
        delta: float,
        num_examples: int,
        batch_size: int,
        epochs: float,
        accountant: str = "rdp",
        correlated_noise: correlated_noise_lib.BandMF | None = None,
        **kwargs: Any,
    ) -> DPOptimizerMixin:
        """The optimizer whose noise multiplier reaches ``target_epsilon`` after ``epochs``.

        Sets ``expected_batch_size=batch_size`` and calibrates sigma for Poisson sampling
        with ``q = batch_size / num_examples`` (with ``correlated_noise=BandMF(b)``, for
        ``poisson_sample(..., min_separation=b)``).

        >>> opt = DPAutoAdam.from_target_epsilon(target_epsilon=3.0, delta=1e-5,
        ...     num_examples=60000, batch_size=256, epochs=1, learning_rate=1e-3)
        >>> 0.3 < opt.noise_multiplier < 1.0
        True
        """
        from tf_autoclip import accounting

        sigma = accounting.compute_noise_multiplier(
            target_epsilon,
            delta,
            batch_size / num_examples,
            epochs=epochs,
            accountant=accountant,
            correlated_noise=correlated_noise,
        )
        return cls(
            noise_multiplier=sigma,
            expected_batch_size=batch_size,
            correlated_noise=correlated_noise,
            **kwargs,
        )

    # -- serialization ---------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            noise_multiplier=self.noise_multiplier,
            clipping=self.clipping_config.mode,
            gamma=self.clipping_config.gamma,
            l2_norm_clip=self.clipping_config.l2_norm_clip,
            clipping_style=clipping_lib.serializable_style(self.clipping_config.style),
            expected_batch_size=self.expected_batch_size,
            num_microbatches=self.num_microbatches,
            seed=self.seed,
            correlated_noise=None
            if self.correlated_noise is None
            else self.correlated_noise.get_config(),
        )
        for key in _REFUSED_BASE_ARGUMENTS:
            config.pop(key, None)
        return config


def _real(name: str, value: Any, minimum: float) -> float:
    """A finite real number >= minimum (booleans refused), as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}.")
    return float(value)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be an integer > 0, got {value!r}.")
    return int(value)


def _ref(tensor: Any) -> Any:
    try:
        return tensor.ref()
    except AttributeError:  # not a tensor at all
        return None


def _replicas_in_sync() -> int:
    if tf.distribute.in_cross_replica_context():
        return 1
    return tf.distribute.get_replica_context().num_replicas_in_sync


_DP_CLASSES: dict[type, type] = {}


def make_dp_optimizer_class(base_class: type, name: str | None = None) -> type:
    """The DP version of a Keras optimizer class (built-in or your own).

    The class is registered for Keras serialization as ``tf_autoclip>DPAuto<Base>``;
    call this again (before ``keras.models.load_model``) for your own base class.

    >>> DPAutoSGD = make_dp_optimizer_class(keras.optimizers.SGD)
    >>> opt = DPAutoSGD(learning_rate=0.1, noise_multiplier=1.0)
    >>> opt.clipping_config.mode, opt.noise_multiplier
    ('auto-s', 1.0)
    """
    if not (isinstance(base_class, type) and issubclass(base_class, keras.optimizers.Optimizer)):
        raise TypeError(
            f"base_class must be a keras.optimizers.Optimizer subclass, got {base_class!r}."
        )
    if issubclass(base_class, DPOptimizerMixin):
        raise TypeError(f"{base_class.__name__} is already a DP optimizer.")
    if base_class in _DP_CLASSES:
        return _DP_CLASSES[base_class]
    return dp_subclass(DPOptimizerMixin, base_class, name, keras.saving, _DP_CLASSES)


def dp_subclass(
    mixin: type, base_class: type, name: str | None, saving: Any, cache: dict[type, type]
) -> type:
    """``DPAuto<Base>(mixin, base_class)``, registered with ``saving`` and cached.

    Shared by the Keras 3 factory and the tf_keras one (``legacy.py``), which pass their
    own mixin and their Keras' ``saving`` module.
    """
    name = name or f"DPAuto{base_class.__name__}"
    doc = (
        f"Differentially private `{base_class.__module__}.{base_class.__name__}` with "
        f"automatic clipping.\n\n{DPOptimizerMixin.__doc__}"
    )
    cls = type(name, (mixin, base_class), {"__doc__": doc, "__module__": mixin.__module__})
    cls = saving.register_keras_serializable(package="tf_autoclip", name=name)(cls)
    cache[base_class] = cls
    return cls


DPAutoSGD = make_dp_optimizer_class(keras.optimizers.SGD)
DPAutoAdam = make_dp_optimizer_class(keras.optimizers.Adam)
DPAutoAdamW = make_dp_optimizer_class(keras.optimizers.AdamW)
DPAutoAdagrad = make_dp_optimizer_class(keras.optimizers.Adagrad)
DPAutoRMSprop = make_dp_optimizer_class(keras.optimizers.RMSprop)
DPAutoNadam = make_dp_optimizer_class(keras.optimizers.Nadam)
DPAutoAdamax = make_dp_optimizer_class(keras.optimizers.Adamax)
DPAutoAdadelta = make_dp_optimizer_class(keras.optimizers.Adadelta)
DPAutoAdafactor = make_dp_optimizer_class(keras.optimizers.Adafactor)
DPAutoFtrl = make_dp_optimizer_class(keras.optimizers.Ftrl)
DPAutoLion = make_dp_optimizer_class(keras.optimizers.Lion)

# Optimizers that Keras 3.0 lacks, with the Keras release that added each. Their DP classes
# exist only if the installed Keras has the base; `__getattr__` explains a missing one.
KERAS_VERSION_NEEDED = {
    "DPAutoLamb": "3.5.0",
    "DPAutoMuon": "3.10.0",
    "DPAutoScheduleFreeAdamW": "3.14.0",
}
if hasattr(keras.optimizers, "Lamb"):
    DPAutoLamb = make_dp_optimizer_class(keras.optimizers.Lamb)
if hasattr(keras.optimizers, "Muon"):
    DPAutoMuon = make_dp_optimizer_class(keras.optimizers.Muon)
if hasattr(keras.optimizers, "ScheduleFreeAdamW"):
    DPAutoScheduleFreeAdamW = make_dp_optimizer_class(keras.optimizers.ScheduleFreeAdamW)


def missing_optimizer_error(name: str) -> AttributeError:
    """The error for a ``DPAuto*`` class whose base the installed Keras lacks."""
    base = name.removeprefix("DPAuto")
    needed = KERAS_VERSION_NEEDED[name]
    return AttributeError(
        f"tf_autoclip.{name} needs Keras >= {needed}, which added keras.optimizers.{base}; "
        f"the installed Keras is {keras.__version__}. Upgrade with: pip install 'keras>={needed}'"
    )


def __getattr__(name: str) -> Any:
    if name in KERAS_VERSION_NEEDED:
        raise missing_optimizer_error(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

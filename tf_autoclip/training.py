"""The model side: private gradients for a batch, and Keras models whose ``fit`` uses them.

Keras 3's ``Model.fit`` differentiates the *mean* loss and hands the optimizer one
gradient; per-example clipping needs the per-example gradients first. A private model
replaces ``train_step`` with the DP step below; nothing else about ``fit``,
``evaluate``, ``predict``, callbacks or saving changes.

The DP step, as a composition of small transforms::

    per-example gradients  (per_example.per_unit_gradients)
    -> clip and sum         (clipping.clip_and_sum)
    -> noise and normalize  (DP optimizer's privatize: noise.noisy_average)
    -> base optimizer update (the DP optimizer's apply_gradients)

Weight regularizers (``kernel_regularizer=...``) do not depend on the data: their
gradient is added after the noise, unclipped. Under Abadi clipping with threshold R an
L2 strength lambda therefore corresponds to lambda / R under automatic clipping (SGD).
Activity regularizers depend on the example and are part of its clipped loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf
from keras.src.losses.loss import unscale_loss_for_distribution
from keras.src.models.functional import Functional

from tf_autoclip import clipping as clipping_lib
from tf_autoclip import engines, mechanism, per_example, sampling
from tf_autoclip.optimizers import DPOptimizerMixin

# Layers whose training-mode output or state depends on other examples of the batch.
_BATCH_MIXING_LAYERS = (keras.layers.BatchNormalization,)
_SUGGESTION = "GroupNormalization or LayerNormalization"


@dataclasses.dataclass
class PrivateStep:
    """One private step's results: what ``train_step`` needs besides the gradients."""

    gradients: list[tf.Tensor]
    loss: tf.Tensor  # mean loss over the batch, for logging (not private)
    y_pred: Any
    output_losses: list[tf.Tensor]
    norms: tf.Tensor  # [M, K] per-unit, per-group gradient norms before clipping


def check_per_example_layers(model: keras.Model) -> None:
    """Refuse models with layers that mix examples (their per-example gradient is undefined).

    >>> check_per_example_layers(keras.Sequential([keras.layers.BatchNormalization()]))
    Traceback (most recent call last):
    ...
    ValueError: Layer 'batch_normalization' (BatchNormalization) mixes examples within ...
    """
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, _BATCH_MIXING_LAYERS):
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) mixes examples within a batch "
                "(batch statistics, and moving averages released without noise), so it "
                f"cannot be trained with differential privacy. Use {_SUGGESTION} instead."
            )


def private_gradients(
    model: keras.Model,
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    optimizer: DPOptimizerMixin | None = None,
    loss: Callable[..., Any] | None = None,
    jit_per_example: bool | None = None,
    engine: str = "auto",
) -> list[tf.Tensor]:
    """The private gradients of one batch, ready for ``optimizer.apply_gradients``.

    For custom training loops. Uses the model's compiled loss unless ``loss`` (a Keras
    loss or ``fn(y_true, y_pred)``) is given, and the DP settings of ``optimizer``
    (default: the model's compiled optimizer).

    Example:

    >>> import numpy as np, tf_autoclip as ac
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> opt = ac.DPAutoSGD(learning_rate=0.1, noise_multiplier=1.0, seed=0)
    >>> x, y = np.ones((4, 3), "float32"), np.array([0, 1, 0, 1])
    >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    >>> grads = ac.private_gradients(model, x, y, optimizer=opt, loss=loss)
    >>> _ = opt.apply_gradients(zip(grads, model.trainable_variables))
    >>> int(opt.iterations)
    1
    """
    optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
    return private_step(
        model, optimizer, x, y, sample_weight, loss, jit_per_example, engine
    ).gradients


def private_step(
    model: keras.Model,
    optimizer: Any,
    x: Any,
    y: Any,
    sample_weight: Any,
    loss: Callable[..., Any] | None = None,
    jit_per_example: bool | None = None,
    engine: str = "auto",
) -> PrivateStep:
    """Per-example gradients -> clip and sum -> noise and normalize (see module doc)."""
    if not isinstance(optimizer, DPOptimizerMixin):
        raise TypeError(
            f"A private model needs a DP optimizer, got {type(optimizer).__name__}. Use e.g. "
            "`tf_autoclip.DPAutoAdam(learning_rate=..., noise_multiplier=...)`, or "
            "`tf_autoclip.make_dp_optimizer_class(YourOptimizer)`."
        )
    check_per_example_layers(model)
    check_private_training_hooks(model, ("compute_loss",))
    _check_dense_inputs((x, y, sample_weight))
    loss_fn = _unit_loss_fn(model, loss, (x, y, sample_weight))
    batch_size = _batch_size(x)
    num_units = batch_size
    if optimizer.num_microbatches is not None:
        num_units = mechanism.checked_num_microbatches(batch_size, optimizer.num_microbatches)
    variables = model.trainable_variables
    if not variables:
        raise ValueError(_NO_VARIABLES.format(name=model.name))
    request = engines.ClipRequest(
        model=model,
        loss_fn=loss_fn,
        x=x,
        y=y,
        sample_weight=sample_weight,
        num_units=num_units,
        groups=clipping_lib.group_variables(variables, optimizer.clipping_config.style),
        config=optimizer.clipping_config,
        jit_per_example=jit_per_example,
    )
    batch = engines.select_engine(engine, model, optimizer.num_microbatches)(request)
    gradients = optimizer.privatize(
        batch.clipped_sum, batch_size, num_units, _regularizer_gradients(model, variables)
    )
    return PrivateStep(
        gradients=gradients,
        loss=tf.reduce_mean(batch.losses) + _regularization_loss(model),
        y_pred=batch.y_pred,
        output_losses=[tf.reduce_mean(o) for o in batch.output_losses],
        norms=batch.norms,
    )


_NO_VARIABLES = (
    "Model {name!r} has no trainable variables, so there is nothing to train privately. "
    "Build the model (call it on an input, or give it a keras.Input) and check that its "
    "layers are trainable."
)

_MICROBATCHES_WITH_POISSON = (
    "num_microbatches cannot be used with Poisson-sampled batches (poisson_sample): the "
    "sampler lists the sampled examples in index order, so adding one example moves every "
    "later one to another microbatch, and the clipped sum can change by more than 2S. "
    "Clip per example (num_microbatches=None); the fast engines make that cheap."
)


_ACCUMULATION_WITH_POISSON = (
    "gradient_accumulation_steps cannot be used with Poisson-sampled batches "
    "(poisson_sample): k independently sampled batches under one noise draw are not a "
    "Poisson sample of the virtual batch (an example can be in several of them, which "
    "multiplies its weight), so the accountant's epsilon would not hold. Sample the virtual "
    "batch itself: poisson_sample(..., expected_batch_size=k * B), without accumulation."
)


def configure_for_data(model: keras.Model, x: Any) -> None:
    """What the data decides before a private ``fit``: ``poisson_sample`` batches set the
    optimizer's divisor to the expected batch size ``q·n`` (dividing by the padded size,
    or by the random number of sampled rows, would be wrong or release it) and refuse
    microbatches and gradient accumulation."""
    expected = sampling.poisson_batches_of(x)
    optimizer = getattr(model, "optimizer", None)
    if expected is None or not isinstance(optimizer, DPOptimizerMixin):
        return
    if optimizer.num_microbatches is not None:
        raise ValueError(_MICROBATCHES_WITH_POISSON)
    if optimizer.gradient_accumulation_steps:
        raise ValueError(_ACCUMULATION_WITH_POISSON)
    if optimizer.expected_batch_size is None:
        optimizer.expected_batch_size = float(expected)
        model.train_function = None  # traced with the old divisor, if at all


def _check_dense_inputs(data: Any) -> None:
    for value in tf.nest.flatten(data, expand_composites=False):
        if isinstance(value, (tf.RaggedTensor, tf.SparseTensor)):
            raise ValueError(
                f"{type(value).__name__} inputs are not supported by per-example clipping. Pad "
                "them to a dense tensor (`x.to_tensor()`, or `padded_batch` in tf.data) and "
                "let the model mask the padding (e.g. Embedding(mask_zero=True))."
            )


def check_private_training_hooks(
    model: keras.Model, hooks: tuple[str, ...] = ("train_step", "compute_loss")
) -> None:
    """Refuse models whose own ``train_step`` or ``compute_loss`` the DP step would bypass."""
    for hook in hooks:
        owner = next((k for k in type(model).__mro__ if hook in vars(k)), None)
        if owner is not None and not owner.__module__.startswith(("keras.", "tf_autoclip.")):
            raise ValueError(
                f"{owner.__name__} overrides {hook}(), which the private training step would "
                "bypass (it computes each example's loss itself). Compile the model with its "
                "loss instead, or keep your train_step and call "
                "`tf_autoclip.private_gradients(self, x, y, loss=...)` in it."
            )


def _batch_size(x: Any) -> tf.Tensor:
    first = tf.convert_to_tensor(tf.nest.flatten(x)[0])
    if first.shape[0] is not None:  # static where Keras knows it: cheaper, and checkable
        return tf.constant(first.shape[0])
    return tf.shape(first)[0]


def _regularization_loss(model: keras.Model) -> tf.Tensor:
    losses = model._get_regularization_losses()
    if not losses:
        return tf.constant(0.0)
    return tf.cast(tf.add_n([tf.cast(v, tf.float32) for v in losses]), tf.float32)


def _regularizer_gradients(model: keras.Model, variables: list[Any]) -> list[Any] | None:
    if not any(getattr(v, "regularizer", None) is not None for v in variables):
        return None
    with tf.GradientTape() as tape:
        reg = _regularization_loss(model)
    return tape.gradient(reg, variables)


def _unscale_for_replicas(value: tf.Tensor) -> tf.Tensor:
    """Keras divides reduced losses by the number of replicas; an example's loss is its own."""
    if value is None:
        return None
    return unscale_loss_for_distribution(value)


class _LossRecorder:
    """Stands in for CompileLoss' per-output loss metrics inside the vectorized pass."""

    def __init__(self) -> None:
        self.value = None

    def update_state(self, value, sample_weight=None):  # noqa: ARG002
        self.value = value


def _unit_loss_fn(model: keras.Model, loss: Any, data: Any) -> per_example.LossFn:
    if loss is not None:

        def custom(y, y_pred, sw):
            value = loss(y, y_pred, sw) if sw is not None else loss(y, y_pred)
            if isinstance(loss, keras.losses.Loss):
                value = _unscale_for_replicas(value)
            return tf.reduce_sum(value), []

        return custom
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is None:
        raise ValueError(
            "No loss: compile the model with a loss, or pass `loss=` to private_gradients."
        )
    if not compile_loss.built:
        model._symbolic_build(data_batch=data)

    def compiled(y, y_pred, sw):
        # Per-output loss metrics must not be updated per example inside vectorized_map;
        # record the values instead and update the real metrics once, outside.
        real = compile_loss._metrics
        recorders = [_LossRecorder() for _ in real]
        compile_loss._metrics = recorders
        try:
            value = compile_loss(y, y_pred, sw)
        finally:
            compile_loss._metrics = real
        return _unscale_for_replicas(value), [_unscale_for_replicas(r.value) for r in recorders]

    return compiled


class DPTrainStepMixin:
    """Makes ``fit`` and ``train_on_batch`` of a Keras model differentially private."""

    def compile(self, *args, **kwargs):
        """``keras.Model.compile``; under ``mixed_float16`` the loss is scaled per example.

        Keras would wrap the optimizer in a ``LossScaleOptimizer`` whose dynamic scale
        depends on the data; the DP step uses a static per-example scale instead
        (``per_example.float16_loss_scale``).
        """
        optimizer = kwargs.get("optimizer", args[0] if args else None)
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                "Pass the DP optimizer itself, not a LossScaleOptimizer: under mixed_float16 "
                "the private model scales each example's loss by a static factor."
            )
        kwargs["auto_scale_loss"] = False
        return super().compile(*args, **kwargs)

    def compile_from_config(self, config):
        # Keras skips compiling on load for models that override compile(); ours only
        # fixes auto_scale_loss, so compiling from the saved config is right.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, x=None, *args, **kwargs):
        """``keras.Model.fit``; with ``poisson_sample``'s dataset, the optimizer's
        ``expected_batch_size`` is set from it (see ``configure_for_data``)."""
        configure_for_data(self, x)
        return super().fit(x, *args, **kwargs)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        step = private_step(
            self, self.optimizer, x, y, sample_weight,
            jit_per_example=getattr(self, "_jit_per_example", None),
            engine=getattr(self, "_dp_engine", "auto"),
        )  # fmt: skip
        self.optimizer.apply_gradients(zip(step.gradients, self.trainable_variables))
        batch_size = _batch_size(x)
        self._loss_tracker.update_state(step.loss, sample_weight=batch_size)
        if self._compile_loss is not None:
            for metric, value in zip(self._compile_loss.metrics, step.output_losses, strict=False):
                metric.update_state(value, sample_weight=batch_size)
        logs = self.compute_metrics(x, y, step.y_pred, sample_weight=sample_weight)
        if isinstance(self._distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Keras 3.15 reduces multi-worker logs with strategy.reduce(..., axis=0), which
            # needs an axis: give each scalar one.
            logs = tf.nest.map_structure(lambda v: tf.reshape(v, [1]), logs)
        return logs

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.15 reduces the first distributed batch with strategy.reduce("MEAN") to
        # get shapes, which fails under MultiWorkerMirroredStrategy; one replica's batch
        # has the same shapes.
        if iterator is not None and self._distribute_strategy is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(_one_replica, next(it))
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)


def _one_replica(value: Any) -> Any:
    if isinstance(value, tf.distribute.DistributedValues):
        return value.values[0]
    return value


@keras.saving.register_keras_serializable(package="tf_autoclip")
class DPSequential(DPTrainStepMixin, keras.Sequential):
    """A ``keras.Sequential`` whose ``fit`` trains with differential privacy.

    >>> import tf_autoclip as ac
    >>> model = ac.DPSequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer=ac.DPAutoAdam(noise_multiplier=1.0), loss="mse")
    """


@keras.saving.register_keras_serializable(package="tf_autoclip")
class DPModel(DPTrainStepMixin, keras.Model):
    """A ``keras.Model`` (functional or subclassed) whose ``fit`` trains privately.

    Subclass it instead of ``keras.Model``, or build it functionally:
    ``DPModel(inputs, outputs)``.
    """


@keras.saving.register_keras_serializable(package="tf_autoclip")
class DPFunctional(DPTrainStepMixin, Functional):
    """What ``make_private`` turns a functional ``keras.Model(inputs, outputs)`` into."""


_SUBCLASS_CACHE: dict[type, type] = {}


def make_private(
    model: keras.Model, engine: str = "auto", jit_per_example: bool | None = None
) -> keras.Model:
    """Make an existing Keras model train privately with its compiled DP optimizer.

    Works for Sequential, functional and subclassed models; returns the same object
    (its class is switched to a private subclass, its layers and weights unchanged).
    Refuses layers that mix examples, such as BatchNormalization.

    Args:
      model: the model.
      engine: how per-example gradients are clipped: ``"auto"`` (the fastest engine
        that supports the model) or a name from ``tf_autoclip.engines.engine_names()``.
      jit_per_example: compile the per-example pass with XLA. ``None`` (default) does
        so only where needed (models with EinsumDense or MultiHeadAttention on
        oneDNN builds of TensorFlow; see ``per_example``).

    >>> import tf_autoclip as ac
    >>> model = ac.make_private(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
    >>> type(model).__name__
    'DPSequential'
    """
    check_per_example_layers(model)
    if model.built and not model.trainable_variables:
        raise ValueError(_NO_VARIABLES.format(name=model.name))
    if not isinstance(model, DPTrainStepMixin):
        check_private_training_hooks(model)
        model.__class__ = _private_class(type(model))
    if engine not in engines.engine_names():
        raise ValueError(f"Unknown engine={engine!r}; choose one of {engines.engine_names()}.")
    model._dp_engine = engine
    model._jit_per_example = jit_per_example
    if getattr(model, "train_function", None) is not None:
        model.train_function = None  # traced with the old train_step
    return model


def _private_class(cls: type) -> type:
    if cls is keras.Sequential:
        return DPSequential
    if cls is Functional:
        return DPFunctional
    if cls in _SUBCLASS_CACHE:
        return _SUBCLASS_CACHE[cls]
    # Keep the user's class identity for saving: a reloaded model is the user's class
    # again (not private; call make_private after loading). Its DP optimizer refuses to
    # train it until then, so nothing trains without privacy by mistake.
    private = type(cls.__name__, (DPTrainStepMixin, cls), {"__module__": cls.__module__})
    private.__qualname__ = cls.__qualname__
    from keras.src.saving import object_registration

    registered = keras.saving.get_registered_name(cls)
    object_registration.GLOBAL_CUSTOM_NAMES[private] = registered
    _SUBCLASS_CACHE[cls] = private
    return private

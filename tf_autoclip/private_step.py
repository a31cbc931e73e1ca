"""One private step for a batch: per-example losses -> engine -> ``optimizer.privatize``.

``private_step`` is what a private model's ``train_step`` runs (``training.py``, the
model side); ``private_gradients`` gives its gradients to custom training loops.

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

from tf_autoclip import clipping as clipping_lib
from tf_autoclip import engines, mechanism, per_example
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

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

from tf_autoclip import _keras_compat, engines, layer_safety, mechanism, per_example
from tf_autoclip import clipping as clipping_lib
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

    >>> check_per_example_layers(keras.Sequential([keras.layers.BatchNormalization(name="bn")]))
    Traceback (most recent call last):
    ...
    ValueError: Layer 'bn' (BatchNormalization) mixes examples within ...
    """
    for layer in _keras_compat.all_layers(model, include_self=False):
        if isinstance(layer, _BATCH_MIXING_LAYERS):
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) mixes examples within a batch "
                "(batch statistics, and moving averages released without noise), so it "
                f"cannot be trained with differential privacy. Use {_SUGGESTION} instead."
            )
    reason = layer_safety.input_pipeline_reason(model)
    if reason is not None:
        raise ValueError(f"Model {model.name!r} cannot be trained privately: {reason}")


def private_gradients(
    model: keras.Model,
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    optimizer: DPOptimizerMixin | None = None,
    loss: Callable[..., Any] | None = None,
    jit_per_example: bool | None = None,
    engine: str = "auto",
    user_ids: Any = None,
) -> list[tf.Tensor]:
    """The private gradients of one batch, ready for ``optimizer.apply_gradients``.

    For custom training loops. Uses the model's compiled loss unless ``loss`` (a Keras
    loss or ``fn(y_true, y_pred)``) is given, and the DP settings of ``optimizer``
    (default: the model's compiled optimizer).

    ``user_ids``: user-level DP (see :func:`private_step`): a ``[B]`` tensor of user ids
    (any integers or strings); each user's examples in the batch are summed, then
    clipped together, so one user weighs at most S whatever their number of examples.

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
        model, optimizer, x, y, sample_weight, loss, jit_per_example, engine, user_ids
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
    user_ids: Any = None,
) -> PrivateStep:
    """Per-example gradients -> clip and sum -> noise and normalize (see module doc).

    With ``user_ids`` (``[B]``, one id per example) the unit of privacy is the user: the
    clipped sum is ``sum_u c_u g_u`` with ``g_u = sum_{i in u} g_i`` the user's summed
    gradient and ``c_u`` its clip factor, so ``||c_u g_u|| <= S`` however many examples
    the user has; the noise is ``sigma * S``, the divisor the optimizer's
    ``expected_batch_size`` (required: the expected *users* per batch, never the number in
    the batch). The vectorized engine computes it (``"auto"`` picks it; the fast engines
    give per-example norms only). Microbatches and gradient accumulation are refused.
    """
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
    num_units, user_segments = _units(optimizer, batch_size, user_ids)
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
        user_segments=user_segments,
    )
    user_level = user_segments is not None
    batch = engines.select_engine(engine, model, optimizer.num_microbatches, user_level)(request)
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


def _units(optimizer: Any, batch_size: tf.Tensor, user_ids: Any) -> tuple[Any, Any]:
    """The number of clipped units, and for user-level clipping each example's dense user
    index (``tf.unique`` of ``user_ids``; the units are then the batch's distinct users)."""
    if user_ids is None:
        if optimizer.num_microbatches is None:
            return batch_size, None
        return mechanism.checked_num_microbatches(batch_size, optimizer.num_microbatches), None
    for setting in ("num_microbatches", "gradient_accumulation_steps"):
        if getattr(optimizer, setting, None):
            raise ValueError(_USER_LEVEL_REFUSES.format(setting=setting))
    if optimizer.expected_batch_size is None:
        raise ValueError(_USER_LEVEL_DIVISOR)
    if tf.distribute.get_strategy().num_replicas_in_sync > 1:
        raise ValueError(_USER_LEVEL_REFUSES.format(setting="several replicas (tf.distribute)"))
    if isinstance(user_ids, (tf.RaggedTensor, tf.SparseTensor)):
        raise ValueError("user_ids must be a dense [batch] tensor.")
    user_ids = tf.convert_to_tensor(user_ids)
    if not (user_ids.dtype.is_integer or user_ids.dtype == tf.string):
        raise ValueError(f"user_ids must be integers or strings, got {user_ids.dtype.name}.")
    if user_ids.shape.rank not in (None, 1):
        raise ValueError(f"user_ids must have shape [batch], got {user_ids.shape}.")
    check = tf.debugging.assert_equal(
        tf.size(user_ids), tf.cast(batch_size, tf.int32), message=_USER_IDS_SIZE
    )
    with tf.control_dependencies([check]):
        users, segments = tf.unique(tf.reshape(user_ids, [-1]))
    return tf.size(users), segments


_USER_LEVEL_REFUSES = (
    "user_ids (user-level DP) cannot be combined with {setting}: a user's examples could "
    "then be clipped in several units of one release and weigh more than S together."
)
_USER_LEVEL_DIVISOR = (
    "user_ids (user-level DP) needs the optimizer's expected_batch_size, the expected "
    "number of users per batch (q * number of users; poisson_sample(..., user_ids=...) "
    "gives it, and fit on its dataset sets it): the divisor must not depend on how many "
    "users the batch holds."
)
_USER_IDS_SIZE = "user_ids must have one id per example of the batch."

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
    losses = _keras_compat.regularization_losses(model)
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
    return _keras_compat.unscale_loss_for_distribution(value)


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
    compile_loss = _keras_compat.compile_loss(model)
    if compile_loss is None:
        raise ValueError(
            "No loss: compile the model with a loss, or pass `loss=` to private_gradients."
        )
    _keras_compat.ensure_loss_built(model, data)

    def compiled(y, y_pred, sw):
        # Per-output loss metrics must not be updated per example inside vectorized_map;
        # record the values instead and update the real metrics once, outside.
        with _keras_compat.loss_metrics_replaced(compile_loss, _LossRecorder) as recorders:
            value = compile_loss(y, y_pred, sw)
        return _unscale_for_replicas(value), [_unscale_for_replicas(r.value) for r in recorders]

    return compiled

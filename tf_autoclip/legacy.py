"""DP optimizers for tf-keras (Keras 2, ``TF_USE_LEGACY_KERAS=1``): no model wrapper.

Keras 2's ``Model.train_step`` hands the optimizer the loss and the tape that recorded it,
``optimizer.minimize(loss, model.trainable_variables, tape=tape)``. Compiled with a loss of
``reduction=tf.keras.losses.Reduction.NONE``, that loss is the per-example loss vector, so
the optimizer alone can make the step private, as tensorflow-privacy's Keras optimizers do::

    import os; os.environ["TF_USE_LEGACY_KERAS"] = "1"   # before TensorFlow is imported
    import tensorflow as tf, tf_autoclip as ac

    model = tf.keras.Sequential([...])                   # a plain tf.keras model
    model.compile(
        optimizer=ac.DPAutoAdam(learning_rate=1e-3, noise_multiplier=1.1),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.NONE),
    )
    model.fit(x, y, batch_size=256, epochs=3)

The DP step, in ``compute_gradients`` (``_compute_gradients`` for the
``tf.keras.optimizers.legacy`` classes)::

    per-unit gradients   tape.jacobian of the per-unit losses (vectorized with pfor)
    -> clip and sum       clipping.clip_and_sum
    -> noise, normalize   DPOptimizerMixin.privatize (noise.noisy_average)
    -> base update        the tf_keras optimizer's apply_gradients

A unit is an example, or with ``num_microbatches=M`` a microbatch whose loss is the mean
of its examples' losses. A loss with more than one value per example (e.g. ``[batch,
time]``) is averaged over its non-batch axes. The DP arguments and their meaning are
those of the Keras 3 classes (``tf_autoclip.optimizers``); ``apply_gradients`` refuses
gradients that did not come from ``compute_gradients`` (``NonPrivateGradientError``).

Differences from the Keras 3 path: gradients are taken of the loss Keras 2 computed, so
whatever it contains (sample weights, ``loss_weights``, ``add_loss`` terms of shape
``[batch]``) is clipped with the example. Keras 2's compiled loss cannot add a weight
regularizer's scalar loss to an unreduced loss vector (``tf.add_n``: "Shapes must be equal
rank"), so models with ``kernel_regularizer`` fail in Keras before reaching the optimizer;
use decoupled weight decay (``DPAutoAdamW``, ``weight_decay=``) instead. Variables are
grouped by ``variable.name`` (e.g. ``"dense/kernel:0"``) for ``clipping_style``.

The per-example gradients come from ONE batched forward pass, so every layer must treat
the examples of a batch independently: a model with a layer that is not vouched for
(``tf_autoclip.layer_safety``: ``BatchNormalization``, ``Lambda``, unknown custom layers)
is refused at the first step. Use ``GroupNormalization`` or ``LayerNormalization``
instead of ``BatchNormalization``; vouch for a custom per-example layer with
``tf_autoclip.register_per_example_layer(YourLayer)``.

Importing this module does not import tf_keras: the classes are built on first use.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import keras
import tensorflow as tf

from tf_autoclip import _keras_compat, layer_safety, mechanism
from tf_autoclip import clipping as clipping_lib
from tf_autoclip import optimizers as optimizers_lib
from tf_autoclip.engines import vectorized as per_example
from tf_autoclip.optimizers import DPOptimizerMixin, NonPrivateGradientError

LEGACY_OPTIMIZER_NAMES = (
    "SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Nadam", "Adamax", "Adadelta",
    "Adafactor", "Ftrl", "Lion",
)  # fmt: skip

_SCALAR_LOSS_MESSAGE = (
    "{name} needs the per-example loss vector (shape [batch_size] or [batch_size, ...]), "
    "but got a scalar loss: a loss already reduced over the batch has no per-example "
    "gradients to clip, so the step could not be differentially private. Compile the "
    "model with an unreduced loss, e.g. `loss=tf.keras.losses.SparseCategoricalCrossentropy"
    "(from_logits=True, reduction=tf.keras.losses.Reduction.NONE)`."
)


def legacy_keras_requested() -> bool:
    """Whether ``TF_USE_LEGACY_KERAS`` asks for tf-keras (``tf.keras`` is Keras 2).

    >>> import os
    >>> legacy_keras_requested() == (
    ...     os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true", "yes"))
    True
    """
    return os.environ.get("TF_USE_LEGACY_KERAS", "").strip().lower() in ("1", "true", "yes")


def make_private(model: Any = None, *args: Any, **kwargs: Any) -> Any:  # noqa: ARG001
    """In legacy mode no wrapper is needed: this raises, and says what to do instead."""
    raise RuntimeError(
        "tf_autoclip.make_private is not needed with tf-keras (TF_USE_LEGACY_KERAS=1): "
        "compile the tf.keras model itself with a tf_autoclip DP optimizer (e.g. "
        "`tf_autoclip.DPAutoAdam(learning_rate=1e-3, noise_multiplier=1.1)`) and a loss "
        "with `reduction=tf.keras.losses.Reduction.NONE`; the optimizer computes, clips "
        "and noises the per-example gradients itself. (For a Keras 3 model, use "
        "`tf_autoclip.training.make_private` with the `tf_autoclip.optimizers` classes.)"
    )


class LegacyDPOptimizerMixin(DPOptimizerMixin):
    """The private gradient computation for a tf_keras optimizer (see module docstring).

    Reuses ``DPOptimizerMixin`` for the arguments, their validation, ``privatize``,
    ``from_target_epsilon`` and ``get_config``; adds the per-example gradients of the
    loss vector (``compute_gradients``) and the check in ``apply_gradients``.
    """

    gradient_accumulation_steps = None  # read by privatize; tf_keras has no accumulation

    # -- the private gradient ---------------------------------------------------------
    def private_gradients_and_variables(
        self, loss: Any, var_list: Any, tape: tf.GradientTape | None = None
    ) -> list[tuple[tf.Tensor, Any]]:
        """``[(private_gradient, variable)]`` for a per-example loss vector.

        Args:
          loss: the loss vector ``[batch_size, ...]`` recorded on ``tape``, or a
            callable returning it.
          var_list: the variables (or a callable returning them).
          tape: the ``tf.GradientTape`` that recorded ``loss`` (needed for a tensor).
        """
        name = type(self).__name__
        if not callable(loss) and tape is None:
            raise ValueError(
                f"{name}: `tape` is required when a tensor loss is passed (the tape that "
                "recorded the per-example loss vector)."
            )
        tape = tape if tape is not None else tf.GradientTape()
        if callable(loss):
            with tape:
                if not callable(var_list):
                    tape.watch(var_list)
                loss = loss()
        if callable(var_list):
            var_list = var_list()
        var_list = tf.nest.flatten(var_list)
        check_per_example_model(_calling_model(var_list), name)
        loss = tf.convert_to_tensor(loss)
        if loss.shape.rank == 0:
            raise ValueError(_SCALAR_LOSS_MESSAGE.format(name=name))
        if loss.shape.rank is None:
            raise ValueError(
                f"{name}: the loss has unknown rank; pass the per-example loss vector "
                "(shape [batch_size, ...])."
            )
        batch_size = _batch_size(loss)
        with tape:  # re-entered: the reduction to units must be differentiated too
            units = tf.reduce_mean(tf.reshape(tf.cast(loss, tf.float32), [batch_size, -1]), 1)
            num_units = batch_size
            if self.num_microbatches is not None:
                num_units = mechanism.checked_num_microbatches(batch_size, self.num_microbatches)
                units = tf.reduce_mean(tf.reshape(units, [num_units, -1]), 1)
        with per_example.rank_general_pfor_converters():  # pfor's NCHW BiasAddGrad fix
            per_unit = tape.jacobian(
                units,
                var_list,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
                experimental_use_pfor=True,
            )
        per_unit = [tf.cast(tf.convert_to_tensor(g), tf.float32) for g in per_unit]
        groups = clipping_lib.group_variables(var_list, self.clipping_config.style)
        clipped_sum, _ = clipping_lib.clip_and_sum(per_unit, groups, self.clipping_config)
        grads = self.privatize(clipped_sum, batch_size, num_units)
        return list(zip(grads, var_list, strict=True))

    def compute_gradients(self, loss, var_list, tape=None):
        """Private gradients of the per-example loss vector (tf_keras Optimizer API)."""
        return self.private_gradients_and_variables(loss, var_list, tape)

    def _compute_gradients(self, loss, var_list, grad_loss=None, tape=None):
        """Private gradients (``tf.keras.optimizers.legacy`` OptimizerV2 API)."""
        if grad_loss is not None:
            raise ValueError(f"{type(self).__name__} does not take grad_loss.")
        return self.private_gradients_and_variables(loss, var_list, tape)

    def get_gradients(self, loss, params):  # noqa: ARG002
        raise NotImplementedError(
            f"{type(self).__name__} does not support TF1 graph mode (get_gradients)."
        )

    def apply_gradients(self, grads_and_vars, *args, **kwargs):
        """Applies private gradients; raises ``NonPrivateGradientError`` for any other."""
        grads_and_vars = list(grads_and_vars)
        refs = [_ref(g) for g, _ in grads_and_vars if g is not None]
        if not all(r is not None and r in self._privatized for r in refs):
            raise NonPrivateGradientError(
                f"{type(self).__name__} was asked to apply gradients that did not come "
                "through the private path, so training would not be differentially "
                "private. Let the optimizer compute them: `model.compile(optimizer=...)` "
                "with a loss of reduction=NONE and `model.fit`, or in a custom loop "
                "`optimizer.minimize(loss_vector, variables, tape=tape)` / "
                "`optimizer.apply_gradients(optimizer.compute_gradients(loss_vector, "
                "variables, tape=tape))`."
            )
        self._privatized.difference_update(refs)
        return super().apply_gradients(grads_and_vars, *args, **kwargs)


def check_per_example_model(model: Any, name: str = "The DP optimizer") -> None:
    """Refuse a tf.keras model with a layer not vouched to treat examples independently.

    The per-example gradients come from one batched forward pass (``tape.jacobian``), so
    a layer mixing the examples of a batch (``BatchNormalization``, a ``Lambda`` using
    batch statistics, ...) would make each example's clipped gradient depend on the
    others. Which layers are vouched for: ``tf_autoclip.layer_safety``. Called at every
    DP step (once per trace under ``fit``) with the model found on the call stack.

    >>> check_per_example_model(None)
    Traceback (most recent call last):
    ...
    ValueError: The DP optimizer could not find the tf.keras model ...
    """
    if model is None:
        raise ValueError(
            f"{name} could not find the tf.keras model whose trainable variables it is "
            "given, so it cannot check that every layer treats examples independently. "
            "Call it as `model.fit` does: from a function where the model is a local "
            "variable (e.g. `self` in `train_step`, or `model` in a custom loop)."
        )
    reason = layer_safety.unvouched_reason(model)
    if reason is not None:
        raise ValueError(
            f"{name} cannot train this model privately: {reason} tf-keras takes every "
            "example's gradient from one batched forward pass, so every layer must treat "
            "the examples of a batch independently."
        )


def _calling_model(var_list: list[Any]) -> Any:
    """The nearest tf.keras model on the call stack that owns every variable of
    ``var_list`` (``self`` in ``Model.train_step``, or a local of a custom loop)."""
    wanted = {id(v) for v in var_list}
    frame = sys._getframe(1)
    while frame is not None:
        local = frame.f_locals
        for value in [local.get("self"), *local.values()]:
            if _is_model_owning(value, wanted):
                return value
        frame = frame.f_back
    return None


def _is_model_owning(value: Any, wanted: set[int]) -> bool:
    if not (_keras_compat.is_layer(value) and hasattr(value, "trainable_weights")):
        return False
    try:
        return wanted <= {id(v) for v in value.trainable_weights}
    except Exception:  # noqa: BLE001 - a half-built object on the stack: not the model
        return False


def _batch_size(loss: tf.Tensor) -> tf.Tensor:
    """Rows of the loss vector: static where known (checkable), else dynamic."""
    if loss.shape[0] is not None:
        return tf.constant(loss.shape[0])
    return tf.shape(loss)[0]


def _ref(tensor: Any) -> Any:
    try:
        return tensor.ref()
    except AttributeError:  # not a tensor at all
        return None


def _tf_keras() -> Any:
    try:
        import tf_keras
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "tf_autoclip's legacy (Keras 2) optimizers need tf-keras: "
            "`pip install tf-keras==<your TensorFlow version>.*`."
        ) from error
    return tf_keras


def _base_classes(tf_keras: Any) -> tuple[type, ...]:
    optimizers = tf_keras.optimizers
    return (optimizers.Optimizer, optimizers.legacy.Optimizer)


_DP_CLASSES: dict[type, type] = {}


def make_dp_optimizer_class(base_class: type, name: str | None = None) -> type:
    """The DP version of an optimizer class: tf_keras (Keras 2) or Keras 3.

    A subclass of ``tf_keras.optimizers.Optimizer`` (or of the OptimizerV2
    ``tf_keras.optimizers.legacy.Optimizer``) gets the legacy private gradient
    computation and is registered with tf_keras as ``tf_autoclip>DPAuto<Base>``; a Keras 3
    optimizer class is passed on to ``tf_autoclip.optimizers.make_dp_optimizer_class``.
    """
    if not isinstance(base_class, type):
        raise TypeError(f"base_class must be an optimizer class, got {base_class!r}.")
    if issubclass(base_class, DPOptimizerMixin):
        raise TypeError(f"{base_class.__name__} is already a DP optimizer.")
    if base_class in _DP_CLASSES:
        return _DP_CLASSES[base_class]
    if issubclass(base_class, keras.optimizers.Optimizer):
        return optimizers_lib.make_dp_optimizer_class(base_class, name)
    from_tf_keras = any(c.__module__.startswith("tf_keras") for c in base_class.__mro__)
    if not (from_tf_keras and issubclass(base_class, _base_classes(_tf_keras()))):
        raise TypeError(
            "base_class must be a tf_keras optimizer class (tf.keras.optimizers.* in legacy "
            f"mode) or a keras.optimizers.Optimizer subclass, got {base_class!r}."
        )
    return optimizers_lib.dp_subclass(
        LegacyDPOptimizerMixin, base_class, name, _tf_keras().saving, _DP_CLASSES
    )


def legacy_optimizer_classes() -> dict[str, type]:
    """``{"DPAutoAdam": ..., ...}`` for every built-in tf_keras optimizer."""
    optimizers = _tf_keras().optimizers
    return {
        f"DPAuto{n}": make_dp_optimizer_class(getattr(optimizers, n))
        for n in LEGACY_OPTIMIZER_NAMES
        if hasattr(optimizers, n)
    }


def __getattr__(attribute: str) -> Any:
    """``DPAutoAdam`` etc. are built (and tf_keras imported) on first access."""
    if attribute.startswith("DPAuto") and attribute[len("DPAuto") :] in LEGACY_OPTIMIZER_NAMES:
        classes = legacy_optimizer_classes()
        if attribute in classes:
            globals().update(classes)
            return classes[attribute]
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


__all__ = [
    "LEGACY_OPTIMIZER_NAMES",
    "LegacyDPOptimizerMixin",
    "NonPrivateGradientError",
    "check_per_example_model",
    "legacy_keras_requested",
    "legacy_optimizer_classes",
    "make_dp_optimizer_class",
    "make_private",
    *(f"DPAuto{n}" for n in LEGACY_OPTIMIZER_NAMES),
]

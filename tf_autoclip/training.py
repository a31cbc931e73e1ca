"""The model side: Keras models whose ``fit`` uses the private step.

Keras 3's ``Model.fit`` differentiates the *mean* loss and hands the optimizer one
gradient; per-example clipping needs the per-example gradients first. A private model
replaces ``train_step`` with the DP step of ``private_step.py``; nothing else about
``fit``, ``evaluate``, ``predict``, callbacks or saving changes. That module's
``private_step`` and ``private_gradients`` (for custom training loops) are re-exported here.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from tf_autoclip import _keras_compat, correlated_noise, engines, sampling
from tf_autoclip.optimizers import DPOptimizerMixin
from tf_autoclip.private_step import (  # noqa: F401 (re-exported: the public names)
    _NO_VARIABLES,
    PrivateStep,
    _batch_size,
    check_per_example_layers,
    check_private_training_hooks,
    private_gradients,
    private_step,
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
    _check_user_level_data(model, x)
    if expected is None or not isinstance(optimizer, DPOptimizerMixin):
        return
    if optimizer.num_microbatches is not None:
        raise ValueError(_MICROBATCHES_WITH_POISSON)
    if optimizer.gradient_accumulation_steps:
        raise ValueError(_ACCUMULATION_WITH_POISSON)
    _check_separation(optimizer, x)
    if optimizer.expected_batch_size is None:
        optimizer.expected_batch_size = float(expected)
        model.train_function = None  # traced with the old divisor, if at all


def _check_separation(optimizer: DPOptimizerMixin, x: Any) -> None:
    """BandMF's accounting needs each example's batches at least num_bands steps apart."""
    bands = correlated_noise.num_bands_of(optimizer.correlated_noise)
    separation = getattr(x, "tf_autoclip_min_separation", 1)
    if bands > separation:
        raise ValueError(
            f"The optimizer adds BandMF noise with num_bands={bands}, whose ε holds only if "
            f"each example's batches are at least {bands} steps apart, but this dataset "
            f"separates them by {separation}. Sample with "
            f"poisson_sample(..., min_separation={bands})."
        )


def _check_user_level_data(model: keras.Model, x: Any) -> None:
    """A user-level sampler's dataset needs a model made private with its ``user_id_key``
    (else the ids would reach the model, and examples would be clipped one by one while
    the batches and the accounting are per user), and vice versa."""
    data_key = getattr(x, "tf_autoclip_user_id_key", None)
    model_key = getattr(model, "_dp_user_id_key", None)
    if data_key is not None and data_key != model_key:
        raise ValueError(
            f"This dataset samples users (poisson_sample(..., user_ids=...)) and carries "
            f"their ids under x[{data_key!r}]: make the model private with "
            f"make_private(model, user_id_key={data_key!r}) to clip per user."
        )
    if model_key is not None and not data_key:
        raise ValueError(
            "This model clips per user (user_id_key), but fit was not given batches of "
            "sampled users: with examples sampled or shuffled one by one, a user's records "
            "spread over several batches and together weigh more than the sensitivity. "
            "Sample users with poisson_sample(..., user_ids=...); for batches you group by "
            "user yourself, call private_gradients(..., user_ids=...) in a training loop."
        )


def split_user_ids(x: Any, key: str) -> tuple[Any, tf.Tensor]:
    """``(inputs, user_ids)`` from a dict ``x`` holding the ids under ``key``.

    The model gets the remaining dict, or its value when one entry remains (the
    ``"inputs"`` that ``poisson_sample(..., user_ids=...)`` wraps non-dict inputs in).

    >>> inputs, ids = split_user_ids({"user_id": [7, 7], "inputs": [[1.0], [2.0]]}, "user_id")
    >>> inputs, ids
    ([[1.0], [2.0]], [7, 7])
    """
    if not isinstance(x, dict) or key not in x:
        raise ValueError(
            f"This model clips per user: its inputs must be a dict with the user ids under "
            f"{key!r} (make_private(..., user_id_key={key!r})), e.g. "
            f"{{{key!r}: ids, 'inputs': x}}; poisson_sample(..., user_ids=...) yields them."
        )
    rest = {k: v for k, v in x.items() if k != key}
    if len(rest) == 1:
        return next(iter(rest.values())), x[key]
    return rest, x[key]


def _without_user_ids(model: keras.Model, data: Any) -> Any:
    key = getattr(model, "_dp_user_id_key", None)
    if key is None or data is None:
        return data
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if isinstance(x, dict) and key in x:
        x = split_user_ids(x, key)[0]
    return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)


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
        user_ids = None
        if getattr(self, "_dp_user_id_key", None) is not None:
            x, user_ids = split_user_ids(x, self._dp_user_id_key)
        step = private_step(
            self, self.optimizer, x, y, sample_weight,
            jit_per_example=getattr(self, "_jit_per_example", None),
            engine=getattr(self, "_dp_engine", "auto"), user_ids=user_ids,
        )  # fmt: skip
        self.optimizer.apply_gradients(zip(step.gradients, self.trainable_variables))
        batch_size = _batch_size(x)
        _keras_compat.loss_tracker(self).update_state(step.loss, sample_weight=batch_size)
        compile_loss = _keras_compat.compile_loss(self)
        if compile_loss is not None:
            for metric, value in zip(compile_loss.metrics, step.output_losses, strict=False):
                metric.update_state(value, sample_weight=batch_size)
        logs = self.compute_metrics(x, y, step.y_pred, sample_weight=sample_weight)
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Keras 3.15 reduces multi-worker logs with strategy.reduce(..., axis=0), which
            # needs an axis: give each scalar one.
            logs = tf.nest.map_structure(lambda v: tf.reshape(v, [1]), logs)
        return logs

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # An override point of Keras' trainer (_keras_compat.MAYBE_SYMBOLIC_BUILD).
        # Keras 3.15 reduces the first distributed batch with strategy.reduce("MEAN") to
        # get shapes, which fails under MultiWorkerMirroredStrategy; one replica's batch
        # has the same shapes.
        if iterator is not None and _keras_compat.own_distribute_strategy(self) is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(_one_replica, next(it))
                break
            iterator = None
        data_batch = _without_user_ids(self, data_batch)
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
class DPFunctional(DPTrainStepMixin, _keras_compat.Functional):
    """What ``make_private`` turns a functional ``keras.Model(inputs, outputs)`` into."""


_SUBCLASS_CACHE: dict[type, type] = {}


def make_private(
    model: keras.Model,
    engine: str = "auto",
    jit_per_example: bool | None = None,
    user_id_key: str | None = None,
    low_memory: bool = False,
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
      user_id_key: user-level DP: training inputs are a dict holding each example's
        user id under this key (``poisson_sample(..., user_ids=...)`` yields them); the
        step strips it (``split_user_ids``) and clips each user's summed gradient
        (``private_gradients(..., user_ids=...)``). Set the optimizer's
        ``expected_batch_size`` to the expected users per batch (fit on the user
        sampler's dataset does). ``evaluate``/``predict`` take the inputs without ids.
      low_memory: trade speed for peak memory in the book-keeping engine (``"bk"``, which
        ``"auto"`` picks when it can): per-example gradients formed for a layer's norm
        are not kept until the clip factors exist; the clipped sum is recomputed as one
        matmul per layer instead (about one more weight-gradient product each): Dense,
        EinsumDense with a matrix-product equation, Conv1D/Conv2D and ReversibleEmbedding
        kernels (other rules' per-example tensors, e.g. biases, are small). The privacy
        guarantee and the result (up to rounding) are the same.

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
    if user_id_key is not None and not isinstance(user_id_key, str):
        raise ValueError(f"user_id_key must be a string, got {user_id_key!r}.")
    if not isinstance(low_memory, bool):
        raise ValueError(f"low_memory must be True or False, got {low_memory!r}.")
    model._dp_engine = engine
    model._dp_user_id_key = user_id_key
    model._jit_per_example = jit_per_example
    model._dp_low_memory = low_memory
    if getattr(model, "train_function", None) is not None:
        model.train_function = None  # traced with the old train_step
    return model


def _private_class(cls: type) -> type:
    if cls is keras.Sequential:
        return DPSequential
    if cls is _keras_compat.Functional:
        return DPFunctional
    if cls in _SUBCLASS_CACHE:
        return _SUBCLASS_CACHE[cls]
    # Keep the user's class identity for saving: a reloaded model is the user's class
    # again (not private; call make_private after loading). Its DP optimizer refuses to
    # train it until then, so nothing trains without privacy by mistake.
    private = type(cls.__name__, (DPTrainStepMixin, cls), {"__module__": cls.__module__})
    private.__qualname__ = cls.__qualname__
    _keras_compat.register_private_subclass_name(private, keras.saving.get_registered_name(cls))
    _SUBCLASS_CACHE[cls] = private
    return private

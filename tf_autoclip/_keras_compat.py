"""Every private Keras / TensorFlow API that ``tf_autoclip`` relies on, in one place.

Each entry below wraps exactly one private access, says which versions it was checked
against and why no public API serves. ``tests/keras_compat_test.py`` pins every entry:
when a Keras or TensorFlow upgrade breaks one, that test fails naming the entry to fix
here, instead of a training run failing (or silently slowing down) somewhere else.

Checked against Keras 3.15.1 and TensorFlow 2.21.0 unless an entry says otherwise.
Where a public equivalent exists it is used instead (``unscale_loss_for_distribution``,
``regularization_losses``; ``model.distribute_strategy`` in ``training.py``; the causal
padding of ``rules/conv.py`` and the channel groups of ``rules/normalization.py``).

Override points: :data:`MAYBE_SYMBOLIC_BUILD` names a private method of Keras' TensorFlow
trainer that ``training.DPTrainStepMixin`` overrides (it must keep that name).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import keras
import tensorflow as tf

# Keras 3.15.1: a tensor's Keras mask (which losses read) has no public getter or setter.
from keras.src.backend import get_keras_mask as get_mask  # noqa: F401
from keras.src.backend import set_keras_mask as set_mask  # noqa: F401

# Keras 3.15.1: functional models are instances of this class, which keras exposes only
# as what keras.Model(inputs, outputs) returns; make_private subclasses it.
from keras.src.models.functional import Functional  # noqa: F401 (part of this module's API)

# TF 2.21: pfor's converter registry and ``wrap`` have no public API (vectorized_map
# offers no way to replace a converter); see rank_general_pfor_converters.
from tensorflow.python.ops.parallel_for import pfor as _pfor_lib

_VERSIONS = f"Keras {keras.__version__}, TensorFlow {tf.__version__}"
_CHECKED = "Keras 3.15.1 and TensorFlow 2.21.0"


# -- layers -------------------------------------------------------------------------------
def all_layers(layer: Any, include_self: bool = True) -> list[Any]:
    """``layer`` (unless ``include_self=False``) and every layer nested in it, recursively.

    Keras 3.15.1 (and tf_keras 2.21): ``Layer._flatten_layers``; ``model.layers`` lists
    direct children only and misses sublayers tracked by custom layers and wrappers.

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
    >>> [type(l).__name__ for l in all_layers(model)]
    ['Sequential', 'InputLayer', 'Dense']
    """
    return list(layer._flatten_layers(include_self=include_self, recursive=True))


def direct_sublayers(layer: Any) -> list[Any]:
    """The layers ``layer`` tracks directly (not their sublayers), Keras 3 or tf_keras.

    Keras 3.15.1 / tf_keras 2.21: ``_flatten_layers(include_self=False, recursive=False)``;
    no public API lists the sublayers of an arbitrary layer."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def is_layer(obj: Any) -> bool:
    """Whether ``obj`` is a Keras 3 or tf_keras layer (not a ``keras.ops`` node).

    Duck-typed on ``_flatten_layers`` (Keras 3.15.1, tf_keras 2.21), so that tf_keras
    need not be imported: ``isinstance(obj, keras.layers.Layer)`` misses tf_keras layers.
    """
    return hasattr(obj, "_flatten_layers")


def seed_generators(model: Any) -> list[keras.random.SeedGenerator]:
    """The ``SeedGenerator``s of every layer of ``model``, each once, in layer order.

    Keras 3.15.1: ``Layer._seed_generators``; the generators' state variables are public
    (``non_trainable_variables``), the generators themselves are not.
    """
    found, seen = [], set()
    for layer in all_layers(model):
        for sg in getattr(layer, "_seed_generators", []):
            if id(sg) not in seen:
                seen.add(id(sg))
                found.append(sg)
    return found


def own_variables(layer: Any) -> list[Any]:
    """The variables ``layer`` created itself (not its sublayers'), each once.

    Keras 3.15.1: ``Layer._trainable_variables`` and ``_non_trainable_variables``; the
    public ``layer.variables`` also lists every sublayer's.
    """
    seen, found = set(), []
    for v in list(layer._trainable_variables) + list(layer._non_trainable_variables):
        if id(v) not in seen:
            seen.add(id(v))
            found.append(v)
    return found


def kernel_variable(layer: Any) -> Any:
    """The kernel variable of a Dense, EinsumDense or Conv layer.

    Keras 3.15.1: ``_kernel``; the public ``layer.kernel`` is a tensor under LoRA
    (``W + s A B``) or quantization, not the variable the rule reports gradients for.
    """
    return layer._kernel


def embeddings_variable(layer: Any) -> Any:
    """The table variable of an Embedding layer (``_embeddings``, Keras 3.15.1; the public
    ``layer.embeddings`` is a tensor under LoRA or quantization)."""
    return layer._embeddings


def call_has_training_arg(layer: Any) -> bool:
    """Whether ``layer.call`` takes ``training`` (Keras 3.15.1: ``_call_has_training_arg``,
    what ``Layer.__call__`` itself checks before passing it; True if unknown)."""
    return getattr(layer, "_call_has_training_arg", True)


def inbound_nodes(item: Any) -> list[Any]:
    """The call nodes of a layer or ``keras.ops`` operation in functional models, each
    with ``arguments.args`` (Keras 3.15.1: ``Operation._inbound_nodes``)."""
    return list(getattr(item, "_inbound_nodes", None) or [])


def build_input_shape(layer: Any) -> Any:
    """The (first) input shape ``layer`` was built with, or None (Keras 3.15.1:
    ``_build_shapes_dict``, one entry per build argument; tf_keras 2.21:
    ``_build_input_shape``)."""
    shapes = getattr(layer, "_build_shapes_dict", None) or {}
    shape = next(iter(shapes.values()), None)
    return shape if shape is not None else getattr(layer, "_build_input_shape", None)


def attention_axes(layer: Any) -> Any:
    """A ``MultiHeadAttention``'s attention axes as built, or None before build (Keras
    3.15.1: ``_attention_axes``; the constructor argument is not kept publicly)."""
    return getattr(layer, "_attention_axes", None)


# -- optimizers ---------------------------------------------------------------------------
def applied_batches(optimizer: Any) -> Any:
    """The counter of every ``apply`` call, accumulation steps included, or None if this
    optimizer has not created it yet (tf_keras' OptimizerV2 creates it lazily).

    Keras 3.15.1: ``Optimizer._iterations``; the public ``iterations`` counts updates only
    (``floor(batches / k)`` under ``gradient_accumulation_steps=k``).
    """
    return getattr(optimizer, "_iterations", None)


def gradient_accumulators(optimizer: Any) -> list[Any]:
    """The variables holding the summed gradients between the updates of a virtual
    batch (``gradient_accumulation_steps``), [] without accumulation.

    Keras 3.15.1: ``Optimizer._accumulated_gradients``; no public name lists them.
    """
    return list(getattr(optimizer, "_accumulated_gradients", None) or [])


# -- losses -------------------------------------------------------------------------------
def unscale_loss_for_distribution(value: Any) -> Any:
    """Undo the ``1 / num_replicas`` by which Keras losses scale their reduced value.

    Public code (tf.distribute, keras.ops), equal to Keras 3.15.1's private
    ``keras.src.losses.loss.unscale_loss_for_distribution`` on the TensorFlow backend.
    """
    num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if num_replicas > 1:
        value = keras.ops.multiply(value, keras.ops.cast(num_replicas, value.dtype))
    return value


def regularization_losses(model: Any) -> list[Any]:
    """The weight regularization losses of ``model``: ``v.regularizer(v)`` per trainable
    variable with a regularizer. Public code, equal to Keras 3.15.1's private
    ``Model._get_regularization_losses()`` outside a stateless scope (``model.losses``
    would also hold the activity losses of the last call)."""
    return [v.regularizer(v) for v in model.trainable_weights if v.regularizer is not None]


# -- the compiled loss and the trainer ----------------------------------------------------
def compile_loss(model: Any) -> Any:
    """The ``CompileLoss`` that ``model.compile(loss=...)`` made, or None.

    Keras 3.15.1: ``Trainer._compile_loss``; Keras exports it under no public name (the
    public ``compute_loss`` averages over the batch, per-example losses need the object).
    """
    return getattr(model, "_compile_loss", None)


def ensure_loss_built(model: Any, data_batch: Any) -> None:
    """Build ``model``'s compiled loss (and model) on ``data_batch`` if not yet built.

    Keras 3.15.1: ``Trainer._symbolic_build(data_batch=...)``, what ``fit`` itself calls;
    ``CompileLoss.build`` alone needs the model's symbolic outputs.
    """
    loss = compile_loss(model)
    if loss is not None and not loss.built:
        model._symbolic_build(data_batch=data_batch)


@contextlib.contextmanager
def loss_metrics_replaced(loss: Any, make: Callable[[], Any]) -> Iterator[list[Any]]:
    """Swap the per-output loss metrics of a ``CompileLoss`` for ``make()`` objects (one
    per metric, each with ``update_state(value, sample_weight=None)``) while the block
    runs; yields them. Keras 3.15.1: ``CompileLoss._metrics``, updated inside its
    ``call``; no public switch turns those updates off."""
    real = loss._metrics
    replacements = [make() for _ in real]
    loss._metrics = replacements
    try:
        yield replacements
    finally:
        loss._metrics = real


def loss_tracker(model: Any) -> Any:
    """The ``Mean`` metric that ``fit`` logs as ``"loss"``.

    Keras 3.15.1: ``Trainer._loss_tracker``; public only as an anonymous entry of
    ``model.metrics``.
    """
    return model._loss_tracker


def own_distribute_strategy(model: Any) -> Any:
    """The strategy ``model`` was created under, or None if created outside any.

    Keras 3.15.1 (TensorFlow trainer): ``_distribute_strategy``. The public
    ``model.distribute_strategy`` falls back to the current strategy, so it cannot tell
    "none"; ``_maybe_symbolic_build`` decides on exactly that.
    """
    return model._distribute_strategy


# Keras 3.15.1 (TensorFlow trainer): fit/evaluate call
# ``self._maybe_symbolic_build(iterator=..., data_batch=...)`` before the first step.
# An override point, not a call: training.DPTrainStepMixin overrides it by this name.
MAYBE_SYMBOLIC_BUILD = "_maybe_symbolic_build"


def register_private_subclass_name(private: type, registered: str) -> None:
    """Save instances of ``private`` under the registered name ``registered``, without
    making ``registered`` load as ``private``.

    Keras 3.15.1: ``keras.src.saving.object_registration.GLOBAL_CUSTOM_NAMES``; the public
    ``register_keras_serializable`` would also map the name back to ``private``.
    """
    from keras.src.saving import object_registration

    object_registration.GLOBAL_CUSTOM_NAMES[private] = registered


# -- TensorFlow ---------------------------------------------------------------------------
def in_xla_context() -> bool:
    """True while a function compiled with XLA (``jit_compile=True``) is being traced.

    TF 2.21: ``control_flow_util.GraphOrParentsInXlaContext``, what ``tf.function`` itself
    uses; TensorFlow has no public API for it. Raises (never guesses) without it: a wrong
    False makes conv rules pick a form ~150x slower under XLA.
    """
    try:
        from tensorflow.python.ops import control_flow_util

        check = control_flow_util.GraphOrParentsInXlaContext
    except (ImportError, AttributeError) as error:  # pragma: no cover - another TF
        raise RuntimeError(
            f"tf_autoclip cannot tell whether XLA is tracing with {_VERSIONS}: TensorFlow's "
            "private tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext is "
            f"gone (checked with {_CHECKED}). Use those versions, or update "
            "tf_autoclip/_keras_compat.py:in_xla_context for this TensorFlow."
        ) from error
    return bool(check(tf.compat.v1.get_default_graph()))


def pfor_converter_registry() -> dict[str, Any] | None:
    """pfor's ``{op type: converter}`` registry, or None if this TensorFlow has none.

    TF 2.21: ``pfor._pfor_converter_registry``; a converter takes pfor's private
    ``_PforInput`` (``stacked_input``, ``get_attr``) and returns :func:`pfor_wrap`.
    """
    registry = getattr(_pfor_lib, "_pfor_converter_registry", None)
    if not isinstance(registry, dict) or not hasattr(_pfor_lib, "wrap"):
        return None
    return registry


def pfor_wrap(output: tf.Tensor, is_stacked: bool) -> Any:
    """A pfor converter's result: ``output`` (stacked over the loop if ``is_stacked``).

    TF 2.21: ``pfor.wrap``."""
    return _pfor_lib.wrap(output, is_stacked)

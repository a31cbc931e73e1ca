"""Which layers treat each example of a batch independently ("vouched" layers).

The one-pass engines (``"bk"``, ``"ghost"``) and the tf-keras path run the whole batch
through the model at once and read example ``i``'s gradient from row ``i``. That is
private only if no layer lets example ``j`` change row ``i``: a Lambda standardizing by
batch statistics, ``UnitNormalization(axis=0)`` or the sign of a batch mean would make
each example's clipped gradient depend on the others, and the clipped sum's sensitivity
is no longer bounded. So these paths serve a model only if EVERY layer (and every
``keras.ops`` node of a functional model) is vouched for:

- a Keras built-in in :data:`_LAYERS` (one table for Keras 3 and tf_keras, by class
  name), whose check of its arguments (``axis``, ``stateful``, ...) passes;
- a class registered with :func:`register_per_example_layer`;
- a class with a layer rule (``layer_rules.register_layer_rule``) that serves it.

Vouching is for the class's own computation (its ``call``): a subclass that overrides
``call`` is not vouched, and sublayers are checked one by one. Containers
(``Sequential``, functional models) are vouched through their contents; a subclassed
``keras.Model`` is not, unless registered. Anything else (``Lambda``, ``TFSMLayer``,
unknown layers) is not vouched: ``engine="auto"`` then uses the vectorized engine (each
example alone), and tf-keras refuses the model. ``BatchNormalization`` is refused by
every engine (its moving statistics are updated from the data without noise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import tensorflow as tf

from tf_autoclip import rules as layer_rules

Check = Callable[[Any], "str | None"]  # (layer) -> why it mixes examples, or None

_COMPUTE_METHODS = ("call", "convolution_op")
_BUILTIN_MODULES = ("keras.", "tf_keras.")
_NOT_REVIEWED = "not reviewed for per-example behaviour (apply it in the input pipeline)"
_user_checks: dict[type, Check | None] = {}
_UNKNOWN = object()


# -- argument checks ----------------------------------------------------------------------
def _ranks(layer: Any) -> list[int]:
    """Ranks of the first input tensor of each call recorded on ``layer`` (functional
    graph nodes, Keras 3 or tf_keras), or of its build shape; [] if unknown."""
    ranks = []
    for node in getattr(layer, "_inbound_nodes", []) or []:
        tensors = _node_inputs(node)
        if tensors and getattr(tensors[0], "shape", None) is not None:
            ranks.append(len(tensors[0].shape))
    if ranks:
        return ranks
    shapes = getattr(layer, "_build_shapes_dict", None) or {}
    shape = next(iter(shapes.values()), None)
    if shape is None:
        shape = getattr(layer, "_build_input_shape", None)
    try:
        return [len(shape)] if shape is not None and not isinstance(shape[0], list) else []
    except (TypeError, IndexError, ValueError):
        return []


def _node_inputs(node: Any) -> list[Any]:
    arguments = getattr(node, "arguments", None)  # Keras 3
    if arguments is not None:
        return list(arguments.keras_tensors)
    return list(getattr(node, "keras_inputs", []) or [])  # tf_keras


def _batch_axis_reason(axes: Any, ranks: Sequence[int], what: str = "axis") -> str | None:
    """Why ``axes`` may include the batch axis 0 for inputs of these ranks, or None.
    An unknown rank (a sublayer called outside a functional graph) is taken to be at
    least 2, as every Keras input has a batch axis and a feature axis: only -1 passes."""
    if axes is None:
        return f"{what}=None includes the batch axis"
    for axis in axes if isinstance(axes, list | tuple) else [axes]:
        axis = int(axis)
        if axis == 0:
            return f"{what}={axes!r} includes the batch axis 0"
        if axis < -1 and not ranks:  # rank unknown (not in a functional graph): >= 2
            return f"{what}={axes!r} with an unknown input rank (use a positive axis)"
        if axis < 0 and any(axis + rank <= 0 for rank in ranks):
            return f"{what}={axes!r} is the batch axis for inputs of rank {min(ranks)}"
    return None


def _axis(attribute: str = "axis", none_ok: bool = False) -> Check:
    def check(layer: Any) -> str | None:
        axes = getattr(layer, attribute)
        if axes is None and none_ok:
            return None
        return _batch_axis_reason(axes, _ranks(layer), attribute)

    return check


def _not_stateful(layer: Any) -> str | None:
    if getattr(layer, "stateful", False):
        return "stateful=True carries each row's state into the next batch"
    return None


def _attention_axes(layer: Any) -> str | None:
    axes = getattr(layer, "_attention_axes", None)
    return None if axes is None else _batch_axis_reason(axes, _ranks(layer), "attention_axes")


def _dot_axes(layer: Any) -> str | None:
    return _batch_axis_reason(layer.axes, _ranks(layer), "axes")


def _einsum_keeps_batch(layer: Any) -> str | None:
    inputs, _, output = layer.equation.replace(" ", "").partition("->")
    first = inputs.split(",")[0]
    lead = "..." if first.startswith("...") else first[:1]
    if lead and output.startswith(lead):
        return None
    return f"equation {layer.equation!r} does not keep the batch axis first"


def _transpose_keeps_batch(op: Any) -> str | None:
    if op.axes is not None and int(op.axes[0]) == 0:
        return None
    return f"axes={op.axes!r} moves the batch axis"


def _no_top_db(layer: Any) -> str | None:
    if getattr(layer, "top_db", None) is not None:
        return "top_db clips at the maximum over the whole batch (pass top_db=None)"
    return None


# tf_keras turns tf ops on symbolic tensors into TFOpLambda layers; elementwise ones only.
_ELEMENTWISE_TF_SYMBOLS = frozenset(
    f"{prefix}{name}"
    for prefix in ("math.", "__operators__.", "nn.", "")
    for name in (
        "add", "subtract", "multiply", "truediv", "divide", "maximum", "minimum", "pow",
        "abs", "negative", "exp", "log", "sqrt", "square", "tanh", "sigmoid", "relu",
        "relu6", "gelu", "silu", "elu", "selu", "softplus", "cast", "sign",
    )
)  # fmt: skip


def _elementwise_tf_op(layer: Any) -> str | None:
    symbol = getattr(layer, "symbol", None)
    if symbol not in _ELEMENTWISE_TF_SYMBOLS:
        return f"tf op {symbol!r} is not known to act on each example alone"
    return _same_rank_operands(layer)


def _same_rank_operands(op: Any) -> str | None:
    """Elementwise ops are per-example when no operand of lower rank is broadcast (a
    lower rank would align the batch axis with another axis)."""
    for node in getattr(op, "_inbound_nodes", []) or []:
        outputs = tf.nest.flatten(getattr(node, "outputs", None))
        rank = len(outputs[0].shape) if outputs else None
        if any(len(t.shape) != rank for t in _node_inputs(node)):
            return "broadcasts operands of different ranks (the batch axis may align with another)"
    return None


def _names(text: str) -> list[str]:
    return text.split()


_BATCH_STATISTICS = "normalizes by batch statistics, and updates moving statistics from the data"
_VOUCHED = """
    Activation ELU LeakyReLU ReLU PReLU ThresholdedReLU Identity InputLayer Masking Dropout
    AlphaDropout GaussianDropout GaussianNoise SpatialDropout1D SpatialDropout2D
    SpatialDropout3D Flatten Reshape Permute RepeatVector Cropping1D Cropping2D Cropping3D
    ZeroPadding1D ZeroPadding2D ZeroPadding3D UpSampling1D UpSampling2D UpSampling3D
    AveragePooling1D AveragePooling2D AveragePooling3D MaxPooling1D MaxPooling2D MaxPooling3D
    GlobalAveragePooling1D GlobalAveragePooling2D GlobalAveragePooling3D GlobalMaxPooling1D
    GlobalMaxPooling2D GlobalMaxPooling3D AdaptiveAveragePooling1D AdaptiveAveragePooling2D
    AdaptiveAveragePooling3D AdaptiveMaxPooling1D AdaptiveMaxPooling2D AdaptiveMaxPooling3D
    Add Subtract Multiply Average Maximum Minimum Dense Embedding ReversibleEmbedding Conv1D
    Conv2D Conv3D Conv1DTranspose Conv2DTranspose Conv3DTranspose DepthwiseConv1D
    DepthwiseConv2D SeparableConv1D SeparableConv2D LocallyConnected1D LocallyConnected2D
    GRUCell LSTMCell SimpleRNNCell StackedRNNCells AbstractRNNCell Attention AdditiveAttention
    GroupedQueryAttention Bidirectional TimeDistributed SpectralNormalization Sequential
    Functional Pipeline Rescaling Resizing CenterCrop RandomCrop RandomFlip RandomRotation
    RandomTranslation RandomZoom RandomHeight RandomWidth RandomShear RandomPerspective
    RandomBrightness RandomContrast AutoContrast RandomGrayscale RandomHue RandomSaturation
    RandomSharpness RandomInvert RandomPosterization Solarization RandomColorDegeneration
    RandomColorJitter RandomGaussianBlur RandomErasing RandomElasticTransform STFTSpectrogram
    CategoryEncoding Discretization Hashing HashedCrossing IntegerLookup StringLookup
    TextVectorization
"""
_AXIS_CHECKED = """
    Softmax UnitNormalization LayerNormalization RMSNormalization GroupNormalization Concatenate
"""
_STATEFUL_CHECKED = "RNN SimpleRNN LSTM GRU ConvLSTM1D ConvLSTM2D ConvLSTM3D"
_NOT_REVIEWED_NAMES = """
    AugMix RandAugment Equalization ContrastLimitedAdaptiveHistogramEqualization
    MaxNumBoundingBoxes
"""

# -- the table: every class of keras.layers (Keras 3.15) and tf_keras.layers ---------------
# None: vouched; a Check: vouched when it returns None; a str: not vouched, and why.
_LAYERS: dict[str, Check | str | None] = {
    **dict.fromkeys(_names(_VOUCHED)),
    **dict.fromkeys(_names(_AXIS_CHECKED), _axis()),
    **dict.fromkeys(_names(_STATEFUL_CHECKED), _not_stateful),
    "Normalization": _axis(none_ok=True),  # adapted constants; axis=None: scalar ones
    "EinsumDense": _einsum_keeps_batch,
    "MultiHeadAttention": _attention_axes,
    "Dot": _dot_axes,
    "MelSpectrogram": _no_top_db,
    "TFOpLambda": _elementwise_tf_op,  # tf_keras: a tf op called on symbolic tensors
    "BatchNormalization": _BATCH_STATISTICS,
    "SyncBatchNormalization": _BATCH_STATISTICS,
    "Lambda": "runs arbitrary code",
    "TFSMLayer": "runs an opaque SavedModel",
    "JaxLayer": "runs opaque JAX code",
    "FlaxLayer": "runs opaque Flax code",
    "TorchModuleWrapper": "runs opaque PyTorch code",
    "MixUp": "mixes pairs of examples by design",
    "CutMix": "mixes pairs of examples by design",
    "ActivityRegularization": "adds a loss computed over the whole batch",
    "Layer": "is a custom layer with its own call",
    "Model": "is a subclassed model with its own call",
    "Wrapper": "is an abstract wrapper",
    "DenseFeatures": "reads feature columns (not reviewed)",
    **dict.fromkeys(_names(_NOT_REVIEWED_NAMES), _NOT_REVIEWED),
}

_NEVER_VOUCHED = {
    "BatchNormalization": "it normalizes by batch statistics. Use GroupNormalization or "
    "LayerNormalization instead.",
    "SyncBatchNormalization": "it normalizes by batch statistics. Use GroupNormalization or "
    "LayerNormalization instead.",
    "Lambda": "that would vouch for every Lambda. Move the function into a custom layer "
    "and vouch for that class.",
}

# keras.ops nodes of a Keras 3 functional model: Operation class name -> check.
_ELEMENTWISE_OPS = """
    Add Subtract Multiply Divide TrueDivide Maximum Minimum Power Absolute Negative Exp Log
    Log1p Expm1 Sqrt Square Tanh Sign Clip Reciprocal Sin Cos Floor Round Ceil Where Relu
    Relu6 Sigmoid Gelu Silu Elu Selu LeakyRelu Softplus Softsign HardSigmoid HardSilu
"""
_AXIS_OPS = """
    Mean Sum Max Min Std Var Softmax LogSoftmax Concatenate Flip Roll Cumsum Cumprod Argmax
    Argmin ExpandDims Squeeze
"""
_OPS: dict[str, Check | None] = {
    **dict.fromkeys(_names(_ELEMENTWISE_OPS), _same_rank_operands),
    **dict.fromkeys(_names(_AXIS_OPS), _axis()),
    "Transpose": _transpose_keeps_batch,
    "Cast": None,
}


# -- public API ---------------------------------------------------------------------------
def register_per_example_layer(layer_class: type, check: Check | None = None) -> None:
    """Vouch that ``layer_class`` treats every example of a batch independently.

    Row ``i`` of its outputs must depend on row ``i`` of its inputs only (and on
    weights and randomness that do not depend on the data): no batch statistics, no
    reduction, reshape or sort over the batch axis 0. Then the one-pass engines
    (``"bk"``, ``"ghost"``) and the tf-keras path may serve models that contain it.
    Subclasses that override ``call`` are not vouched; sublayers are still checked.

    Args:
      layer_class: a Keras 3 or tf_keras layer class (or model class); not
        ``BatchNormalization`` (moving statistics) nor ``Lambda`` (every Lambda).
      check: optional ``check(layer) -> str | None``, why this instance (given its
        arguments) mixes examples, or None when it does not.

    >>> import keras, tf_autoclip as ac
    >>> class Double(keras.layers.Layer):
    ...     def call(self, x):
    ...         return 2.0 * x
    >>> model = keras.Sequential([keras.Input((3,)), Double(), keras.layers.Dense(2)])
    >>> ac.unvouched_reason(model) is None
    False
    >>> ac.register_per_example_layer(Double)
    >>> ac.unvouched_reason(model) is None
    True
    """
    if not isinstance(layer_class, type):
        raise TypeError(
            f"register_per_example_layer takes a layer class, got {layer_class!r}; pass "
            "type(layer) or the class itself."
        )
    name = layer_class.__name__
    if name in _NEVER_VOUCHED and layer_class.__module__.startswith(_BUILTIN_MODULES):
        raise ValueError(f"{name} cannot be vouched for: {_NEVER_VOUCHED[name]}")
    _user_checks[layer_class] = check


def unregister_per_example_layer(layer_class: type) -> None:
    """Withdraw :func:`register_per_example_layer` for ``layer_class`` (no-op if absent)."""
    _user_checks.pop(layer_class, None)


def unvouched_reason(model: Any) -> str | None:
    """Why ``model`` may mix examples within a batch, or None if every layer and op is
    vouched for (see the module docstring). Names the first offending layer or op.

    >>> import keras
    >>> inputs = keras.Input((4,))
    >>> ok = keras.Model(inputs, keras.layers.UnitNormalization(axis=-1)(inputs))
    >>> unvouched_reason(ok) is None
    True
    >>> bad = keras.Model(inputs, keras.layers.UnitNormalization(axis=0, name="un")(inputs))
    >>> print(unvouched_reason(bad))  # doctest: +ELLIPSIS
    layer 'un' (UnitNormalization): axis=0 includes the batch axis 0. ...
    """
    for item, why in _walk(model, set()):
        if why is not None:
            kind = "layer" if _is_layer(item) else "op"
            name = getattr(item, "name", "?")
            return f"{kind} {name!r} ({type(item).__name__}): {why}. {_advice(item)}"
    return None


def decided_layer_names() -> frozenset[str]:
    """Class names the table decides (vouched, vouched with a check, or not vouched)."""
    return frozenset(_LAYERS)


# -- the walk -------------------------------------------------------------------------------
def _is_layer(item: Any) -> bool:
    return hasattr(item, "_flatten_layers")


def _advice(item: Any) -> str:
    """What to do about an item that is not vouched for."""
    cls = type(item).__name__
    if cls in ("BatchNormalization", "SyncBatchNormalization"):
        return "Use GroupNormalization or LayerNormalization instead."
    if _is_layer(item) and not type(item).__module__.startswith(_BUILTIN_MODULES):
        return (
            f"If {cls} treats every example independently, vouch for it with "
            f"`tf_autoclip.register_per_example_layer({cls})`."
        )
    return (
        "Compute it per example (never over the batch axis 0), or move it into a "
        "custom layer that does and vouch for that with "
        "`tf_autoclip.register_per_example_layer(YourLayer)`."
    )


def _walk(layer: Any, seen: set[int]) -> Iterable[tuple[Any, str | None]]:
    """(layer or op, why it is not vouched or None) for ``layer`` and all it contains."""
    if id(layer) in seen:
        return
    seen.add(id(layer))
    yield layer, _layer_reason(layer)
    for op in getattr(layer, "operations", []) if _is_functional(layer) else []:
        if not _is_layer(op) and id(op) not in seen:
            seen.add(id(op))
            yield op, _op_reason(op)
    for sub in layer._flatten_layers(include_self=False, recursive=False):
        yield from _walk(sub, seen)


def _is_functional(layer: Any) -> bool:
    return any(c.__name__ == "Functional" for c in type(layer).__mro__)


def _computing_classes(cls: type) -> list[type]:
    """``cls`` and its bases up to the first one that defines the computation (``call``)."""
    chain = []
    for base in cls.__mro__:
        chain.append(base)
        if any(name in vars(base) for name in _COMPUTE_METHODS):
            break
    return chain


def _layer_reason(layer: Any) -> str | None:
    decision = _decision(type(layer))
    if decision is _UNKNOWN:  # a layer rule vouches for its layer's own math
        rule = layer_rules.get_layer_rule(layer)  # Keras 3 classes only
        if rule is None:
            return "is not known to treat examples independently"
        return rule.unsupported_reason(layer)
    if isinstance(decision, str):
        return decision
    return decision(layer) if decision is not None else None


def _decision(cls: type) -> Any:
    """The user's registration or the table's entry for the class whose ``call`` runs."""
    for base in _computing_classes(cls):
        if base in _user_checks:
            return _user_checks[base]
        if base.__module__.startswith(_BUILTIN_MODULES) and base.__name__ in _LAYERS:
            return _LAYERS[base.__name__]
    return _UNKNOWN


def _op_reason(op: Any) -> str | None:
    name = type(op).__name__
    if name not in _OPS:
        return "is a keras.ops call that is not known to act on each example alone"
    check = _OPS[name]
    return None if check is None else check(op)

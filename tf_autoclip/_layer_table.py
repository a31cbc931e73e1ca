"""The table of :mod:`tf_autoclip.layer_safety`: which Keras built-in layers and
``keras.ops`` nodes treat each example of a batch independently, and the checks of
their arguments (``axis``, ``stateful``, ...) that decide it per instance.

One table serves Keras 3 and tf_keras: entries are keyed by class name, and
``layer_safety`` consults them only for classes defined by ``keras`` or ``tf_keras``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from tf_autoclip import _keras_compat

Check = Callable[[Any], "str | None"]  # (layer) -> why it mixes examples, or None

_NOT_REVIEWED = "not reviewed for per-example behaviour (apply it in the input pipeline)"


# -- argument checks ----------------------------------------------------------------------
def _ranks(layer: Any) -> list[int]:
    """Ranks of the first input tensor of each call recorded on ``layer`` (functional
    graph nodes, Keras 3 or tf_keras), or of its build shape; [] if unknown."""
    ranks = []
    for node in _keras_compat.inbound_nodes(layer):
        tensors = _node_inputs(node)
        if tensors and getattr(tensors[0], "shape", None) is not None:
            ranks.append(len(tensors[0].shape))
    if ranks:
        return ranks
    shape = _keras_compat.build_input_shape(layer)
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
    axes = _keras_compat.attention_axes(layer)
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
    for node in _keras_compat.inbound_nodes(op):
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
LAYERS: dict[str, Check | str | None] = {
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

NEVER_VOUCHED = {
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


def _getitem_keeps_batch(op: Any) -> str | None:
    """``x[key]`` keeps every example's row when the key starts with a full slice
    (``x[:, 0]``, KerasHub's CLS token) or with an Ellipsis that covers axis 0
    (``x[..., 0]``); an index, a partial slice or a new axis on axis 0, or a tensor
    in the key (a gather that may pick other examples' rows), are not per-example."""
    for node in _keras_compat.inbound_nodes(op):
        args = getattr(getattr(node, "arguments", None), "args", None)
        if not args or len(args) < 2:
            return "an unknown key"
        x, key = args[0], args[1]
        key = tuple(key) if isinstance(key, list | tuple) else (key,)
        if any(not isinstance(k, int | slice | type(Ellipsis) | type(None)) for k in key):
            return "indexes with a tensor (may gather other examples' rows)"
        bounds = [v for k in key if isinstance(k, slice) for v in (k.start, k.stop, k.step)]
        if any(not isinstance(v, int | type(None)) for v in bounds):
            return "slices with tensor bounds"
        first = key[0] if key else slice(None)
        if first == slice(None):
            continue
        rank = len(getattr(x, "shape", ()) or ())
        named = [k for k in key[1:] if k is not None]
        if first is Ellipsis and rank and len(named) < rank:
            continue
        return f"key {key!r} does not keep the batch axis whole"
    return None


OPS: dict[str, Check | None] = {
    **dict.fromkeys(_names(_ELEMENTWISE_OPS), _same_rank_operands),
    **dict.fromkeys(_names(_AXIS_OPS), _axis()),
    "Transpose": _transpose_keeps_batch,
    "Cast": None,
    "StopGradient": None,  # the identity, elementwise
    "GetItem": _getitem_keeps_batch,
}

"""Which KerasHub classes are reviewed for per-example behaviour, and their registration.

The fast engine (``"bk"``) serves a model only if every layer is vouched to treat the
examples of a batch independently (``layer_safety``) and every trainable variable is
owned by a layer with a rule (``rules``). :mod:`tf_autoclip.rules.kerashub` has the rules
for the KerasHub layers that own variables; this module vouches
(``register_per_example_layer``) for the layers whose variables all live in ruled Keras
sublayers (Dense, EinsumDense, LayerNormalization, Embedding, ...): the transformer
blocks, their attention layers and rotary embeddings; and registers both when
``keras_hub`` is imported.

Every KerasHub class here was vouched after reading its source (keras-hub 0.32.0): no
batch statistics, no reduction, reshape, sort or gather over the batch axis; masks are
per example (``[B, T, S]``); the vLLM serving paths (paged attention over flattened
sequences) run only under a serving context, never in training. A vouch or rule holds
only for the reviewed code, so each class's source is hashed: if a KerasHub release
changes a class, the class is no longer vouched (its rule refuses it) and
``engine="auto"`` uses the vectorized engine (each example alone) until it is reviewed
again. ``_EXPECTED`` lists the reviewed hashes (recompute with :func:`_source_hash` after
reviewing a new release). Module-level helpers the classes call (e.g. KerasHub's
``transformer_layer_utils``: per-example padding and causal masks) were read too but
are not hashed.

``keras_hub`` is never imported by this module: :func:`install` registers the KerasHub
part when ``keras_hub`` is imported (now, if it already is; else by a one-shot import
hook).

>>> _key(int)
'builtins:int'
>>> _reviewed(object())
'object is not a reviewed KerasHub class (subclasses are not)'
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.util
import inspect
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from tf_autoclip import _keras_compat, layer_safety
from tf_autoclip.rules.base import LayerRule, register_layer_rule

# "module:Class" -> sha256 of inspect.getsource(Class), for the classes whose source is
# the reviewed one (filled by register()).
_REVIEWED: dict[str, str] = {}
# "module:Class" -> a factory of its rule (given by install()).
_RULES: dict[str, Callable[[], LayerRule]] = {}


def _attention_axes(layer: Any) -> str | None:
    """MultiHeadAttention's inputs have rank >= 3 ([B, T, D]), so the batch axis is 0,
    or -3 or lower; built layers hold positive axes (default: all but batch and features)."""
    axes = _keras_compat.attention_axes(layer)
    if axes is None:
        return None
    for axis in axes if isinstance(axes, list | tuple) else [axes]:
        if not (int(axis) >= 1 or int(axis) in (-1, -2)):
            return f"attention_axes={axes!r} may include the batch axis"
    return None


def _rotary_axes(layer: Any) -> str | None:
    seq, feat = layer.sequence_axis, layer.feature_axis
    if seq < 1 or not (feat == -1 or feat >= 1):
        return f"sequence_axis={seq}, feature_axis={feat} (must be a positive axis, and -1)"
    return None


# "module:Class" -> extra check of the instance (besides the source hash), or None.
_VOUCHED: dict[str, Any] = {
    "keras_hub.src.layers.modeling.transformer_encoder:TransformerEncoder": None,
    "keras_hub.src.layers.modeling.transformer_decoder:TransformerDecoder": None,
    "keras_hub.src.layers.modeling.cached_multi_head_attention:CachedMultiHeadAttention": (
        _attention_axes
    ),
    "keras_hub.src.layers.modeling.token_and_position_embedding:TokenAndPositionEmbedding": None,
    "keras_hub.src.layers.modeling.rotary_embedding:RotaryEmbedding": _rotary_axes,
    "keras_hub.src.models.llama.llama_rotary_embedding:LlamaRotaryEmbedding": _rotary_axes,
    "keras_hub.src.models.gemma.gemma_decoder_block:GemmaDecoderBlock": None,
    "keras_hub.src.models.gemma.gemma_attention:CachedGemmaAttention": None,
    "keras_hub.src.models.llama.llama_decoder:LlamaTransformerDecoder": None,
    "keras_hub.src.models.llama.llama_attention:LlamaAttention": None,
    "keras_hub.src.models.vit.vit_layers:MLP": None,
    "keras_hub.src.models.vit.vit_layers:ViTEncoderBlock": None,
    "keras_hub.src.models.vit.vit_layers:ViTEncoder": None,
}


def _source_hash(cls: type) -> str | None:
    try:
        return hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()
    except (OSError, TypeError):
        return None


def _key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _reviewed(layer: Any) -> str | None:
    """Why ``type(layer)``'s reviewed code does not apply (its source changed), or None."""
    cls = type(layer)  # exactly: a subclass may change any method its call uses
    if _key(cls) not in _REVIEWED:
        return f"{cls.__name__} is not a reviewed KerasHub class (subclasses are not)"
    if _source_hash(cls) != _REVIEWED[_key(cls)]:
        return (
            f"{cls.__name__}'s source differs from the version reviewed for per-example "
            "behaviour (keras-hub 0.32.0)"
        )
    return None


def _vouch_check(extra: Any):
    def check(layer: Any) -> str | None:
        return _reviewed(layer) or (extra(layer) if extra is not None else None)

    return check


_registered = [False]
_lock = threading.Lock()


def register() -> bool:
    """Register the KerasHub rules and vouches (idempotent); False if keras_hub is missing."""
    with _lock:
        if _registered[0]:
            return True
        if importlib.util.find_spec("keras_hub") is None:
            return False
        classes = {}
        for key in (*_RULES, *_VOUCHED):
            module, _, name = key.partition(":")
            try:
                classes[key] = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                continue  # another keras_hub version: that class stays unvouched
        for key, cls in classes.items():
            digest = _source_hash(cls)
            if digest is not None and _EXPECTED.get(key) == digest:
                _REVIEWED[key] = digest
        for key, factory in _RULES.items():
            if key in classes:
                register_layer_rule(classes[key], factory())
        for key, extra in _VOUCHED.items():
            if key in classes:
                layer_safety.register_per_example_layer(classes[key], _vouch_check(extra))
        _registered[0] = True
        return True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs :func:`register` right after ``import keras_hub`` finishes. Stays installed
    until then: a bare ``importlib.util.find_spec("keras_hub")`` (no import) must not
    use it up."""

    def find_spec(self, name, path, target=None):
        if name != "keras_hub":
            return None
        for finder in sys.meta_path:  # the spec the other finders would give
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            register()

        spec.loader.exec_module = exec_and_register
        return spec


def install(rules: Mapping[str, Callable[[], LayerRule]]) -> None:
    """Register ``rules`` ("module:Class" -> rule factory) and the vouches once
    ``keras_hub`` is imported: now if it is, else right after its import."""
    _RULES.update(rules)
    if "keras_hub" in sys.modules:
        register()
    elif importlib.util.find_spec("keras_hub") is not None and not any(
        isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _RegisterAfterImport())


# sha256 of inspect.getsource of each class as reviewed (keras-hub 0.32.0).
_EXPECTED_TEXT = """
layers.modeling.position_embedding:PositionEmbedding
    7c6bccd00e42dd0e63750e1aa959eaa5b921ae8bee8d2f9c68ee94776a25845f
layers.modeling.rms_normalization:RMSNormalization
    591cc55c9485111fe01c9ce508adad5a97f4e01668398762c37b37b025ec290a
models.gemma.rms_normalization:RMSNormalization
    e112c174ce42a8fa7c825b0ee8a7537734937436d5ea25d33ae8b89fdea73f11
models.llama.llama_layernorm:LlamaLayerNorm
    6aaeb92fae359709fa153da18e64f11331b39e452a8719769215e4857234c479
models.vit.vit_layers:ViTPatchingAndEmbedding
    399914ab44ead65bcb5c6b4c12dec81d190fc0c18502bbcd060b0d36a15368a3
layers.modeling.transformer_encoder:TransformerEncoder
    81ff69008ca0764e9364e8ce9e0775c7608b6d0468a656285d20cf5e76470cab
layers.modeling.transformer_decoder:TransformerDecoder
    a2d8a5f7e9ce32194ab0c6955cd303f82a329cd1e883bfdd949aac36f56615a6
layers.modeling.cached_multi_head_attention:CachedMultiHeadAttention
    3603c9b156bcfadcf188ee01167756cbd2bcb31c7556652aee064e3ca790ab29
layers.modeling.token_and_position_embedding:TokenAndPositionEmbedding
    24414c55671e5e8d20ddab4ccb81b079fd79bfc265e3d4bf0fa662c1b466ed9a
layers.modeling.rotary_embedding:RotaryEmbedding
    567535513ce511df60856aef1f8c4200387846b583c6dce288197af1bf22d71b
models.llama.llama_rotary_embedding:LlamaRotaryEmbedding
    84794a768c60fbe0ba22a92e76f093662b4f7e5b4c4e81395f40fbc61960bb9e
models.gemma.gemma_decoder_block:GemmaDecoderBlock
    a346c9e6ea6420205b8cb5f803ecc3e8dda0dc87e8a726f69b273c291f7ed1e0
models.gemma.gemma_attention:CachedGemmaAttention
    3cd234e60635d816d730af354122091b9c531c4ae0aad4a325e008e2fc3b3486
models.llama.llama_decoder:LlamaTransformerDecoder
    810d988a4b8b73479b5ed008e519627075c018eca6a6ef9c8306d6a591103c69
models.llama.llama_attention:LlamaAttention
    553569913541a0d72ace052a790d832e6e75625f83112b936278d8834a305df8
models.vit.vit_layers:MLP
    4e8a5c5a14fefd3c90573ca12d05ab3d20e962b41f93cb4d14df4db76b9acde5
models.vit.vit_layers:ViTEncoderBlock
    7aa030d1df9d9a1a48a46eb362c06df2e136a49f81170e75b2bfa988a36a6068
models.vit.vit_layers:ViTEncoder
    b98b05bbdd33aeb304800946016d54337de0d562a419fff1c7557b5c85bd71f1
"""
_LINES = _EXPECTED_TEXT.split()
_EXPECTED: dict[str, str] = {
    f"keras_hub.src.{key}": digest for key, digest in zip(_LINES[::2], _LINES[1::2])
}

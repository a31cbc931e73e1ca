"""Per-example clipping engines: each turns a batch into the clipped sum ``sum_i c_i g_i``.

- ``registry``: ``ClipRequest``, ``ClippedBatch``, ``register_engine``, ``select_engine``.
- ``plan``: per model, decided once: may the fast engines serve it, which layer has which
  rule (``tf_autoclip.describe_engine(model)`` prints it).
- ``vectorized``: materialized per-example gradients (``tf.vectorized_map``); serves
  every model, and is where the other engines fall back.
- ``bk``: book-keeping (``"bk"``, preferred by ``"auto"``) and ghost clipping
  (``"ghost"``, a mode of bk). Importing ``tf_autoclip`` registers them.
"""

from tf_autoclip.engines import vectorized
from tf_autoclip.engines.registry import (
    ClippedBatch,
    ClipRequest,
    Engine,
    LossFn,
    Supports,
    auto_engine_name,
    engine_names,
    register_engine,
    select_engine,
)
from tf_autoclip.engines.vectorized import vectorized_engine

__all__ = [
    "ClipRequest",
    "ClippedBatch",
    "Engine",
    "LossFn",
    "Supports",
    "auto_engine_name",
    "engine_names",
    "register_engine",
    "select_engine",
    "vectorized",
    "vectorized_engine",
]

register_engine("vectorized", vectorized_engine, lambda model, num_microbatches: True)

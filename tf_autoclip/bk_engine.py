"""Moved to ``tf_autoclip.engines.bk``; this module re-exports it for old importers."""

from tf_autoclip import engines, layer_safety, per_example  # noqa: F401
from tf_autoclip import rules as layer_rules  # noqa: F401
from tf_autoclip.engines.bk import (  # noqa: F401
    _fallback,
    _fallback_reason,
    _loss_scale,
    _run,
    _warned,
    bk_engine,
    ghost_engine,
    per_example_losses,
    supports,
    unsupported_reason,
)
from tf_autoclip.engines.bk_forward import (  # noqa: F401
    _PROBE_BATCH,
    _Forward,
    _probe,
    _ReadTracker,
    _ruled_calls,
)

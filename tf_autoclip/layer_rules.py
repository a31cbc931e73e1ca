"""Compatibility module: the per-layer rules of the fast clipping engines live in the
package :mod:`tf_autoclip.rules` (see its docstring). Its public names are re-exported
here, e.g. ``tf_autoclip.layer_rules.LayerRule``, ``register_layer_rule`` and
``norm_method``."""

from tf_autoclip.rules import *  # noqa: F403
from tf_autoclip.rules import __all__  # noqa: F401

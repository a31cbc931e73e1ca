"""Moved to ``tf_autoclip.engines.vectorized``; this module re-exports it for old importers."""

from tf_autoclip.engines.vectorized import (  # noqa: F401
    _DRAWS_PER_UNIT,
    _ONEDNN_HAZARD_LAYERS,
    _PFOR_CONVERTER_FIXES,
    LossFn,
    PerUnitResult,
    _all_layers,
    _bias_add_grad_any_rank,
    _computes_in_float16,
    _pfor_fix_lock,
    _pfor_fix_saved,
    _seed_generators,
    _unrolled_recurrent_layers,
    float16_loss_scale,
    merge_units,
    needs_xla,
    per_unit_gradients,
    rank_general_pfor_converters,
    split_into_units,
    vectorized_engine,
)

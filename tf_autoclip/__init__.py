"""tf-autoclip: differentially private Keras training with automatic clipping."""

import contextlib as _contextlib

from tf_autoclip import audit, engines
from tf_autoclip.accounting import (
    compute_epsilon,
    compute_noise_multiplier,
    default_delta,
    privacy_statement,
)
from tf_autoclip.callbacks import PrivacyCallback
from tf_autoclip.clipping import ClippingConfig
from tf_autoclip.correlated_noise import BandMF
from tf_autoclip.engines import bk  # noqa: F401  (registers "bk" (auto) and "ghost")
from tf_autoclip.engines.plan import describe as describe_engine
from tf_autoclip.layer_safety import register_per_example_layer, unvouched_reason
from tf_autoclip.legacy import legacy_keras_requested
from tf_autoclip.optimizers import KERAS_VERSION_NEEDED as _KERAS_VERSION_NEEDED
from tf_autoclip.optimizers import (
    DPAutoAdadelta,
    DPAutoAdafactor,
    DPAutoAdagrad,
    DPAutoAdam,
    DPAutoAdamax,
    DPAutoAdamW,
    DPAutoFtrl,
    DPAutoLion,
    DPAutoNadam,
    DPAutoRMSprop,
    DPAutoSGD,
    DPOptimizerMixin,
    NonPrivateGradientError,
    make_dp_optimizer_class,
)
from tf_autoclip.optimizers import missing_optimizer_error as _missing_optimizer_error
from tf_autoclip.rules import register_layer_rule
from tf_autoclip.sampling import PoissonSampler, poisson_sample
from tf_autoclip.training import (
    DPModel,
    DPSequential,
    check_per_example_layers,
    make_private,
    private_gradients,
)

# Optimizers newer than Keras 3.0 (see optimizers.KERAS_VERSION_NEEDED): only on a Keras
# that has their base; otherwise __getattr__ below says which Keras version they need.
with _contextlib.suppress(ImportError):
    from tf_autoclip.optimizers import DPAutoLamb  # Keras >= 3.5
with _contextlib.suppress(ImportError):
    from tf_autoclip.optimizers import DPAutoMuon  # Keras >= 3.10
with _contextlib.suppress(ImportError):
    from tf_autoclip.optimizers import DPAutoScheduleFreeAdamW  # Keras >= 3.14

if legacy_keras_requested():  # TF_USE_LEGACY_KERAS=1: tf.keras is tf_keras (Keras 2), no wrapper
    from tf_autoclip.legacy import (
        DPAutoAdadelta,
        DPAutoAdafactor,
        DPAutoAdagrad,
        DPAutoAdam,
        DPAutoAdamax,
        DPAutoAdamW,
        DPAutoFtrl,
        DPAutoLion,
        DPAutoNadam,
        DPAutoRMSprop,
        DPAutoSGD,
        make_dp_optimizer_class,
        make_private,
    )

__version__ = "0.1.0"

# KerasHub rules and vouches, registered when keras_hub is imported (last: needs layer_safety).
from tf_autoclip.rules import kerashub as _kerashub  # noqa: E402,F401


def __getattr__(name: str):  # DPAutoLamb & co. on a Keras too old for them
    if name in _KERAS_VERSION_NEEDED:
        raise _missing_optimizer_error(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

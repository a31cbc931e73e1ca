"""tf-autoclip: differentially private Keras training with automatic clipping."""

from tf_autoclip import engines
from tf_autoclip.accounting import (
    compute_epsilon,
    compute_noise_multiplier,
    default_delta,
    privacy_statement,
)
from tf_autoclip.callbacks import PrivacyCallback
from tf_autoclip.clipping import ClippingConfig
from tf_autoclip.engines import bk  # noqa: F401  (registers "bk" (auto) and "ghost")
from tf_autoclip.layer_safety import register_per_example_layer, unvouched_reason
from tf_autoclip.legacy import legacy_keras_requested
from tf_autoclip.optimizers import (
    DPAutoAdadelta,
    DPAutoAdafactor,
    DPAutoAdagrad,
    DPAutoAdam,
    DPAutoAdamax,
    DPAutoAdamW,
    DPAutoFtrl,
    DPAutoLamb,
    DPAutoLion,
    DPAutoMuon,
    DPAutoNadam,
    DPAutoRMSprop,
    DPAutoScheduleFreeAdamW,
    DPAutoSGD,
    DPOptimizerMixin,
    NonPrivateGradientError,
    make_dp_optimizer_class,
)
from tf_autoclip.rules import register_layer_rule
from tf_autoclip.sampling import PoissonSampler, poisson_sample
from tf_autoclip.training import (
    DPModel,
    DPSequential,
    check_per_example_layers,
    make_private,
    private_gradients,
)

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

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
from tf_autoclip.sampling import PoissonSampler, poisson_sample
from tf_autoclip.training import (
    DPModel,
    DPSequential,
    check_per_example_layers,
    make_private,
    private_gradients,
)

__version__ = "0.1.0"

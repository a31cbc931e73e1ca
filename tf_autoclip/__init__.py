"""tf-autoclip: differentially private Keras training with automatic clipping."""

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
from tf_autoclip.training import (
    DPModel,
    DPSequential,
    check_per_example_layers,
    make_private,
    private_gradients,
)

__version__ = "0.1.0"

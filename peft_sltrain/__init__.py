"""peft-sltrain: SLTrain (sparse plus low-rank weights, Han et al., NeurIPS 2024) as a native PEFT method.

import peft_sltrain                      # registers "SLTRAIN" with PEFT
from peft import get_peft_model
model = get_peft_model(model, peft_sltrain.SLTrainConfig(r=128, sparsity=0.03, alpha=32))
"""

from ._registration import register as _register
from .config import SLTrainConfig
from .counting import ParameterCounts, count_parameters, module_parameter_counts, sltrain_layer_parameters
from .functional import sltrain_linear
from .layer import Linear, SLTrainLayer
from .model import TARGET_MODULES_MAPPING, SLTrainModel, materialize_meta_parameters

__version__ = "0.1.0"

__all__ = [
    "Linear",
    "ParameterCounts",
    "SLTrainConfig",
    "SLTrainLayer",
    "SLTrainModel",
    "TARGET_MODULES_MAPPING",
    "count_parameters",
    "materialize_meta_parameters",
    "module_parameter_counts",
    "sltrain_layer_parameters",
    "sltrain_linear",
]

_register()

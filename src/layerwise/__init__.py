"""layerwise: fine-tune pretrained image classifiers with per-layer control."""

from layerwise.errors import LayerwiseError, UnknownNameError
from layerwise.freeze import freeze_until, set_trainable, trainable_summary
from layerwise.groups import LayerGroup, layer_groups
from layerwise.models import create_model
from layerwise.optim import build_optimizer
from layerwise.strategies import STRATEGIES, GroupState, make_strategy

__all__ = [
    "STRATEGIES",
    "GroupState",
    "LayerGroup",
    "LayerwiseError",
    "UnknownNameError",
    "build_optimizer",
    "create_model",
    "freeze_until",
    "layer_groups",
    "make_strategy",
    "set_trainable",
    "trainable_summary",
]
__version__ = "0.1.0"

"""layerwise: fine-tune pretrained image classifiers with per-layer control."""

from layerwise.config import RunConfig
from layerwise.engine import fit
from layerwise.errors import LayerwiseError, UnknownNameError
from layerwise.freeze import freeze_all_but_head, freeze_until, set_trainable, trainable_summary
from layerwise.groups import LayerGroup, layer_groups
from layerwise.models import create_model
from layerwise.optim import apply_states, build_optimizer, group_lr
from layerwise.plan import Plan, setup
from layerwise.strategies import STRATEGIES, GroupState, StrategyOptions, make_strategy

__all__ = [
    "STRATEGIES",
    "GroupState",
    "LayerGroup",
    "LayerwiseError",
    "Plan",
    "RunConfig",
    "StrategyOptions",
    "UnknownNameError",
    "apply_states",
    "build_optimizer",
    "create_model",
    "fit",
    "freeze_all_but_head",
    "freeze_until",
    "group_lr",
    "layer_groups",
    "make_strategy",
    "set_trainable",
    "setup",
    "trainable_summary",
]
__version__ = "0.1.0"

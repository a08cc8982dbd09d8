"""layerwise: fine-tune pretrained image classifiers with per-layer control."""

from layerwise.config import RunConfig
from layerwise.errors import LayerwiseError, UnknownNameError
from layerwise.freeze import freeze_all_but_head, freeze_until, set_trainable, trainable_summary
from layerwise.groups import LayerGroup, layer_groups
from layerwise.models import create_model
from layerwise.optim import apply_states, build_optimizer, group_lr
from layerwise.plan import Plan
from layerwise.race import fit
from layerwise.resolve import Evidence, Facts, Resolved, resolve
from layerwise.setup import plan_only
from layerwise.strategies import (
    STRATEGIES,
    GroupState,
    Strategy,
    StrategyOptions,
    make_strategy,
    register_strategy,
)

__all__ = [
    "STRATEGIES",
    "Evidence",
    "Facts",
    "GroupState",
    "LayerGroup",
    "LayerwiseError",
    "Plan",
    "Resolved",
    "RunConfig",
    "Strategy",
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
    "plan_only",
    "register_strategy",
    "resolve",
    "set_trainable",
    "trainable_summary",
]
__version__ = "0.1.0"

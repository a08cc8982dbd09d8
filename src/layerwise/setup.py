"""Set-up before any decision: the data, the model, and the facts about them that
:func:`~layerwise.resolve.resolve` decides from.

The model is built with the user's head (or a linear one); if the resolved settings name
another head, it is replaced and the facts are read again, so the plan counts the parameters
the run trains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from layerwise import rundir
from layerwise.config import AUTO_MODEL, CHECK_DATA_AUTO_LIMIT, RunConfig
from layerwise.data import Splits, drop_unreadable, load_splits
from layerwise.errors import LayerwiseError
from layerwise.groups import LayerGroup, layer_groups
from layerwise.models import LoadedModel, create_model, replace_head
from layerwise.progress import say
from layerwise.resolve import Facts, Resolved, resolve
from layerwise.rng import seed_everything


@dataclass(frozen=True)
class ModelSetup:
    """The model as the resolved settings want it, its groups, the facts and the resolution."""

    loaded: LoadedModel
    groups: tuple[LayerGroup, ...]
    facts: Facts
    resolved: Resolved


def load_data(cfg: RunConfig) -> Splits:
    """The data, with unreadable files dropped (and said)."""
    splits = load_splits(cfg.data, val_split=cfg.val_split, seed=cfg.seed)
    drop_unreadable(splits, check=cfg.check_data, limit=CHECK_DATA_AUTO_LIMIT, progress=not cfg.quiet)
    if splits.skipped:
        say(f"warning: skipped {len(splits.skipped)} unreadable image(s); the run folder's {rundir.SKIPPED} lists them")
    return splits


def facts_of(loaded: LoadedModel, groups: tuple[LayerGroup, ...], *, n_train: int | None,
             images_per_class: float | None, embedded: bool) -> Facts:
    return Facts(num_classes=loaded.num_classes, groups=groups, sizes={g.name: g.numel(loaded.model) for g in groups},
                 model_img_size=loaded.img_size, n_train=n_train, images_per_class=images_per_class, embedded=embedded)


def set_up_model(cfg: RunConfig, num_classes: int, *, n_train: int | None, images_per_class: float | None,
                 embedded: bool = False) -> ModelSetup:
    """Build the model (seeded: the new head's initial weights depend on it), group it and
    resolve; a strategy that implies another head gets it before the facts are final."""
    seed_everything(cfg.seed)
    head = cfg.head or "linear"
    loaded = create_model(cfg.model, num_classes, weights=cfg.weights, head=head, hidden=cfg.hidden)
    groups = tuple(layer_groups(loaded.model, cfg.groups))
    facts = facts_of(loaded, groups, n_train=n_train, images_per_class=images_per_class, embedded=embedded)
    r = resolve(cfg, facts)
    if r.config.head != head:
        replace_head(loaded.model, num_classes, r.config.head, r.config.hidden)
        groups = tuple(layer_groups(loaded.model, cfg.groups))
        facts = dataclasses.replace(facts, groups=groups, sizes={g.name: g.numel(loaded.model) for g in groups})
        r = resolve(cfg, facts)
    return ModelSetup(loaded, groups, facts, r)


def plan_only(cfg: RunConfig, num_classes: int, *, images_per_class: float | None = None) -> Resolved:
    """``layerwise plan``: the resolution without data, on the model with random or given weights."""
    if cfg.lr == "auto":
        raise LayerwiseError("--lr auto is chosen by the LR range test when fit starts; give a number to plan with "
                             "(or run layerwise lr-find)")
    if cfg.model == AUTO_MODEL:
        raise LayerwiseError("--model auto is chosen on your images when fit starts (backbone.json says how); "
                             "give a model to plan with, e.g. --model efficientnet_lite0")
    n_train = round(images_per_class * num_classes) if images_per_class else None
    return set_up_model(cfg, num_classes, n_train=n_train, images_per_class=images_per_class).resolved

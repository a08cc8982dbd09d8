"""The visible plan: groups, sizes, and what each epoch trains at which LR and decay."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from layerwise.groups import LayerGroup
from layerwise.strategies import States, Strategy

if TYPE_CHECKING:
    from layerwise.config import RunConfig
    from layerwise.models import LoadedModel


@dataclass(frozen=True)
class Plan:
    model: str
    strategy: Strategy
    groups: tuple[LayerGroup, ...]
    sizes: dict[str, int]
    epochs: int
    lr: float
    weight_decay: float

    def states(self, epoch: int) -> States:
        return self.strategy.states(epoch)

    def unfreeze_epoch(self, group: str) -> int | None:
        return next((e for e in range(self.epochs) if self.states(e)[group].trainable), None)

    def group_lr(self, group: str, epoch: int) -> float:
        return self.lr * self.states(epoch)[group].lr_mult

    def group_wd(self, group: str, epoch: int) -> float:
        wd = self.states(epoch)[group].weight_decay
        return self.weight_decay if wd is None else wd

    def trainable_groups(self, epoch: int) -> list[str]:
        return [g.name for g in self.groups if self.states(epoch)[g.name].trainable]

    def trainable_params(self, epoch: int) -> int:
        return sum(self.sizes[g] for g in self.trainable_groups(epoch))

    def to_dict(self) -> dict:
        """The JSON contract of ``layerwise plan --json`` and ``plan.json``."""
        groups = []
        for g in self.groups:
            first = self.unfreeze_epoch(g.name)
            at = first if first is not None else 0
            groups.append({
                "name": g.name,
                "params": self.sizes[g.name],
                "trainable_params": self.sizes[g.name] if self.states(0)[g.name].trainable else 0,
                "unfreeze_epoch": first,
                "lr": self.group_lr(g.name, at),
                "weight_decay": self.group_wd(g.name, at),
            })
        epochs = [{
            "epoch": e,
            "trainable_params": self.trainable_params(e),
            "trainable_groups": self.trainable_groups(e),
            "lr": {g.name: self.group_lr(g.name, e) for g in self.groups},
        } for e in range(self.epochs)]
        return {
            "model": self.model,
            "strategy": self.strategy.name,
            "groups": groups,
            "epochs": epochs,
            "total_params": sum(self.sizes.values()),
            "reason": self.strategy.reason,
        }

    def table(self) -> str:
        """Human-readable plan: one row per group, then the unfreezing timeline."""
        d = self.to_dict()
        lines = [f"model {self.model} · strategy {self.strategy.name} · {self.epochs} epochs · base lr {self.lr:g}"]
        if self.strategy.reason:
            lines.append(f"reason: {self.strategy.reason}")
        lines.append(f"{'group':<12} {'params':>12} {'unfreeze':>9} {'lr':>10} {'wd':>8}")
        for g in d["groups"]:
            ue = "never" if g["unfreeze_epoch"] is None else str(g["unfreeze_epoch"])
            lines.append(f"{g['name']:<12} {g['params']:>12,} {ue:>9} {g['lr']:>10.2e} {g['weight_decay']:>8.0e}")
        lines.append(f"{'total':<12} {d['total_params']:>12,}")
        lines.append("")
        lines.append(f"{'epoch':>5} {'trainable':>12} {'%':>6}  groups")
        for e in d["epochs"]:
            pct = 100 * e["trainable_params"] / max(1, d["total_params"])
            lines.append(f"{e['epoch']:>5} {e['trainable_params']:>12,} {pct:>5.1f}%  {', '.join(e['trainable_groups'])}")
        return "\n".join(lines)


def make_plan(model_name: str, model: nn.Module, groups: Sequence[LayerGroup], strategy: Strategy, *,
              epochs: int, lr: float, weight_decay: float) -> Plan:
    sizes = {g.name: g.numel(model) for g in groups}
    return Plan(model_name, strategy, tuple(groups), sizes, epochs, lr, weight_decay)


@dataclass
class Setup:
    """A model with its head, its groups, the resolved config and the plan over them."""

    loaded: "LoadedModel"
    groups: list[LayerGroup]
    plan: Plan
    config: "RunConfig"


def resolve_strategy(cfg: "RunConfig", groups: Sequence[LayerGroup], *, images_per_class: float | None,
                     num_classes: int) -> Strategy:
    """``cfg.strategy`` with its knobs from ``cfg``, over ``groups``."""
    from layerwise.strategies import StrategyOptions, make_strategy

    opts = StrategyOptions(
        epochs=cfg.epochs, from_group=cfg.from_group, lr_map=cfg.lr_map, decay=cfg.decay, every=cfg.every,
        schedule=cfg.schedule, probe_epochs=cfg.probe_epochs, ft_lr_mult=cfg.ft_lr_mult, wd_map=cfg.wd_map,
        images_per_class=images_per_class, num_classes=num_classes, probe_skill=cfg.probe_skill,
    )
    return make_strategy(cfg.strategy, [g.name for g in groups], opts)


def setup(cfg: "RunConfig", num_classes: int, *, images_per_class: float | None = None) -> Setup:
    """Build the model, split it into groups and resolve the strategy into a plan.

    The strategy may imply training settings (the recipe's MLP head, scheduler...);
    those fill whatever the user left unset, and the head is rebuilt if needed.
    """
    from layerwise.groups import layer_groups
    from layerwise.models import create_model, replace_head

    base_head = cfg.head or "linear"
    loaded = create_model(cfg.model, num_classes, weights=cfg.weights, head=base_head, hidden=cfg.hidden)
    groups = layer_groups(loaded.model, cfg.groups)
    strategy = resolve_strategy(cfg, groups, images_per_class=images_per_class, num_classes=num_classes)
    resolved = cfg.resolved(strategy.overrides)
    if resolved.head != base_head:
        replace_head(loaded.model, num_classes, resolved.head, cfg.hidden)
        groups = layer_groups(loaded.model, cfg.groups)
    if resolved.img_size is None:
        resolved.img_size = loaded.img_size
    plan = make_plan(cfg.model, loaded.model, groups, strategy, epochs=cfg.epochs, lr=cfg.lr,
                     weight_decay=resolved.weight_decay)
    return Setup(loaded, groups, plan, resolved)

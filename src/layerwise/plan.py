"""The visible plan: groups, sizes, and what each epoch trains at which LR and decay."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from layerwise.groups import LayerGroup
from layerwise.optim import ScheduleSpec, group_lr, group_wd, layer_decay_mults, lr_scale
from layerwise.strategies import States, Strategy

if TYPE_CHECKING:
    from layerwise.config import RunConfig


# ``layerwise plan`` knows no data: it shows the schedule at this many steps per epoch. Epoch-
# start LRs of every schedule depend on the epoch fraction only, so any value gives the same.
NOMINAL_STEPS_PER_EPOCH = 100


@dataclass(frozen=True)
class Plan:
    """What trains when, at which LR and weight decay: the strategy's states over the groups,
    with the schedule and layer decay that scale them."""

    model: str
    strategy: Strategy
    groups: tuple[LayerGroup, ...]
    sizes: dict[str, int]
    epochs: int
    lr: float
    weight_decay: float
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    t0: int = 5
    t_mult: int = 2
    layer_decay: float | None = None
    steps_per_epoch: int = NOMINAL_STEPS_PER_EPOCH
    settings: dict = field(default_factory=dict)  # the resolved training settings, for --json
    train_sizes: tuple[int, ...] = ()  # per epoch, the side training crops are resized to (resolution.py)

    def states(self, epoch: int) -> States:
        return self.strategy.states(epoch)

    def spec(self) -> ScheduleSpec:
        spe = self.steps_per_epoch
        return ScheduleSpec(total_steps=spe * self.epochs, steps_per_epoch=spe,
                            warmup_steps=int(self.warmup_epochs * spe), t0=self.t0, t_mult=self.t_mult)

    def top_block_mult(self, group: str) -> float:
        """Layer decay's multiplier of the group's last block (1 without layer decay)."""
        if not self.layer_decay:
            return 1.0
        i = [g.name for g in self.groups].index(group)
        return layer_decay_mults(self.groups, self.layer_decay)[i][-1]

    def lr_at(self, group: str, epoch: int, step: int) -> float | None:
        """The group's LR at ``step`` (in ``epoch``): :func:`~layerwise.optim.group_lr`, the
        same function the optimizer uses; ``None`` while frozen."""
        scale = lr_scale(self.scheduler, step, self.spec())
        return group_lr(self.lr, self.states(epoch)[group], scale, self.top_block_mult(group))

    def lrs_at(self, epoch: int, step: int) -> dict[str, float | None]:
        return {g.name: self.lr_at(g.name, epoch, step) for g in self.groups}

    def epoch_start_lrs(self, epoch: int) -> dict[str, float | None]:
        return self.lrs_at(epoch, epoch * self.steps_per_epoch)

    def unfreeze_epoch(self, group: str) -> int | None:
        return next((e for e in range(self.epochs) if self.states(e)[group].trainable), None)

    def trainable_groups(self, epoch: int) -> list[str]:
        return [g.name for g in self.groups if self.states(epoch)[g.name].trainable]

    def trainable_params(self, epoch: int) -> int:
        return sum(self.sizes[g] for g in self.trainable_groups(epoch))

    def train_size(self, epoch: int) -> int | None:
        """The epoch's training side (the last one past the plan, as a longer resume trains)."""
        return self.train_sizes[min(epoch, len(self.train_sizes) - 1)] if self.train_sizes else None

    def to_dict(self) -> dict:
        """The JSON contract of ``layerwise plan --json`` and ``plan.json``: per group, the LR
        and weight decay at the start of its first trainable epoch (``null``: never trains)."""
        groups = []
        for g in self.groups:
            first = self.unfreeze_epoch(g.name)
            groups.append({
                "name": g.name,
                "params": self.sizes[g.name],
                "trainable_params": self.sizes[g.name] if self.states(0)[g.name].trainable else 0,
                "unfreeze_epoch": first,
                "lr": None if first is None else self.epoch_start_lrs(first)[g.name],
                "weight_decay": None if first is None else group_wd(self.weight_decay, self.states(first)[g.name]),
            })
        epochs = [{
            "epoch": e,
            "trainable_params": self.trainable_params(e),
            "trainable_groups": self.trainable_groups(e),
            "lr": self.epoch_start_lrs(e),
            "train_size": self.train_size(e),
        } for e in range(self.epochs)]
        return {
            "model": self.model,
            "strategy": self.strategy.name,
            "groups": groups,
            "epochs": epochs,
            "total_params": sum(self.sizes.values()),
            "reason": self.strategy.reason,
            "training": {**self.settings, "lr": self.lr, "epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch},
        }

    def table(self) -> str:
        """Human-readable plan: one row per group, then the unfreezing timeline with each
        epoch's starting LRs (``-``: frozen)."""
        d = self.to_dict()
        lines = [f"model {self.model} · strategy {self.strategy.name} · {self.epochs} epochs · base lr {self.lr:g}"]
        if self.strategy.reason:
            lines.append(f"reason: {self.strategy.reason}")
        lines.append("training: " + " · ".join(f"{k} {v}" for k, v in _settings_line(self.settings).items()))
        lines.append(f"{'group':<12} {'params':>12} {'unfreeze':>9} {'lr':>10} {'wd':>8}")
        for g in d["groups"]:
            ue = "never" if g["unfreeze_epoch"] is None else str(g["unfreeze_epoch"])
            lines.append(f"{g['name']:<12} {g['params']:>12,} {ue:>9} {_num(g['lr'], '.2e'):>10} "
                         f"{_num(g['weight_decay'], '.0e'):>8}")
        lines.append(f"{'total':<12} {d['total_params']:>12,}")
        lines.append("")
        lines.append(f"{'epoch':>5} {'trainable':>12} {'%':>6} {'head lr':>10} {'px':>5}  groups")
        head = self.groups[-1].name
        for e in d["epochs"]:
            pct = 100 * e["trainable_params"] / max(1, d["total_params"])
            lines.append(f"{e['epoch']:>5} {e['trainable_params']:>12,} {pct:>5.1f}% {_num(e['lr'][head], '.2e'):>10}"
                         f" {_num(e['train_size'], 'd'):>5}  {', '.join(e['trainable_groups'])}")
        return "\n".join(lines)


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _settings_line(settings: dict) -> dict:
    """The settings worth a glance, in the order a reader scans them."""
    keys = ("optimizer", "scheduler", "label_smoothing", "head", "bn", "augment")
    out = {k: settings[k] for k in keys if k in settings}
    if settings.get("scheduler") == "cosine-restarts":
        out["scheduler"] = f"cosine-restarts (t0 {settings['t0']}, t_mult {settings['t_mult']})"
    return out


def training_settings(cfg: RunConfig) -> dict:
    """The resolved settings a strategy may imply, as ``plan --json`` shows them."""
    keys = ("optimizer", "scheduler", "warmup_epochs", "t0", "t_mult", "label_smoothing", "head", "hidden", "bn",
            "augment", "weight_decay", "layer_decay", "clip_grad", "ema", "mixup", "cutmix", "img_size", "train_size",
            "progressive")
    return {k: getattr(cfg, k) for k in keys}


def make_plan(groups: Sequence[LayerGroup], sizes: Mapping[str, int], strategy: Strategy, cfg: RunConfig, *,
              steps_per_epoch: int = NOMINAL_STEPS_PER_EPOCH) -> Plan:
    """The plan of ``strategy`` over ``groups`` with a resolved config's schedule and settings."""
    from layerwise.resolution import train_sizes

    per_epoch = train_sizes(cfg.epochs, cfg.final_train_size(), progressive=cfg.progressive,
                            start=cfg.progressive_from) if cfg.img_size else ()
    return Plan(cfg.model, strategy, tuple(groups), dict(sizes), cfg.epochs, cfg.lr, cfg.weight_decay,
                scheduler=cfg.scheduler, warmup_epochs=cfg.warmup_epochs, t0=cfg.t0, t_mult=cfg.t_mult,
                layer_decay=cfg.layer_decay, steps_per_epoch=steps_per_epoch, settings=training_settings(cfg),
                train_sizes=per_epoch)

"""One optimizer for the whole run, with one param group per layer group (split into
decay / no-decay), holding every parameter from step 0, plus pure LR schedules.

Freezing never touches the optimizer: frozen parameters have no gradient, so torch's
optimizers skip them and their state. Unfreezing only flips ``requires_grad``; the
group already sits in the optimizer at its planned LR.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from layerwise.errors import LayerwiseError, UnknownNameError
from layerwise.groups import LayerGroup
from layerwise.strategies import GroupState


def _adamw(params: list[dict], lr: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr)


def _adam(params: list[dict], lr: float, momentum: float) -> torch.optim.Optimizer:
    # Adam's weight_decay is L2 in the gradient, as the tutorial's torch.optim.Adam does.
    return torch.optim.Adam(params, lr=lr)


def _sgd(params: list[dict], lr: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)


OPTIMIZERS: dict[str, Callable[[list[dict], float, float], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adam": _adam,
    "sgd": _sgd,
}


def no_decay_names(model: nn.Module) -> set[str]:
    """1-D parameters (norm weights, biases) and the model's declared tokens/embeddings."""
    names = {n for n, p in model.named_parameters() if p.ndim <= 1}
    declared = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return names | {n for n, _ in model.named_parameters() if n in declared or n.rpartition(".")[0] in declared}


def layer_decay_mults(groups: Sequence[LayerGroup], decay: float) -> list[list[float]]:
    """timm-style layer-wise decay over the finer blocks: the last block x1, each block
    below it ``decay`` (< 1) times that; returned per group, per block."""
    if not 0 < decay <= 1:
        raise LayerwiseError(f"layer_decay must be in (0, 1] (timm uses 0.65-0.9), got {decay!r}")
    total = sum(len(g.blocks) for g in groups)
    out, k = [], 0
    for g in groups:
        out.append([decay ** (total - 1 - (k + b)) for b in range(len(g.blocks))])
        k += len(g.blocks)
    return out


def param_groups(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    *,
    layer_decay: float | None = None,
    exempt_1d: bool = True,
) -> list[dict]:
    """Torch param-group dicts: per layer group (and per block under layer decay), split
    into weight-decay and no-decay parameters. LRs and decay are filled by
    :func:`apply_states`."""
    named = dict(model.named_parameters())
    skip = no_decay_names(model) if exempt_1d else set()
    block_mults = layer_decay_mults(groups, layer_decay) if layer_decay else [[1.0] for _ in groups]
    out = []
    for g, mults in zip(groups, block_mults):
        blocks = g.blocks if layer_decay else (g.params,)
        for b, (names, mult) in enumerate(zip(blocks, mults)):
            for decay in (True, False):
                ps = [named[n] for n in names if (n not in skip) == decay]
                if ps:
                    out.append({"params": ps, "group": g.name, "block": b, "block_mult": mult, "decay": decay,
                                "lr_mult": 1.0, "trainable": True, "lr": 0.0, "weight_decay": 0.0})
    return out


def group_lr(base_lr: float, state: GroupState, scale: float = 1.0, block_mult: float = 1.0) -> float | None:
    """The one formula for a group's LR: base LR x the strategy's multiplier x the block's
    layer-decay multiplier x the schedule's scale at the step; ``None`` while frozen.

    The optimizer, ``layerwise plan``, plan.json, metrics.jsonl and steps.jsonl all use it."""
    return base_lr * state.lr_mult * block_mult * scale if state.trainable else None


def group_wd(weight_decay: float, state: GroupState) -> float | None:
    """A group's weight decay: the strategy's own, else the run's; ``None`` while frozen."""
    if not state.trainable:
        return None
    return weight_decay if state.weight_decay is None else state.weight_decay


def apply_states(
    optimizer: torch.optim.Optimizer,
    states: Mapping[str, GroupState],
    *,
    lr: float,
    weight_decay: float,
    scale: float = 1.0,
) -> None:
    """Put each param group in its layer group's state: LR from :func:`group_lr` (0 while
    frozen: the group has no gradients anyway), weight decay (0 for no-decay parameters).
    Only the scale changes per step, so the ratios between groups always hold."""
    for pg in optimizer.param_groups:
        st = states[pg["group"]]
        pg["lr_mult"], pg["trainable"] = st.lr_mult, st.trainable
        pg["lr"] = group_lr(lr, st, scale, pg["block_mult"]) or 0.0
        pg["weight_decay"] = (group_wd(weight_decay, st) or 0.0) if pg["decay"] else 0.0


def build_optimizer(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    states: Mapping[str, GroupState],
    *,
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    layer_decay: float | None = None,
    exempt_1d: bool = True,
) -> torch.optim.Optimizer:
    """Build the run's single optimizer over every parameter, set to ``states``.

    Each torch param group carries ``group`` (layer-group name), ``block``, ``decay``
    and ``lr_mult`` keys, so logs and schedulers can tell them apart.
    """
    if name not in OPTIMIZERS:
        raise UnknownNameError("optimizer", name, OPTIMIZERS)
    if not lr > 0:
        raise LayerwiseError(f"learning rate must be > 0, got {lr!r}")
    if weight_decay < 0:
        raise LayerwiseError(f"weight decay must be >= 0, got {weight_decay!r}")
    opt = OPTIMIZERS[name](param_groups(model, groups, layer_decay=layer_decay, exempt_1d=exempt_1d), lr, momentum)
    apply_states(opt, states, lr=lr, weight_decay=weight_decay)
    return opt


def lr_by_group(optimizer: torch.optim.Optimizer) -> dict[str, float | None]:
    """Each layer group's current LR (its top block's, under layer decay); ``None`` while frozen."""
    out: dict[str, float | None] = {}
    for pg in optimizer.param_groups:
        if not pg["trainable"]:
            out[pg["group"]] = None
        else:
            out[pg["group"]] = max(out.get(pg["group"]) or 0.0, pg["lr"])
    return out


# --- schedules: pure functions step -> LR scale in [0, 1] -------------------------------


@dataclass(frozen=True)
class ScheduleSpec:
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int = 0
    t0: int = 5  # cosine-restarts: first period, in epochs
    t_mult: int = 2  # cosine-restarts: period growth

    def __post_init__(self) -> None:
        for name, lo in (("total_steps", 0), ("steps_per_epoch", 1), ("warmup_steps", 0), ("t0", 1), ("t_mult", 1)):
            if getattr(self, name) < lo:
                raise LayerwiseError(f"schedule {name} must be >= {lo}, got {getattr(self, name)!r}")


def constant(step: int, s: ScheduleSpec) -> float:
    return 1.0


def cosine(step: int, s: ScheduleSpec) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(step, s.total_steps) / max(1, s.total_steps)))


def warmup_cosine(step: int, s: ScheduleSpec) -> float:
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    rest = ScheduleSpec(max(1, s.total_steps - s.warmup_steps), s.steps_per_epoch)
    return cosine(step - s.warmup_steps, rest)


def cosine_restarts(step: int, s: ScheduleSpec) -> float:
    """``CosineAnnealingWarmRestarts(T_0, T_mult)`` stepped per batch in fractional epochs."""
    t = step / s.steps_per_epoch
    if s.t_mult == 1:
        t, period = math.fmod(t, s.t0), float(s.t0)
    else:  # closed form, as torch's scheduler: no loop whose length grows with the step
        n = int(math.log(t / s.t0 * (s.t_mult - 1) + 1, s.t_mult))
        start = s.t0 * (s.t_mult ** n - 1) / (s.t_mult - 1)
        if t < start:  # float rounding at a boundary
            n -= 1
            start = s.t0 * (s.t_mult ** n - 1) / (s.t_mult - 1)
        period = s.t0 * s.t_mult ** n
        if t - start >= period:
            start, period = start + period, period * s.t_mult
        t -= start
    return 0.5 * (1 + math.cos(math.pi * t / period))


def one_cycle(step: int, s: ScheduleSpec, pct: float = 0.3, div: float = 25.0, final_div: float = 1e4) -> float:
    """torch's ``OneCycleLR`` shape (cosine up for 30%, cosine down), relative to max LR."""
    up = max(1, int(pct * s.total_steps))
    lo, end = 1 / div, 1 / (div * final_div)
    if step < up:
        return lo + (1 - lo) * 0.5 * (1 - math.cos(math.pi * step / up))
    frac = min(1.0, (step - up) / max(1, s.total_steps - up))
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * frac))


SCHEDULES: dict[str, Callable[[int, ScheduleSpec], float]] = {
    "constant": constant,
    "cosine": cosine,
    "warmup-cosine": warmup_cosine,
    "cosine-restarts": cosine_restarts,
    "onecycle": one_cycle,
}


def lr_scale(name: str, step: int, spec: ScheduleSpec) -> float:
    """Schedule ``name`` at ``step``, with a linear warmup over ``spec.warmup_steps``
    (one-cycle and warmup-cosine have their own ramp)."""
    if name not in SCHEDULES:
        raise UnknownNameError("scheduler", name, SCHEDULES)
    scale = SCHEDULES[name](step, spec)
    if name not in ("onecycle", "warmup-cosine") and step < spec.warmup_steps:
        scale *= (step + 1) / spec.warmup_steps
    return scale


def torch_scheduler(optimizer: torch.optim.Optimizer, name: str, spec: ScheduleSpec) -> torch.optim.lr_scheduler.LRScheduler:
    """A stock torch scheduler configured so each group keeps its own LR (for users who
    bring their own loop). OneCycleLR gets one max LR *per group*, not a scalar that
    would flatten the discriminative ratios."""
    sched = torch.optim.lr_scheduler
    if name == "cosine-restarts":
        return sched.CosineAnnealingWarmRestarts(optimizer, T_0=spec.t0 * spec.steps_per_epoch, T_mult=spec.t_mult)
    if name == "onecycle":
        return sched.OneCycleLR(optimizer, max_lr=[pg["lr"] for pg in optimizer.param_groups], total_steps=spec.total_steps)
    if name in SCHEDULES:
        fn = SCHEDULES[name]
        return sched.LambdaLR(optimizer, lambda step: fn(step, spec))
    raise UnknownNameError("scheduler", name, SCHEDULES)


def set_lr_scale(optimizer: torch.optim.Optimizer, lr: float, scale: float) -> None:
    """Per-step LR update: every group moves by the same ``scale``, keeping its ratio."""
    for pg in optimizer.param_groups:
        state = GroupState(pg["trainable"], pg["lr_mult"])
        pg["lr"] = group_lr(lr, state, scale, pg["block_mult"]) or 0.0

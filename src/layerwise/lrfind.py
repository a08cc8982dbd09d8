"""LR range test over the base LR, with the strategy's per-group multipliers held fixed
(so discriminative ratios survive), then model and optimizer restored exactly."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from layerwise.errors import LayerwiseError
from layerwise.optim import set_lr_scale
from layerwise.progress import bar

if TYPE_CHECKING:
    from layerwise.engine import Trainer


@dataclass
class LRFind:
    lrs: list[float]
    losses: list[float]  # smoothed
    suggestion: float
    reason: str

    def to_dict(self) -> dict:
        return {"lrs": self.lrs, "losses": self.losses, "suggestion": self.suggestion, "reason": self.reason}


def sweep_lr(i: int, steps: int, start: float, end: float) -> float:
    """Exponential sweep: ``start`` at step 0, ``end`` at the last step."""
    return start * (end / start) ** (i / max(1, steps - 1))


def steepest(lrs: list[float], losses: list[float]) -> tuple[float, str]:
    """The LR where the smoothed loss falls fastest against log(LR), before its minimum."""
    low = losses.index(min(losses))
    if low < 3:
        return lrs[max(low, 0)] / 10, "the loss never fell: suggestion is 10x below its minimum"
    slopes = [(losses[i + 1] - losses[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1])) for i in range(1, low)]
    i = 1 + slopes.index(min(slopes))
    return lrs[i], f"steepest descent of the smoothed loss at lr {lrs[i]:.2e} (minimum at {lrs[low]:.2e})"


def lr_find(t: "Trainer", *, start: float = 1e-7, end: float = 1.0, steps: int = 100, beta: float = 0.9,
            diverge: float = 4.0) -> LRFind:
    """Run the range test on ``t`` (a built Trainer) in its epoch-0 plan; restores its state."""
    if not 0 < start < end:
        raise LayerwiseError(f"lr-find needs 0 < start < end, got {start} and {end}")
    model, opt = t.model, t.optimizer
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_rng = torch.get_rng_state()
    t.apply_plan(0)
    model.train()
    lrs, losses, avg, best = [], [], 0.0, math.inf
    try:
        batches = iter(t.loaders.train)
        for i in bar(range(steps), "lr-find", enabled=not t.cfg.quiet, unit="step"):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(t.loaders.train)
                x, y = next(batches)
            lr = sweep_lr(i, steps, start, end)
            set_lr_scale(opt, lr, 1.0)  # every group at lr x its own multiplier
            x, y = x.to(t.device), y.to(t.device)
            with t.amp.autocast():
                loss = F.cross_entropy((t.net or model)(x).float(), y)
            if not torch.isfinite(loss):
                break
            opt.zero_grad(set_to_none=True)
            t.amp.step(loss, opt, t.cfg.clip_grad)
            avg = beta * avg + (1 - beta) * loss.item()
            smoothed = avg / (1 - beta ** (i + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if smoothed > diverge * best:
                break
    finally:
        model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)
        torch.set_rng_state(saved_rng)
    if len(lrs) < 5:
        raise LayerwiseError("lr-find diverged within 5 steps; lower its start LR")
    suggestion, reason = steepest(lrs, losses)
    return LRFind(lrs, losses, suggestion, reason)


def plot_lr_find(res: LRFind, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from layerwise.report import save_figure  # sets the Agg backend

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(res.lrs, res.losses)
    ax.axvline(res.suggestion, color="tab:red", ls="--", label=f"suggested {res.suggestion:.2e}")
    ax.set(xscale="log", xlabel="base LR (head); other groups keep their multipliers", ylabel="smoothed loss",
           title="LR range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, path)
    return path

"""LR range test over the base LR, with the strategy's per-group multipliers held fixed
(so discriminative ratios survive), then model and optimizer restored exactly."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.optim import set_lr_scale
from layerwise.progress import bar
from layerwise.rng import get_rng, set_rng
from layerwise.step import StepResult

Batch = tuple[torch.Tensor, torch.Tensor]


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


def lr_find(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable[Batch],
            step: Callable[[Batch], StepResult | None], *, start: float = 1e-7, end: float = 1.0, steps: int = 100,
            beta: float = 0.9, diverge: float = 4.0, quiet: bool = True) -> LRFind:
    """Sweep the base LR from ``start`` to ``end`` over ``steps`` batches of ``loader``, each
    taken by ``step`` (the training loop's own step) with every group at base LR x its own
    multiplier. The model, optimizer and RNG are restored exactly afterwards."""
    if not 0 < start < end:
        raise LayerwiseError(f"lr-find needs 0 < start < end, got {start} and {end}")
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    saved_rng = get_rng()
    model.train()
    lrs: list[float] = []
    losses: list[float] = []
    avg, best = 0.0, math.inf
    try:
        batches = _cycle(loader)
        for i in bar(range(steps), "lr-find", enabled=not quiet, unit="step"):
            lr = sweep_lr(i, steps, start, end)
            set_lr_scale(optimizer, lr, 1.0)
            r = step(next(batches))
            if r is None:  # every image of the batch unreadable
                continue
            if not r.finite:
                break
            avg = beta * avg + (1 - beta) * r.loss
            smoothed = avg / (1 - beta ** (len(losses) + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if smoothed > diverge * best:
                break
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
        set_rng(saved_rng)
    if len(lrs) < 5:
        raise LayerwiseError("lr-find diverged within 5 steps; lower its start LR")
    suggestion, reason = steepest(lrs, losses)
    return LRFind(lrs, losses, suggestion, reason)


def _cycle(loader: Iterable[Batch]) -> Iterator[Batch]:
    """The loader's batches, starting over at its end (a short dataset still fills the sweep)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise LayerwiseError("lr-find has no training batch to run; add images or lower --batch-size")

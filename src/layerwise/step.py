"""One optimizer step on one batch, shared by the training loop and the LR range test, so the
two cannot drift apart (device placement, channels_last, empty batches, AMP)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layerwise.hardware import Amp, to_device

Mix = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class StepResult:
    loss: float
    correct: int
    images: int
    finite: bool  # False: the loss was NaN/inf and the optimizer did not step


def train_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], optimizer: torch.optim.Optimizer,
               amp: Amp, device: torch.device, *, channels_last: bool = False, label_smoothing: float = 0.0,
               clip_grad: float | None = None, mix: Mix | None = None,
               penalty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> StepResult | None:
    """Forward, loss, backward and step at the optimizer's current LRs. ``None`` for a batch
    whose images were all unreadable; a non-finite loss is reported, never stepped on."""
    x, y = batch
    if not y.numel():
        return None
    x, y = to_device(x, device, channels_last), y.to(device)
    x, target = mix(x, y) if mix is not None else (x, y)
    with amp.autocast():
        logits = model(x)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    if penalty is not None:  # in fp32, outside autocast; after the forward pass, which LwF and Co-Tuning read
        loss = loss + penalty(x, target)
    if not torch.isfinite(loss):
        return StepResult(loss.item(), 0, y.shape[0], finite=False)
    optimizer.zero_grad(set_to_none=True)
    amp.step(loss, optimizer, clip_grad)
    return StepResult(loss.item(), int((logits.argmax(-1) == y).sum()), y.shape[0], finite=True)

"""Augmentation presets (torchvision transforms v2): name -> train transform builder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

Stats = Sequence[float]
CROP_PCT = 0.875  # eval: resize to size / 0.875, then centre crop, as timm/torchvision do
# ImageNet training crops down to 8 % of the image; for fine-tuning small datasets that
# destroys too much of each example, so the light presets keep at least 35 %.
LIGHT_SCALE = (0.35, 1.0)


def _to_tensor() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def _finish(mean: Stats, std: Stats) -> list:
    return [*_to_tensor(), v2.Normalize(list(mean), list(std))]


def none(size: int, mean: Stats, std: Stats) -> v2.Compose:
    return eval_transform(size, mean, std)


def light(size: int, mean: Stats, std: Stats) -> v2.Compose:
    return v2.Compose([v2.RandomResizedCrop(size, scale=LIGHT_SCALE, antialias=True), v2.RandomHorizontalFlip(), *_finish(mean, std)])


def aggressive(size: int, mean: Stats, std: Stats) -> v2.Compose:
    """Exactly the tutorial's list, with the model's own mean/std."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(15),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1),
        v2.RandomAffine(degrees=0, translate=(0.1, 0.1), shear=10),
        *_finish(mean, std),
        v2.RandomErasing(p=0.2),
    ])


def randaugment(size: int, mean: Stats, std: Stats) -> v2.Compose:
    return v2.Compose([v2.RandomResizedCrop(size, scale=LIGHT_SCALE, antialias=True), v2.RandomHorizontalFlip(),
                       v2.RandAugment(), *_finish(mean, std)])


def trivialaugment(size: int, mean: Stats, std: Stats) -> v2.Compose:
    return v2.Compose([v2.RandomResizedCrop(size, scale=LIGHT_SCALE, antialias=True), v2.RandomHorizontalFlip(),
                       v2.TrivialAugmentWide(), *_finish(mean, std)])


PRESETS: dict[str, Callable[[int, Stats, Stats], v2.Compose]] = {
    "none": none,
    "light": light,
    "aggressive": aggressive,
    "randaugment": randaugment,
    "trivialaugment": trivialaugment,
}


def eval_transform(size: int, mean: Stats, std: Stats) -> v2.Compose:
    """Deterministic: resize the short side to ``size / 0.875``, centre crop ``size``.

    The image becomes a tensor before the resize, so a file read from disk and the decoded
    cache (which stores tensors resized the same way) give the same pixels: ``evaluate``
    reproduces the accuracy that training's validation logged."""
    return v2.Compose([v2.PILToTensor(), v2.Resize(int(round(size / CROP_PCT)), antialias=True), v2.CenterCrop(size),
                       *_finish(mean, std)])


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, mixup: float, cutmix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp/CutMix on a batch (one picked at random when both are on); soft targets."""
    choices = [t for t, a in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if a > 0]
    if not choices:
        return x, y
    ops = [t(alpha=a, num_classes=num_classes) for t, a in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if a > 0]
    op = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
    return op(x, y)

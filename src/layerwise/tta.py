"""Deterministic test-time augmentation: named views, averaged as probabilities."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

View = Callable[[torch.Tensor], list[torch.Tensor]]


def identity(x: torch.Tensor) -> list[torch.Tensor]:
    return [x]


def hflip(x: torch.Tensor) -> list[torch.Tensor]:
    return [x.flip(-1)]


def _crops(x: torch.Tensor, frac: float = 0.875) -> list[torch.Tensor]:
    """Four corners and the centre at ``frac`` of the side, resized back to full size."""
    h, w = x.shape[-2:]
    ch, cw = int(h * frac), int(w * frac)
    tops = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)]
    return [F.interpolate(x[..., t:t + ch, l:l + cw], size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            for t, l in tops]


def five_crop(x: torch.Tensor) -> list[torch.Tensor]:
    return _crops(x)


def ten_crop(x: torch.Tensor) -> list[torch.Tensor]:
    return _crops(x) + _crops(x.flip(-1))


def multi_scale(x: torch.Tensor) -> list[torch.Tensor]:
    """Zoom in (x1.15) and out (x0.85) around the centre, back at full size."""
    h, w = x.shape[-2:]
    out = []
    for s in (1.15, 0.85):
        y = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False, antialias=True)
        if s > 1:
            t, l = (y.shape[-2] - h) // 2, (y.shape[-1] - w) // 2
            out.append(y[..., t:t + h, l:l + w])
        else:
            ph, pw = h - y.shape[-2], w - y.shape[-1]
            out.append(F.pad(y, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate"))
    return out


VIEWS: dict[str, View] = {
    "identity": identity,
    "hflip": hflip,
    "five-crop": five_crop,
    "ten-crop": ten_crop,
    "multi-scale": multi_scale,
}


AUTO = "auto"  # --tta auto: the views the training augmentation taught the model (views_for)

# What each view assumes the model has learned to ignore: a transform class of the training
# augmentation (torchvision v2) that makes the view an image it has seen during training.
_TAUGHT_BY = {"hflip": ("RandomHorizontalFlip",), "multi-scale": ("RandomResizedCrop",)}


def _transform_names(t: object) -> set[str]:
    """The class names of ``t`` and of every transform nested in it (Compose, RandomApply...)."""
    inner = getattr(t, "transforms", None) or []
    return {type(t).__name__}.union(*(_transform_names(x) for x in inner))


def views_for(augment: str) -> list[str]:
    """``--tta auto``: the views whose transform the training augmentation ``augment`` applies,
    so every view is an image of the kind the model trained on. Every preset but ``none`` crops
    at random scales and flips, so it gets ``hflip`` and ``multi-scale``; ``none`` (the
    embedded digits: never flipped) gets none. What each view set adds on the suite's finished
    runs is measured in bench/results/tta-views.md (the suite is where this was set)."""
    from layerwise.augment import PRESETS

    names = _transform_names(PRESETS[augment](8, (0.5,) * 3, (0.5,) * 3))
    return [v for v, taught in _TAUGHT_BY.items() if names & set(taught)]


def expand(x: torch.Tensor, views: Sequence[str]) -> list[torch.Tensor]:
    """The original batch plus every named view of it (identity is always included)."""
    from layerwise.errors import UnknownNameError

    out = [x]
    for v in views:
        if v not in VIEWS:
            raise UnknownNameError("TTA view", v, VIEWS)
        if v != "identity":
            out += VIEWS[v](x)
    return out


@torch.inference_mode()
def predict_proba(model: nn.Module, x: torch.Tensor, views: Sequence[str] = ()) -> torch.Tensor:
    """Mean of softmax probabilities over the views, all views in one forward pass."""
    batch = expand(x, views)
    probs = model(torch.cat(batch)).float().softmax(-1)
    return probs.view(len(batch), x.shape[0], -1).mean(0)

"""How far the user's images sit from the pretraining data, as the network itself sees it.

Every pretrained BatchNorm layer stores the mean and variance of its input over the
pretraining images. Feeding the user's images and comparing the batch statistics with
those stored ones measures the domain gap layer by layer, with no labels and no fitting
(the observation behind AdaBN, Li et al. 2016). When the gap is large, the frozen
statistics normalise the user's activations wrongly and the features have to move: every
layer should train, on batch statistics. ``auto`` uses it next to the linear probe's skill.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class BnShiftMeter:
    """Accumulates, per BatchNorm layer and channel, the sum of its input."""

    def __init__(self, layers: list[_BatchNorm]) -> None:
        self.layers = layers
        self.count = [0] * len(layers)
        self.sums = [torch.zeros(bn.num_features, dtype=torch.float64) for bn in layers]

    def observe(self, i: int, x: torch.Tensor) -> None:
        x = x.detach()
        # Per image in float32 (a few thousand values each), then across images in float64: within
        # about 1e-8 relative of casting the whole activation to float64 first, which cost a fifth
        # of the probe's time.
        per_image = x.float().sum(list(range(2, x.dim()))) if x.dim() > 2 else x.float()
        self.sums[i] += per_image.double().sum(0).cpu()  # every axis but the channels
        self.count[i] += x.numel() // x.shape[1]

    def value(self) -> float | None:
        """The mean over layers of the mean over channels of ``|batch mean - running mean|``
        in running standard deviations; None when no layer saw any input."""
        per_layer = []
        for bn, n, s in zip(self.layers, self.count, self.sums):
            if n == 0:
                continue
            mean = s / n
            ref_mean = bn.running_mean.detach().double().cpu()
            ref_std = (bn.running_var.detach().double().cpu() + bn.eps).sqrt()
            per_layer.append(float(((mean - ref_mean).abs() / ref_std).mean()))
        return sum(per_layer) / len(per_layer) if per_layer else None


def pretrained_norms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers that carry statistics stored from pretraining: a layer still at
    its initial mean 0 and variance 1 (``--weights none``) has nothing to compare against."""
    return [m for m in model.modules()
            if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
            and not (torch.all(m.running_mean == 0) and torch.all(m.running_var == 1))]


@contextlib.contextmanager
def measure_bn_shift(model: nn.Module) -> Iterator[BnShiftMeter]:
    """While open, every forward pass through ``model`` adds to the meter; call
    ``value()`` after. Only reads activations: the model and its statistics are unchanged."""
    layers = pretrained_norms(model)
    meter = BnShiftMeter(layers)
    hooks = [bn.register_forward_hook(lambda _m, inp, _out, i=i: meter.observe(i, inp[0])) for i, bn in enumerate(layers)]
    try:
        yield meter
    finally:
        for h in hooks:
            h.remove()

"""Regularisers that pull the fine-tune towards the pretrained model: ``--reg NAME:STRENGTH``.

Each is a function ``(model, groups, strength) -> penalty`` in :data:`REGULARISERS`; the
penalty is a closure returning a scalar added to the loss at every step. The starting point
is the weights as the run is built (the pretrained ones; a resume rebuilds them the same way
before it loads its checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from layerwise.errors import LayerwiseError, UnknownNameError
from layerwise.groups import LayerGroup

Penalty = Callable[[], torch.Tensor]


def l2sp(model: nn.Module, groups: Sequence[LayerGroup], strength: float) -> Penalty:
    """L2-SP (Li et al., 2018): ``strength / 2 * sum ||w - w0||^2`` over the body's
    parameters, w0 the pretrained weights. The head is new and has no starting point: plain
    weight decay covers it, as in the paper."""
    body = [p for g in groups[:-1] for p in g.parameters(model)]
    start = [p.detach().clone() for p in body]

    def penalty() -> torch.Tensor:
        pairs = [(p, p0) for p, p0 in zip(body, start) if p.requires_grad]  # frozen ones sit at w0
        if not pairs:
            return torch.zeros((), device=start[0].device if start else "cpu")
        return strength / 2 * sum(((p.float() - p0.float()) ** 2).sum() for p, p0 in pairs)  # type: ignore[return-value]

    return penalty


REGULARISERS: dict[str, Callable[[nn.Module, Sequence[LayerGroup], float], Penalty]] = {"l2sp": l2sp}


def parse_reg(text: str) -> tuple[str, float]:
    """``"l2sp:0.01"`` -> ``("l2sp", 0.01)``; a bad name or strength is a user error."""
    name, sep, value = text.partition(":")
    if name not in REGULARISERS:
        raise UnknownNameError("regulariser", name, REGULARISERS)
    try:
        strength = float(value) if sep else float("nan")
    except ValueError:
        strength = float("nan")
    if not strength >= 0:  # also NaN
        raise LayerwiseError(f"--reg {text!r}: give NAME:STRENGTH with a strength >= 0, e.g. {name}:0.01")
    return name, strength


def make_penalty(spec: str | None, model: nn.Module, groups: Sequence[LayerGroup]) -> Penalty | None:
    """The penalty ``--reg`` asks for, or None."""
    if spec is None:
        return None
    name, strength = parse_reg(spec)
    return REGULARISERS[name](model, groups, strength)

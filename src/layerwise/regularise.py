"""Regularisers that pull the fine-tune towards the pretrained model: ``--reg NAME:STRENGTH``.

Each is a function ``(model, groups, strength, pretrained_head) -> penalty`` in
:data:`REGULARISERS`; the penalty is a closure called right after the step's forward pass
with the step's input batch, returning a scalar added to the loss. The starting point is the
model as the run is built (the pretrained weights; a resume rebuilds them the same way before
it loads its checkpoint).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from layerwise.errors import LayerwiseError, UnknownNameError
from layerwise.groups import LayerGroup, head_module

Penalty = Callable[[torch.Tensor], torch.Tensor]
LWF_TEMPERATURE = 2.0  # Li & Hoiem's T: the old task's soft targets, as the paper uses


def l2sp(model: nn.Module, groups: Sequence[LayerGroup], strength: float,
         pretrained_head: nn.Linear | None = None) -> Penalty:
    """L2-SP (Li et al., 2018): ``strength / 2 * sum ||w - w0||^2`` over the body's
    parameters, w0 the pretrained weights. The head is new and has no starting point: plain
    weight decay covers it, as in the paper."""
    body = [p for g in groups[:-1] for p in g.parameters(model)]
    start = [p.detach().clone() for p in body]

    def penalty(x: torch.Tensor | None = None) -> torch.Tensor:
        pairs = [(p, p0) for p, p0 in zip(body, start) if p.requires_grad]  # frozen ones sit at w0
        if not pairs:
            return torch.zeros((), device=start[0].device if start else "cpu")
        return strength / 2 * sum(((p.float() - p0.float()) ** 2).sum() for p, p0 in pairs)  # type: ignore[return-value]

    return penalty


def lwf(model: nn.Module, groups: Sequence[LayerGroup], strength: float,
        pretrained_head: nn.Linear | None = None) -> Penalty:
    """Learning without Forgetting (Li & Hoiem, 2016): ``strength * T^2 * KL(teacher || student)``
    on the old task's softened outputs (T = 2). The teacher is the model as built, with the
    classifier its weights came with (ImageNet's 1000 classes), frozen; the student's old-task
    outputs are the same classifier, frozen, applied to the features its new head reads in the
    step's forward pass, so they cost no second pass of the student. The teacher's pass is the
    price: one forward per step."""
    head = head_module(model, groups)
    if pretrained_head is None or not isinstance(head, nn.Linear) or head.in_features != pretrained_head.in_features:
        raise LayerwiseError("--reg lwf needs the classifier the pretrained weights came with, and a linear head over "
                             "the same features (--head linear); this model has none. Use --reg l2sp:ALPHA instead")
    old = copy.deepcopy(pretrained_head).requires_grad_(False)
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    parent, _, leaf = groups[-1].modules[0].rpartition(".")
    setattr(teacher.get_submodule(parent) if parent else teacher, leaf, copy.deepcopy(old))
    features: dict[str, torch.Tensor] = {}
    head.register_forward_pre_hook(lambda _m, args: features.__setitem__("x", args[0]))
    t = LWF_TEMPERATURE

    def penalty(x: torch.Tensor) -> torch.Tensor:
        teacher.to(x.device)  # with the student, wherever it was moved (a no-op once there)
        old.to(x.device)
        with torch.no_grad():
            target = F.softmax(teacher(x).float() / t, dim=-1)
        student = F.log_softmax(old(features["x"].float()) / t, dim=-1)
        return strength * t * t * F.kl_div(student, target, reduction="batchmean")

    return penalty


REGULARISERS: dict[str, Callable[[nn.Module, Sequence[LayerGroup], float, nn.Linear | None], Penalty]] = {
    "l2sp": l2sp, "lwf": lwf}


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


def make_penalty(spec: str | None, model: nn.Module, groups: Sequence[LayerGroup],
                 pretrained_head: nn.Linear | None = None) -> Penalty | None:
    """The penalty ``--reg`` asks for, or None."""
    if spec is None:
        return None
    name, strength = parse_reg(spec)
    return REGULARISERS[name](model, groups, strength, pretrained_head)

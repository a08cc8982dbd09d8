"""Regularisers that pull the fine-tune towards the pretrained model: ``--reg NAME:STRENGTH``.

Each is a function ``(model, groups, strength, start) -> penalty`` in :data:`REGULARISERS`;
the penalty is a closure called right after the step's forward pass with the step's input
batch and its targets (class indices, or soft targets after mixup/CutMix), returning a scalar
added to the loss. The starting point is the model as the run is built (the pretrained
weights; a resume rebuilds them the same way before it loads its checkpoint), with what
:class:`Start` gives: the classifier the weights came with and the training images.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layerwise.errors import LayerwiseError, UnknownNameError
from layerwise.groups import LayerGroup, head_module

Penalty = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (batch, targets) -> a scalar
LWF_TEMPERATURE = 2.0  # Li & Hoiem's T: the old task's soft targets, as the paper uses
COTUNE_IMAGES = 2048  # training images Co-Tuning's class relationship is averaged over, spread over the classes


@dataclass(frozen=True)
class Start:
    """What a regulariser may read besides the model as built."""

    pretrained_head: nn.Linear | None = None  # the classifier the weights came with (ImageNet's)
    # training images through the eval transform, with their labels, on the model's device
    train: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None


def l2sp(model: nn.Module, groups: Sequence[LayerGroup], strength: float, start: Start = Start()) -> Penalty:
    """L2-SP (Li et al., 2018): ``strength / 2 * sum ||w - w0||^2`` over the body's
    parameters, w0 the pretrained weights. The head is new and has no starting point: plain
    weight decay covers it, as in the paper."""
    body = [p for g in groups[:-1] for p in g.parameters(model)]
    w0 = [p.detach().clone() for p in body]

    def penalty(x: torch.Tensor | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
        pairs = [(p, p0) for p, p0 in zip(body, w0) if p.requires_grad]  # frozen ones sit at w0
        if not pairs:
            return torch.zeros((), device=w0[0].device if w0 else "cpu")
        return strength / 2 * sum(((p.float() - p0.float()) ** 2).sum() for p, p0 in pairs)  # type: ignore[return-value]

    return penalty


def _old_task(model: nn.Module, groups: Sequence[LayerGroup], start: Start, name: str
              ) -> tuple[nn.Linear, nn.Linear, nn.Module, dict[str, torch.Tensor]]:
    """The new head, the old classifier (frozen), the teacher (the model as built with it, frozen, in eval
    mode) and the features the new head reads in each forward pass of the student."""
    head, old_head = head_module(model, groups), start.pretrained_head
    if old_head is None or not isinstance(head, nn.Linear) or head.in_features != old_head.in_features:
        raise LayerwiseError(f"--reg {name} needs the classifier the pretrained weights came with, and a linear head "
                             "over the same features (--head linear); this model has none. Use --reg l2sp:ALPHA instead")
    old = copy.deepcopy(old_head).requires_grad_(False)
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    parent, _, leaf = groups[-1].modules[0].rpartition(".")
    setattr(teacher.get_submodule(parent) if parent else teacher, leaf, copy.deepcopy(old))
    features: dict[str, torch.Tensor] = {}
    head.register_forward_pre_hook(lambda _m, args: features.__setitem__("x", args[0]))
    return head, old, teacher, features


def lwf(model: nn.Module, groups: Sequence[LayerGroup], strength: float, start: Start = Start()) -> Penalty:
    """Learning without Forgetting (Li & Hoiem, 2016): ``strength * T^2 * KL(teacher || student)``
    on the old task's softened outputs (T = 2). The teacher is the model as built, with the
    classifier its weights came with (ImageNet's 1000 classes), frozen; the student's old-task
    outputs are the same classifier, frozen, applied to the features its new head reads in the
    step's forward pass, so they cost no second pass of the student. The teacher's pass is the
    price: one forward per step."""
    _, old, teacher, features = _old_task(model, groups, start, "lwf")
    t = LWF_TEMPERATURE

    def penalty(x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        teacher.to(x.device)  # with the student, wherever it was moved (a no-op once there)
        old.to(x.device)
        with torch.no_grad():
            soft = F.softmax(teacher(x).float() / t, dim=-1)
        student = F.log_softmax(old(features["x"].float()) / t, dim=-1)
        return strength * t * t * F.kl_div(student, soft, reduction="batchmean")

    return penalty


def class_relationship(teacher: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       num_classes: int) -> torch.Tensor:
    """Co-Tuning's relationship ``p(old class | new class)``: the teacher's softmax over the
    old classes, averaged over the training images of each new class (the paper's direct
    estimate, without its calibration). Rows sum to 1; a class with no image is uniform."""
    total: torch.Tensor | None = None
    count = torch.zeros(num_classes)
    with torch.no_grad():
        for x, y in batches:
            p = F.softmax(teacher(x).float(), dim=-1).cpu()
            total = torch.zeros(num_classes, p.shape[1]) if total is None else total
            total.index_add_(0, y.cpu(), p)
            count += torch.bincount(y.cpu(), minlength=num_classes)
    if total is None:
        raise LayerwiseError("--reg cotune needs training images to relate the classes; there are none")
    empty = count == 0
    total[empty] = 1.0 / total.shape[1]
    return total / torch.where(empty, torch.ones_like(count), count)[:, None]


def cotune(model: nn.Module, groups: Sequence[LayerGroup], strength: float, start: Start = Start()) -> Penalty:
    """Co-Tuning (You et al., 2020): the old classifier, applied to the features the new head
    reads, is also trained towards ``p(old class | the image's new class)``
    (:func:`class_relationship`): ``strength * CE(relationship[y], softmax(old(features)))``.
    The relationship costs one frozen pass over up to :data:`COTUNE_IMAGES` training images
    before the first step; the steps themselves cost nothing extra. Deviations from the paper:
    the old classifier stays frozen (the pull is on the body), and the probabilities are not
    calibrated."""
    head, old, teacher, features = _old_task(model, groups, start, "cotune")
    if start.train is None:
        raise LayerwiseError("--reg cotune needs the training images to relate the classes")
    relation = class_relationship(teacher, start.train(COTUNE_IMAGES), head.out_features)
    del teacher

    def penalty(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rel = relation.to(x.device)
        old.to(x.device)
        soft = rel[target] if target.dtype == torch.long else target.float() @ rel  # mixup: the mixed relationship
        return strength * -(soft * F.log_softmax(old(features["x"].float()), dim=-1)).sum(-1).mean()

    return penalty


REGULARISERS: dict[str, Callable[[nn.Module, Sequence[LayerGroup], float, Start], Penalty]] = {
    "l2sp": l2sp, "lwf": lwf, "cotune": cotune}


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


def make_penalty(spec: str | None, model: nn.Module, groups: Sequence[LayerGroup], start: Start = Start()) -> Penalty | None:
    """The penalty ``--reg`` asks for, or None."""
    if spec is None:
        return None
    name, strength = parse_reg(spec)
    return REGULARISERS[name](model, groups, strength, start)

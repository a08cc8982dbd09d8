"""Freeze and unfreeze layer groups: ``requires_grad`` plus eval-mode normalisation.

A frozen group's BatchNorm layers keep their running statistics even after
``model.train()``: a forward pre-hook puts them back in eval mode on every call
(the tutorial's loops forget this, so "frozen" layers keep drifting).
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.hooks import RemovableHandle

from layerwise.groups import LayerGroup, find_group, group_names, under

# frozen: frozen groups' norm layers in eval mode with their pretrained statistics;
# adapt: the same, after re-estimating every BatchNorm's statistics on the training
#   images once (AdaBN), so frozen features are normalised for the new domain;
# eval: every norm layer, trainable or not, keeps the pretrained statistics (detectron's
#   FrozenBatchNorm); trainable groups still learn the affine weights;
# train: frozen groups' statistics keep updating (fastai's train_bn).
BN_MODES = ("frozen", "adapt", "eval", "train")
# Hook handles per frozen norm module; weak so a dropped model frees its entries.
_FROZEN_NORMS: "weakref.WeakKeyDictionary[nn.Module, RemovableHandle]" = weakref.WeakKeyDictionary()


def _force_eval(module: nn.Module, _args: tuple) -> None:
    module.training = False


def norm_modules(model: nn.Module, group: LayerGroup) -> list[nn.Module]:
    """Normalisation layers with running statistics whose parameters lie in ``group``."""
    out: list[nn.Module] = []
    params = set(group.params)
    for path, m in model.named_modules():
        if isinstance(m, _NormBase):
            own = [n for n, _ in m.named_parameters(prefix=path)]
            if own and all(n in params for n in own):
                out.append(m)
            elif not own and any(under(n, path.rpartition(".")[0]) for n in group.params):
                out.append(m)  # affine=False norm: goes with its parent module's group
    return out


def _freeze_norm(m: nn.Module, frozen: bool, training: bool) -> None:
    handle = _FROZEN_NORMS.pop(m, None)
    if handle is not None:
        handle.remove()
    if frozen:
        _FROZEN_NORMS[m] = m.register_forward_pre_hook(_force_eval)
        m.train(False)
    else:
        m.train(training)


def set_trainable(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    trainable: Mapping[str, bool] | Collection[str],
    *,
    bn: str = "frozen",
) -> None:
    """Make exactly the named groups trainable (a name -> bool map or a set of names).

    Args:
        bn: ``frozen`` (or ``adapt``) keeps frozen groups' norm layers in eval mode
            (running stats fixed) even under ``model.train()``; ``eval`` does so for every
            group; ``train`` lets frozen groups' statistics update.
    """
    if bn not in BN_MODES:
        from layerwise.errors import UnknownNameError

        raise UnknownNameError("bn mode", bn, BN_MODES)
    wanted = dict(trainable) if isinstance(trainable, Mapping) else {n: True for n in trainable}
    for name in wanted:
        find_group(groups, name)  # unknown names are errors, never "freeze everything"
    for g in groups:
        flag = bool(wanted.get(g.name, False))
        for p in g.parameters(model):
            p.requires_grad_(flag)
        for m in norm_modules(model, g):
            frozen = bn == "eval" or (not flag and bn != "train")
            _freeze_norm(m, frozen=frozen, training=model.training)


def freeze_until(model: nn.Module, groups: Sequence[LayerGroup], name: str, *, bn: str = "frozen") -> None:
    """Train group ``name`` and every group after it; freeze the ones before."""
    start = find_group(groups, name)
    set_trainable(model, groups, group_names(groups)[start:], bn=bn)


def freeze_all_but_head(model: nn.Module, groups: Sequence[LayerGroup], *, bn: str = "frozen") -> None:
    set_trainable(model, groups, [groups[-1].name], bn=bn)


def trainable_summary(model: nn.Module, groups: Sequence[LayerGroup]) -> str:
    """Per-group and total trainable / total parameters, as the tutorial prints them."""
    rows = []
    total = trainable = 0
    for g in groups:
        ps = g.parameters(model)
        n = sum(p.numel() for p in ps)
        t = sum(p.numel() for p in ps if p.requires_grad)
        total, trainable = total + n, trainable + t
        rows.append(f"  {g.name:<12} {t:>12,} / {n:>12,}  {100 * t / max(n, 1):5.1f}%")
    rows.append(f"Trainable: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.1f}%)")
    return "\n".join(rows)


def has_norms(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers, whose running statistics a run can move."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate_norms(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running statistics as an exact average over
    ``batches`` (AdaBN); weights are untouched. Returns the number of images seen."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in norms]
    was_training = model.training
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += x.shape[0]
    finally:
        for m, (momentum, training) in zip(norms, saved):
            m.momentum, m.training = momentum, training
        model.train(was_training)
    return seen

"""WiSE-FT (Wortsman et al., 2022): average in weight space between the linear-probe model
(the pretrained body with the probe's head) and the fine-tuned one, and keep the mix that
scores best on val. It costs evaluations, not training.

The endpoints are kept exactly (α = 0 and α = 1 are always scored, with no re-estimation),
so the result is never below either endpoint on val. The mixes between are walked from the
fine-tune towards the probe and the walk stops at the first loss (:func:`walk`). Between them, BatchNorm running statistics
are re-estimated on training images when the endpoints' statistics differ: an average of two
networks' weights has no matching average of their statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from layerwise.freeze import recalibrate_norms

STEP = 0.25  # the mixes lie on a grid of this step, as the paper's figures use; not tuned here


def interpolate(zero: Mapping[str, torch.Tensor], one: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * zero + alpha * one`` for every floating tensor (counters come from
    ``one``); the endpoints themselves are returned exactly."""
    if zero.keys() != one.keys():
        missing = sorted(set(zero) ^ set(one))[:5]
        raise ValueError(f"the two models' tensors differ (e.g. {missing}); WiSE-FT needs one architecture")
    if alpha in (0.0, 1.0):
        return {k: v.clone() for k, v in (zero if alpha == 0.0 else one).items()}
    return {k: torch.lerp(zero[k].float(), b.float(), alpha).to(b.dtype) if b.is_floating_point() else b.clone()
            for k, b in one.items()}


def norm_stats_differ(model: nn.Module, zero: Mapping[str, torch.Tensor], one: Mapping[str, torch.Tensor]) -> bool:
    """Do the endpoints hold different BatchNorm running statistics? (Not after --bn eval.)"""
    names = [f"{n}.{s}" for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for s in ("running_mean", "running_var") if getattr(m, s) is not None]
    return any(not torch.equal(zero[k], one[k]) for k in names)


@dataclass(frozen=True)
class WiseResult:
    alphas: tuple[float, ...]
    val_acc: tuple[float, ...]
    alpha: float  # the chosen mix: the best val accuracy, ties to the larger alpha
    recalibrated: bool  # were BatchNorm statistics re-estimated between the endpoints?

    def to_dict(self) -> dict:
        return {"alphas": list(self.alphas), "val_acc": list(self.val_acc), "alpha": self.alpha,
                "recalibrated": self.recalibrated}


def walk(accs: dict[float, float], step: float = STEP) -> float | None:
    """The next alpha to score, or None: after both endpoints, step from the fine-tune towards
    the probe while each mix is at least as good as the one before it. On the unimodal curve
    the paper shows, that stops one step past the peak; where the fine-tune left the probe's
    basin (``full`` on gtsrb's held-out split, 112 px: 0.82 at alpha 1, 0.58 at 0.75, 0.30 at
    0.5, 0.62 at 0) it costs one mix, not three."""
    if 1.0 not in accs or 0.0 not in accs:
        return 1.0 if 1.0 not in accs else 0.0
    a = 1.0
    while (nxt := round(a - step, 6)) > 0.0 and nxt in accs:
        if accs[nxt] < accs[a]:
            return None
        a = nxt
    return nxt if nxt > 0.0 else None


def wise_ft(model: nn.Module, zero: Mapping[str, torch.Tensor], one: Mapping[str, torch.Tensor],
            score: Callable[[nn.Module], float], norm_batches: Callable[[], Iterable[torch.Tensor]],
            alphas: Sequence[float] | None = None, one_acc: float | None = None
            ) -> tuple[WiseResult, dict[str, torch.Tensor]]:
    """Score mixes with ``score`` (val accuracy): exactly ``alphas`` when given, else the
    endpoints and then :func:`walk`'s. ``one_acc`` is the fine-tune's score when the caller
    knows it (it is not scored again). ``model`` ends holding the best (ties to the larger
    alpha), whose state dict is returned too."""
    if alphas is not None and not alphas:
        raise ValueError("WiSE-FT needs at least one alpha")
    # copies: a state dict aliases its model's tensors, and loading a mix writes into them
    zero, one = ({k: v.detach().clone() for k, v in sd.items()} for sd in (zero, one))
    recal = norm_stats_differ(model, zero, one)
    accs: dict[float, float] = {}
    best: tuple[float, float, dict[str, torch.Tensor]] | None = None
    if one_acc is not None:
        accs[1.0], best = one_acc, (one_acc, 1.0, one)
    given = list(alphas) if alphas is not None else None

    def next_alpha() -> float | None:
        if given is None:
            return walk(accs)
        while given and given[0] in accs:
            given.pop(0)
        return given.pop(0) if given else None

    while (a := next_alpha()) is not None:
        model.load_state_dict(interpolate(zero, one, a))
        if recal and 0.0 < a < 1.0:
            recalibrate_norms(model, norm_batches())
        accs[a] = score(model)
        if best is None or (accs[a], a) >= (best[0], best[1]):
            best = (accs[a], a, {k: v.detach().clone() for k, v in model.state_dict().items()})
    if best is None:
        raise ValueError("WiSE-FT needs at least one alpha")
    model.load_state_dict(best[2])
    tried = tuple(sorted(accs))
    return WiseResult(tried, tuple(accs[a] for a in tried), best[1], recal), best[2]

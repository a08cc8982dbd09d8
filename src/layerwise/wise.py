"""WiSE-FT (Wortsman et al., 2022): average in weight space between the linear-probe model
(the pretrained body with the probe's head) and the fine-tuned one, and keep the mix that
scores best on val. It costs evaluations, not training.

The endpoints are kept exactly (α = 0 and α = 1 are in the grid, with no re-estimation), so
the result is never below either endpoint on val. Between them, BatchNorm running statistics
are re-estimated on training images when the endpoints' statistics differ: an average of two
networks' weights has no matching average of their statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from layerwise.freeze import recalibrate_norms

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # a small grid, as the paper's figures use; not tuned here


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


def wise_ft(model: nn.Module, zero: Mapping[str, torch.Tensor], one: Mapping[str, torch.Tensor],
            score: Callable[[nn.Module], float], norm_batches: Callable[[], Iterable[torch.Tensor]],
            alphas: Sequence[float] = ALPHAS) -> tuple[WiseResult, dict[str, torch.Tensor]]:
    """Score each mix with ``score`` (val accuracy); ``model`` ends holding the chosen one,
    whose state dict is returned too."""
    if not alphas:
        raise ValueError("WiSE-FT needs at least one alpha")
    # copies: a state dict aliases its model's tensors, and loading a mix writes into them
    zero, one = ({k: v.detach().clone() for k, v in sd.items()} for sd in (zero, one))
    recal = norm_stats_differ(model, zero, one)
    accs: list[float] = []
    best: tuple[float, float, dict[str, torch.Tensor]] | None = None
    for a in alphas:
        model.load_state_dict(interpolate(zero, one, a))
        if recal and 0.0 < a < 1.0:
            recalibrate_norms(model, norm_batches())
        accs.append(score(model))
        if best is None or (accs[-1], a) >= (best[0], best[1]):
            best = (accs[-1], a, {k: v.detach().clone() for k, v in model.state_dict().items()})
    if best is None:
        raise ValueError("WiSE-FT needs at least one alpha")
    model.load_state_dict(best[2])
    return WiseResult(tuple(alphas), tuple(accs), best[1], recal), best[2]

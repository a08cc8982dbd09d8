"""What ``auto`` measures on the user's data before anything is decided, and the probe row the
run starts from.

The linear probe (probe.py) and the BatchNorm shift (shift.py), read from one frozen forward
pass, become :class:`~layerwise.resolve.Evidence` for :func:`~layerwise.resolve.resolve`. This
module takes explicit inputs (a model, its groups, datasets, a device) and knows nothing of the
training loop; the probe's head becomes the run's first metrics row, so a fine-tune only
replaces it by beating it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from layerwise import rundir
from layerwise.checkpoint import load_weights, save_weights, write_json
from layerwise.distributed import DistInfo, all_sum
from layerwise.evaluation import evaluate, gather_eval
from layerwise.groups import LayerGroup, head_module
from layerwise.hardware import Amp, to_device
from layerwise.loaders import ordered_loader
from layerwise.probe import (
    PROBE_MAX_IMAGES,
    ProbeResult,
    earlier_depth,
    linear_probe,
    load_probe_head,
    probe_loaders,
)
from layerwise.progress import say
from layerwise.resolve import Evidence, Resolved
from layerwise.rundir import RunDir


@dataclass(frozen=True)
class ProbeInputs:
    """The data the probe reads: training images through the eval transform, the whole val set."""

    train: Dataset
    val: Dataset
    batch_size: int
    workers: int
    seed: int


def sample_batch(ds: Dataset, batch_size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A few images of ``ds``, to find a module by call order."""
    x, _ = next(iter(ordered_loader(ds, min(8, batch_size), 0)))
    return to_device(x, device, channels_last)


def run_probe(model: nn.Module, groups: Sequence[LayerGroup], data: ProbeInputs, device: torch.device, amp: Amp, *,
              channels_last: bool, quiet: bool, max_images: int = PROBE_MAX_IMAGES,
              earlier_depth_too: bool = False) -> tuple[ProbeResult, tuple[str, str] | None]:
    """The linear probe on the frozen model (plus the BatchNorm shift, and with
    ``earlier_depth_too`` a second probe on an earlier depth, read from the same forward
    passes), and that earlier depth's (group, module). The earlier depth is research evidence
    (bench/evidence.py) that no choice reads: a fit does not pay its second fit."""
    train, val = probe_loaders(data.train, data.val, batch_size=data.batch_size, workers=data.workers, seed=data.seed,
                               max_images=max_images)
    earlier = (earlier_depth(model, groups, sample_batch(data.train, data.batch_size, device, channels_last))
               if earlier_depth_too else None)
    res = linear_probe(model, head_module(model, groups), train, val, device, amp, channels_last=channels_last,
                       quiet=quiet, seed=data.seed, earlier=model.get_submodule(earlier[1]) if earlier else None)
    return res, earlier


def probe_evidence(res: ProbeResult, head: nn.Module, run: Path, dist: DistInfo) -> Evidence:
    """The probe's verdict as evidence: rank 0's for all ranks, and its head saved as the
    fine-tune's possible start (config.yaml records the path, so a resume needs no probe)."""
    # A model without BatchNorm has no shift (-1 on the wire).
    skill, shift = all_sum([res.skill, -1.0 if res.bn_shift is None else res.bn_shift] if dist.is_main
                           else [0.0, 0.0], dist)
    path = None
    probe_head = copy.deepcopy(head)  # the model's own head stays fresh: begin_at_probe loads it
    if res.head is not None and load_probe_head(probe_head, res.head):
        path = RunDir(run).probe_head
        if dist.is_main:
            save_weights(path, probe_head)
    # Recorded relative to the run folder, so a moved run still finds its own head.
    return Evidence(probe_skill=round(skill, 4), bn_shift=None if shift < 0 else round(shift, 4),
                    probe_head=None if path is None else path.name)


def record_probe(run: Path, res: ProbeResult, earlier: tuple[str, str] | None, r: Resolved, dist: DistInfo) -> None:
    """probe.json and the banner line: what was measured, and what auto chose from it."""
    cfg, strategy = r.config, r.strategy
    if dist.is_main:
        write_json(RunDir(run).probe, {"val_acc": res.acc, "chance": res.chance, "skill": cfg.probe_skill,
                                        "train_images": res.train_images, "seconds": round(res.seconds, 2),
                                        "c": res.head.c if res.head else None, "knn_acc": res.knn_acc,
                                        "hscore": res.hscore, "bn_shift": cfg.bn_shift,
                                        "earlier": earlier and {"group": earlier[0], "module": earlier[1],
                                                                "val_acc": res.earlier_acc, "skill": res.earlier_skill},
                                        "strategy": strategy.name, "bn": cfg.bn, "reason": strategy.reason})
    shift_text = "none (no BatchNorm)" if cfg.bn_shift is None else f"{cfg.bn_shift:.2f}"
    say(f"auto: linear probe on frozen features: val acc {res.acc:.3f} (majority class {res.chance:.3f}), "
        f"skill {cfg.probe_skill:.2f}; BatchNorm shift {shift_text}; {res.seconds:.1f}s -> {strategy.name}, "
        f"bn {cfg.bn}; also kNN {res.knn_acc:.3f}, H-score {res.hscore:.1f}"
        + (f", {earlier[0]}'s output skill {res.earlier_skill:.2f}" if earlier and res.earlier_skill is not None else ""))


def begin_at_probe(model: nn.Module, head: nn.Module, probe_head: Path, val: DataLoader, *, amp: Amp,
                   device: torch.device, channels_last: bool, dist: DistInfo, best: Path | None,
                   keep_probe_head: bool, head_params: int, head_group: str) -> dict:
    """Load the probe's head and validate the model: the run's first metrics row (epoch -1).
    ``best`` (rank 0's best.safetensors) starts as the probe model, so a fine-tune replaces it
    only by beating it: auto is never worse than its own probe on val. Unless
    ``keep_probe_head``, the fresh head is put back for the fine-tune."""
    tic = time.perf_counter()
    if dist.enabled:
        torch.distributed.barrier()  # rank 0 has written the head file
    fresh = {k: v.clone() for k, v in head.state_dict().items()}
    load_weights(probe_head, head)
    ev = gather_eval(evaluate(model, val, amp, device, channels_last=channels_last), dist)
    if best is not None:
        with rundir.explain_write_errors(best.parent):
            save_weights(best, model)
    say(f"probe head: val accuracy {ev.acc:.4f} with the probe as the classifier; best.safetensors starts here and "
        "only a better fine-tuned epoch replaces it")
    if not keep_probe_head:
        head.load_state_dict(fresh)
        say("the fine-tune trains a fresh head at the full LR; the probe stays the row to beat")
    return {"epoch": -1, "stage": "probe", "train_loss": None, "train_acc": None, "val_loss": ev.loss,
            "val_acc": ev.acc, "lr": {}, "trainable_params": head_params, "trainable_groups": [head_group],
            "epoch_seconds": time.perf_counter() - tic, "images_per_second": None}

"""Cached inputs of the trainable part of the model: the frozen part runs once, not every epoch.

Two cuts: while only the head trains, the head's inputs; while the first groups are frozen
and later ones train (gradual unfreezing, partial), the frozen prefix's outputs, replayed into
the rest of the model (prefix.py). Either is exact only when the frozen part's output depends
on the image alone: deterministic inputs (``--augment none``) or K precomputed augmented views,
frozen BatchNorm statistics, no MixUp/CutMix, one process.
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from layerwise.capture import captured, feature_batches, spill_tensor
from layerwise.config import RunConfig
from layerwise.groups import LayerGroup
from layerwise.hardware import RAM_BUDGET, Amp, default_cache_dir, to_device, total_ram
from layerwise.loaders import ordered_loader
from layerwise.plan import Plan
from layerwise.prefix import boundary_outputs, plan_replay
from layerwise.progress import bar, say
from layerwise.rng import epoch_seed, seed_everything


@dataclass(frozen=True)
class Cut:
    """Where the model is cut: ``suffix`` trains on the cached input (``output=False``) or
    output (``output=True``) of ``module``."""

    key: str  # "head", or "prefix:<first trainable group>"
    suffix: nn.Module
    module: nn.Module
    output: bool
    spill: bool = False  # too large for the RAM budget: kept in a memory-mapped file (spill_dir)


FEATURE_CACHE_MODES = ("auto", "off")  # frozen-prefix features while only the head trains
DISK_BUDGET = 0.5  # a memory-mapped store may take half the free space of its folder


def spill_dir() -> Path:
    return default_cache_dir() / "activations"


def free_disk(folder: Path) -> int:
    """Free bytes on the file system that holds ``folder`` (or its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def placement(need: int) -> str | None:
    """Where ``need`` bytes of activations go: ``"ram"`` within the RAM budget, else ``"disk"``
    (memory-mapped) within half the free disk, else None."""
    if need < RAM_BUDGET * total_ram():
        return "ram"
    if need < DISK_BUDGET * free_disk(spill_dir()):
        return "disk"
    return None


def cache_allowed(cfg: RunConfig, plan: Plan, distributed: bool) -> bool:
    """The frozen part gives the same output for an image every time it sees it."""
    if cfg.feature_cache == "off" or cfg.bn == "train" or cfg.mixup or cfg.cutmix or distributed:
        return False
    if len(set(plan.train_sizes)) > 1:  # features computed at one side would be stale at the next
        return False
    return cfg.augment == "none" or cfg.feature_cache_views > 0


def first_trainable(plan: Plan, epoch: int) -> int | None:
    """The index of the first group that trains, when every group after it trains too."""
    states = [plan.states(epoch)[g.name].trainable for g in plan.groups]
    if True not in states:
        return None
    k = states.index(True)
    return k if all(states[k:]) else None


def head_cut(head: nn.Module | None, plan: Plan, epoch: int) -> Cut | None:
    """Only the head trains (and it is one module): cache its inputs."""
    if head is None or first_trainable(plan, epoch) != len(plan.groups) - 1:
        return None
    return Cut("head", head, head, output=False)


def prefix_cut(model: nn.Module, groups: Sequence[LayerGroup], plan: Plan, epoch: int, sample: Callable[[], torch.Tensor],
               known: dict[int, Cut | None], *, images: int, views: int) -> Cut | None:
    """A frozen prefix that stays frozen for this epoch and the next (building the cache costs
    about one epoch of the prefix's forward passes, so a cut that lasts one epoch saves nothing).
    ``known`` keeps each first-trainable group's cut (None: refused), so a cut is planned once
    and its later epochs keep using it."""
    k = first_trainable(plan, epoch)
    if k is None or k == 0 or k == len(groups) - 1:
        return None
    if k not in known:
        if epoch + 1 >= plan.epochs or first_trainable(plan, epoch + 1) != k:
            return None
        known[k] = _plan_cut(model, groups, k, sample(), images, views)
    return known[k]


def _plan_cut(model: nn.Module, groups: Sequence[LayerGroup], k: int, x: torch.Tensor, images: int,
              views: int) -> Cut | None:
    replay = plan_replay(model, groups, k, x)
    frozen = groups[k - 1].name
    if replay is None:
        say(f"feature cache: {frozen}'s output cannot be replayed into this model's forward pass "
            "(checked on one batch); every epoch runs the frozen groups")
        return None
    need = boundary_outputs(model, replay.boundary, x[:1]).numel() * 4 * images * (views + 1)  # + val: about one view
    where = placement(need)
    size = f"{frozen}'s outputs for {images} images x {views} view(s) + val ({need / 2**30:.1f} GiB)"
    if where is None:
        say(f"feature cache: {size} fit neither a quarter of the RAM nor half the free disk of {spill_dir()}; "
            "every epoch runs the frozen groups")
        return None
    if where == "disk":
        say(f"feature cache: {size} exceed a quarter of the RAM; they go to a memory-mapped file in {spill_dir()}")
    return Cut(f"prefix:{k}", replay, model.get_submodule(replay.boundary), output=True, spill=where == "disk")


@dataclass
class FeatureStore:
    """A cut's cached inputs: K training views and the validation set."""

    key: str
    train: list[torch.Tensor]
    labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor

    @staticmethod
    def build(cut: Cut, model: nn.Module, train: Dataset, val: DataLoader, *, views: int, cfg: RunConfig,
              workers: int, device: torch.device, amp: Amp) -> FeatureStore:
        prep = functools.partial(to_device, device=device, channels_last=cfg.channels_last)
        ordered = ordered_loader(train, cfg.batch_size, workers)
        feats, labels = [], None
        tic = time.perf_counter()

        def into(rows: int) -> Callable[[Sequence[int]], torch.Tensor] | None:
            return (lambda shape: spill_tensor((rows, *shape), spill_dir())) if cut.spill else None

        def shown(loader: DataLoader, what: str) -> Iterator:
            return bar(loader, f"feature cache: {what}", enabled=not cfg.quiet, total=len(loader), unit="batch")

        for k in range(views):
            seed_everything(epoch_seed(cfg.seed, 10_000 + k))  # view k's augmentation, reproducibly
            f, labels = captured(model, cut.module, shown(ordered, f"train view {k + 1}/{views}"), device, amp.autocast,
                                 prep, output=cut.output, into=into(len(train)))  # type: ignore[arg-type]
            feats.append(f)
        val_feats, val_labels = captured(model, cut.module, shown(val, "val"), device, amp.autocast, prep,
                                         output=cut.output, into=into(len(val.dataset)))  # type: ignore[arg-type]
        what = "the head" if cut.key == "head" else "the groups after the frozen prefix"
        say(f"feature cache: frozen part run once over {len(labels)} x {views} train + {len(val_labels)} val images "
            f"in {time.perf_counter() - tic:.1f}s; {what} train on cached inputs")
        return FeatureStore(cut.key, feats, labels, val_feats, val_labels)

    def batches(self, epoch: int, batch_size: int, generator: torch.Generator,
                drop_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return feature_batches(self.train[epoch % len(self.train)], self.labels, batch_size, generator,
                               drop_last=drop_last)

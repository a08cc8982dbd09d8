"""DataLoaders: the seeded training order, the validation set, and one ordered loader through
the eval transform, shared by the probe, BatchNorm re-estimation and the feature cache."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch.utils.data import DataLoader, Dataset

from layerwise.augment import PRESETS, eval_transform
from layerwise.cache import DecodedImages, DiskImages, fits_in_ram
from layerwise.config import RunConfig
from layerwise.data import ImageDataset, Splits, collate_skipping
from layerwise.distributed import DistInfo, ShardedShuffle, eval_shard
from layerwise.hardware import default_cache_dir, pick_device


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    generator: torch.Generator  # the epoch's sample order
    worker_generator: torch.Generator  # the DataLoader workers' seeds

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)
        self.worker_generator.manual_seed(seed + 1)


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A permutation from ``generator``: the cached-feature path draws the same order."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def epoch_workers(cfg: RunConfig, decoded_in_ram: bool, workers: int) -> int:
    """Loader processes for the epochs. None when the model trains on the CPU from images
    decoded in RAM: a batch is then a few tensor crops, cheaper than forking a worker for
    every epoch's train and val passes, and a worker takes cores the model computes on
    (measured on the digits, 2 epochs of ``full``: 24.7 s without, 31.8 s with one). Else
    ``workers``; an explicit ``--workers`` always wins."""
    if cfg.workers is not None:
        return cfg.workers
    if decoded_in_ram and pick_device(cfg.device).type == "cpu":
        return 0
    return workers


def decoded_cache_mode(cfg: RunConfig, splits: Splits) -> str:
    """ram, disk or off; auto keeps decoded images in RAM when they fit in a quarter of it."""
    if cfg.cache != "auto":
        return cfg.cache
    return "ram" if fits_in_ram(len(splits.train) + len(splits.val), stored_side_for(cfg)) else "off"


def stored_side_for(cfg: RunConfig) -> int:
    """The side training images are stored at: the largest any epoch trains or evaluates at."""
    return max(cast(int, cfg.img_size), cast(int, cfg.final_train_size()))  # resolved by resolve()


def make_loaders(splits: Splits, cfg: RunConfig, mean: Sequence[float], std: Sequence[float],
                 info: DistInfo = DistInfo()) -> Loaders:
    size = cast(int, cfg.img_size)  # resolved by resolve(): never None here
    # Training images are stored once for the largest side any epoch trains at; a progressive
    # run's smaller crops are resized down from them (Trainer.apply_plan swaps the transform).
    stored = stored_side_for(cfg)
    workers = default_workers() if cfg.workers is None else cfg.workers
    train_tf, eval_tf = train_transform(cfg, cast(int, cfg.final_train_size()), mean, std), eval_transform(size, mean, std)
    mode = decoded_cache_mode(cfg, splits)
    train_ds: Dataset
    val_ds: Dataset
    if mode == "ram":
        train_ds = DecodedImages(splits.train, stored, train_tf, workers=workers, progress=not cfg.quiet)
        val_ds = DecodedImages(splits.val, size, eval_tf, workers=workers, progress=not cfg.quiet)
    elif mode == "disk":
        where = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        train_ds = DiskImages(splits.train, stored, train_tf, cache_dir=where, workers=workers, progress=not cfg.quiet)
        val_ds = DiskImages(splits.val, size, eval_tf, cache_dir=where, workers=workers, progress=not cfg.quiet)
    else:
        train_ds, val_ds = ImageDataset(splits.train, train_tf), ImageDataset(splits.val, eval_tf)
    g, gw = torch.Generator(), torch.Generator()
    if info.enabled:
        sampler: torch.utils.data.Sampler[int] = ShardedShuffle(len(train_ds), g, info, cfg.batch_size)
        drop_last = True
        val_ds = torch.utils.data.Subset(val_ds, eval_shard(len(val_ds), info))
    else:
        sampler, drop_last = EpochShuffle(len(train_ds), g), len(train_ds) > cfg.batch_size
    workers = epoch_workers(cfg, mode == "ram", workers)  # the decoding above used them; the epochs may not
    train = DataLoader(train_ds, sampler=sampler, drop_last=drop_last, generator=gw, batch_size=cfg.batch_size,
                       num_workers=workers, pin_memory=torch.cuda.is_available(), collate_fn=collate_skipping)
    val = ordered_loader(val_ds, cfg.batch_size, workers)
    return Loaders(train, val, g, gw)


def set_train_side(loaders: Loaders, cfg: RunConfig, side: int | None, mean: Sequence[float],
                   std: Sequence[float]) -> None:
    """Training crops at ``side`` from now on (progressive resizing): the same stored images."""
    if side is not None:
        loaders.train.dataset.transform = train_transform(cfg, side, mean, std)  # type: ignore[attr-defined]


def train_transform(cfg: RunConfig, side: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """The augmentation preset at ``side``: what a training epoch at that side reads through."""
    return PRESETS[cfg.augment](side, mean, std)


def ordered_loader(ds: Dataset, batch_size: int, workers: int) -> DataLoader:
    """Every sample once, in order, skipping unreadable ones: for evaluation and features."""
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), collate_fn=collate_skipping)


def with_eval_transform(ds: Dataset, img_size: int, mean: Sequence[float], std: Sequence[float]) -> Dataset:
    """``ds`` through the deterministic eval transform, sharing any decoded-image cache."""
    out = copy.copy(ds)
    out.transform = eval_transform(img_size, mean, std)  # type: ignore[attr-defined]
    return out


def unsharded(ds: Dataset) -> Dataset:
    """The whole dataset behind a distributed run's per-rank shard: every rank must probe
    the same images to reach the same verdict."""
    return ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds

"""The linear probe behind ``auto``: how well do the frozen pretrained features already
separate the user's classes?

A logistic regression on the head's input features (the standard linear-probe protocol)
is trained on the training images through the deterministic eval transform and scored on
the validation images, at most ``PROBE_MAX_IMAGES`` of each. High skill means the data is
close to the pretraining domain; low skill means the body has to adapt.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from layerwise.cache import head_features
from layerwise.hardware import Amp, to_device
from layerwise.loaders import ordered_loader
from layerwise.progress import bar
from layerwise.rng import get_rng, set_rng

PROBE_MAX_IMAGES = 2000  # train and val images the probe sees at most: enough to rank, cheap on a CPU


@dataclass(frozen=True)
class ProbeResult:
    """Evidence for ``auto``: probe accuracy against the majority-class baseline."""

    acc: float
    chance: float
    train_images: int
    seconds: float

    @property
    def skill(self) -> float:
        """Accuracy rescaled so 0 is the majority-class guess and 1 is perfect."""
        return (self.acc - self.chance) / max(1e-9, 1.0 - self.chance)


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> float:
    """Validation accuracy of a logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:  # one class: nothing to separate
        return float(np.mean(val_y == train_y[0]))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    clf.fit(train_x, train_y)
    return float(np.mean(clf.predict(val_x) == val_y))


def _capped(ds: Dataset, max_images: int, seed: int) -> Dataset:
    """At most ``max_images`` of ``ds``, drawn with the run's seed (the same on every rank)."""
    if len(ds) <= max_images:
        return ds
    g = torch.Generator().manual_seed(seed)
    return Subset(ds, torch.randperm(len(ds), generator=g)[:max_images].tolist())


def probe_loaders(train: Dataset, val: Dataset, *, batch_size: int, workers: int, seed: int,
                  max_images: int = PROBE_MAX_IMAGES) -> tuple[DataLoader, DataLoader]:
    """Ordered loaders over at most ``max_images`` of each set (``train`` through the eval
    transform, ``val`` whole, not a distributed shard)."""
    return (ordered_loader(_capped(train, max_images, seed), batch_size, workers),
            ordered_loader(_capped(val, max_images, seed), batch_size, workers))


def linear_probe(model: nn.Module, head: nn.Module, train: DataLoader, val: DataLoader, device: torch.device,
                 amp: Amp, *, channels_last: bool = False, quiet: bool = True) -> ProbeResult:
    """Fit the probe on ``head``'s inputs over ``train`` and score it on ``val``; the model's
    weights, head and RNG are left as they were."""
    tic = time.perf_counter()
    rng = get_rng()
    prep = functools.partial(to_device, device=device, channels_last=channels_last)
    tx, ty = head_features(model, head, bar(train, "probe: train features", enabled=not quiet, total=len(train),
                                            unit="batch"), device, amp.autocast, prep)
    vx, vy = head_features(model, head, bar(val, "probe: val features", enabled=not quiet, total=len(val),
                                            unit="batch"), device, amp.autocast, prep)
    set_rng(rng)
    acc = probe_accuracy(tx.flatten(1).numpy(), ty.numpy(), vx.flatten(1).numpy(), vy.numpy())
    chance = float(torch.bincount(vy).max() / len(vy))
    return ProbeResult(acc, chance, len(ty), time.perf_counter() - tic)

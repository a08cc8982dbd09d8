"""The linear probe behind ``auto``: how well do the frozen pretrained features already
separate the user's classes?

A logistic regression on the head's input features (the standard linear-probe protocol)
is trained on the training images through the deterministic eval transform and scored on
the validation images, at most ``PROBE_MAX_IMAGES`` of each. High skill means the data is
close to the pretraining domain; low skill means the body has to adapt.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from layerwise.augment import eval_transform
from layerwise.cache import head_features
from layerwise.data import collate_skipping
from layerwise.hardware import to_device
from layerwise.progress import bar

if TYPE_CHECKING:
    from layerwise.engine import Trainer

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


def _loader(t: Trainer, ds: Dataset) -> DataLoader:
    return DataLoader(ds, batch_size=t.cfg.batch_size, shuffle=False, num_workers=t.loaders.train.num_workers,
                      collate_fn=collate_skipping)


def _train_images(t: Trainer) -> Dataset:
    """The training set through the eval transform, sharing any decoded cache."""
    ds = copy.copy(t.loaders.train.dataset)
    ds.transform = eval_transform(t.cfg.img_size, t.s.loaded.mean, t.s.loaded.std)
    return ds


def _val_images(t: Trainer) -> Dataset:
    """Every validation image, also when distributed runs shard them: each rank must
    reach the same verdict."""
    ds = t.loaders.val.dataset
    return ds.dataset if isinstance(ds, Subset) else ds


def linear_probe(t: Trainer, *, max_images: int = PROBE_MAX_IMAGES) -> ProbeResult:
    """Probe the trainer's pretrained model; its weights, head and RNG are left as they were."""
    head = t.head_module()
    if head is None:
        raise ValueError("the linear probe needs a head group made of one module")
    tic = time.perf_counter()
    rng = torch.get_rng_state()
    prep = lambda x: to_device(x, t.device, t.cfg.channels_last)  # noqa: E731
    train, val = (_loader(t, _capped(ds, max_images, t.cfg.seed)) for ds in (_train_images(t), _val_images(t)))
    show = not t.cfg.quiet
    tx, ty = head_features(t.model, head, bar(train, "probe: train features", enabled=show, total=len(train),
                                              unit="batch"), t.device, t.amp.autocast, prep)
    vx, vy = head_features(t.model, head, bar(val, "probe: val features", enabled=show, total=len(val),
                                              unit="batch"), t.device, t.amp.autocast, prep)
    torch.set_rng_state(rng)
    acc = probe_accuracy(tx.flatten(1).numpy(), ty.numpy(), vx.flatten(1).numpy(), vy.numpy())
    chance = float(torch.bincount(vy).max() / len(vy))
    return ProbeResult(acc, chance, len(ty), time.perf_counter() - tic)

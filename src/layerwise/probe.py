"""The linear probe behind ``auto``: how well do the frozen pretrained features already
separate the user's classes?

A logistic regression on the head's input features (the standard linear-probe protocol)
is trained on the training images through the deterministic eval transform and scored on
the validation images, at most ``PROBE_MAX_IMAGES`` of each. High skill means the data is
close to the pretraining domain; low skill means the body has to adapt. The same forward
pass also gives an earlier depth's features (the output of the stage before the last,
averaged over positions, as in Head2Toe): when they fit better than the last stage's, the
last stages are specialised to the pretraining task.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from layerwise.capture import head_features
from layerwise.groups import LayerGroup
from layerwise.hardware import Amp, to_device
from layerwise.loaders import ordered_loader
from layerwise.prefix import prefix_output
from layerwise.progress import bar
from layerwise.rng import get_rng, set_rng
from layerwise.shift import measure_bn_shift

P = ParamSpec("P")
R = TypeVar("R")
PROBE_MAX_IMAGES = 2000  # train and val images the probe sees at most: enough to rank, cheap on a CPU
# The probe's fits work on a few thousand rows at most: in one BLAS/OpenMP thread they ran 10-14x
# faster than in the default pool on the 2-core CI machine beside another job (fit_probe on
# 1000 x 1280 features, 10 classes: 1.1-1.4 s against 15.3-17.3 s; the L-BFGS steps are tiny and
# the idle pool threads spun against each other), and never slower (the H-score's 1280 x 1280
# solve alike). Scoped to these calls: every pool, torch's included, is as before afterwards.
def one_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run with every BLAS and OpenMP pool limited to one thread."""

    @functools.wraps(fn)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        # threadpoolctl limits the libraries already loaded: scikit-learn's (and scipy's
        # OpenBLAS) load on first use, after a limit set before it would have been taken
        import sklearn.linear_model  # noqa: F401
        import sklearn.neighbors  # noqa: F401

        with threadpool_limits(limits=1):
            return fn(*args, **kwargs)

    return wrapped


@dataclass(frozen=True)
class LinearHead:
    """A linear classifier on the raw head input: ``logits = x @ weight.T + bias``."""

    weight: np.ndarray  # (classes, features)
    bias: np.ndarray  # (classes,)
    c: float  # the inverse regularisation strength chosen on held-out training features

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.logits(x).argmax(1) == y))


@dataclass(frozen=True)
class ProbeResult:
    """Evidence for ``auto``: probe accuracy against the majority-class baseline, and the
    probe itself, ready to become the model's head."""

    acc: float
    chance: float
    train_images: int
    seconds: float
    head: LinearHead | None = None
    knn_acc: float | None = None  # 10-nearest-neighbour val accuracy on standardised features
    hscore: float | None = None  # H-score (Bao et al., 2019): class-separating variance of the features
    bn_shift: float | None = None  # shift.py: the data's distance from the pretrained BatchNorm statistics
    earlier_acc: float | None = None  # the probe on the stage before the last (pooled), when asked for

    @property
    def skill(self) -> float:
        """Accuracy rescaled so 0 is the majority-class guess and 1 is perfect."""
        return skill(self.acc, self.chance)

    @property
    def earlier_skill(self) -> float | None:
        return None if self.earlier_acc is None else skill(self.earlier_acc, self.chance)


def skill(acc: float, chance: float) -> float:
    return (acc - chance) / max(1e-9, 1.0 - chance)


PROBE_CS = (0.01, 0.1, 1.0, 10.0)  # logistic regression's C, chosen per dataset on held-out training features


@one_thread
def fit_probe(x: np.ndarray, y: np.ndarray, num_classes: int, *, seed: int = 0, cs: tuple[float, ...] = PROBE_CS,
              holdout: float = 0.2) -> LinearHead:
    """Logistic regression on standardised features, its C chosen on a stratified held-out
    part of the *training* features (validation stays untouched), refitted on all of them,
    with the standardisation folded into the weights: ``W' = W / sigma``,
    ``b' = b - W @ (mu / sigma)``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(y, minlength=num_classes)
    c = cs[0] if len(cs) == 1 else 1.0  # one C given: that one; none searchable: sklearn's default
    if len(cs) > 1 and counts[counts > 0].min() >= 2 and len(y) * holdout >= (counts > 0).sum():
        fit_x, held_x, fit_y, held_y = train_test_split(x, y, test_size=holdout, stratify=y, random_state=seed)
        scaler = StandardScaler().fit(fit_x)
        fit_x, held_x = scaler.transform(fit_x), scaler.transform(held_x)
        # strongest regularisation first, each fit starting from the last one's solution: the same
        # convex optimum, reached in fewer iterations (four C's on gtsrb's held-out split, Lite0
        # features at 112 px: 61 + 40 + 11 + 6 L-BFGS iterations warm against 61 + 75 + 44 + 24 cold)
        path = LogisticRegression(C=min(cs), max_iter=1000, warm_start=True)
        scores = []
        for ci in sorted(cs):
            path.C = ci
            scores.append(path.fit(fit_x, fit_y).score(held_x, held_y))
        c = sorted(cs)[int(np.argmax(scores))]  # the first (strongest regularisation) among ties
    scaler = StandardScaler().fit(x)
    classes = np.unique(y)
    w = np.zeros((num_classes, x.shape[1]))
    b = np.full(num_classes, -1e4)  # a class with no training image is never predicted
    if len(classes) < 2:  # one class: nothing to separate
        b[classes[0]] = 0.0
        return LinearHead(w, b, c)
    # a cold fit: the head is sklearn's own solution at this C, whatever path chose C
    clf = LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(x), y)
    coef, inter = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: sklearn keeps one row, the logit of the second class
        coef, inter = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, inter[0]])
    sigma = scaler.scale_
    w[classes] = coef / sigma
    b[classes] = inter - (coef * (scaler.mean_ / sigma)).sum(1)
    return LinearHead(w, b, c)


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> float:
    """Validation accuracy of :func:`fit_probe`'s classifier."""
    head = fit_probe(train_x, train_y, int(max(train_y.max(), val_y.max())) + 1)
    return head.accuracy(val_x, val_y)


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
                 amp: Amp, *, channels_last: bool = False, quiet: bool = True, seed: int = 0,
                 earlier: nn.Module | None = None) -> ProbeResult:
    """Fit the probe on ``head``'s inputs over ``train`` and score it on ``val`` (and, given
    ``earlier``, a second probe on that module's pooled output); the model's weights, head
    and RNG are left as they were."""
    tic = time.perf_counter()
    rng = get_rng()
    prep = functools.partial(to_device, device=device, channels_last=channels_last)
    # the same forward passes, read on the way
    with measure_bn_shift(model) as shift, pooled_outputs(earlier) as early_train:
        tx, ty = head_features(model, head, bar(train, "probe: train features", enabled=not quiet, total=len(train),
                                                unit="batch"), device, amp.autocast, prep)
    with pooled_outputs(earlier) as early_val:
        vx, vy = head_features(model, head, bar(val, "probe: val features", enabled=not quiet, total=len(val),
                                                unit="batch"), device, amp.autocast, prep)
    set_rng(rng)
    num_classes = int(max(ty.max(), vy.max())) + 1
    if isinstance(head, nn.Linear):
        num_classes = head.out_features
    train_x, val_x = tx.flatten(1).double().numpy(), vx.flatten(1).double().numpy()
    fitted = fit_probe(train_x, ty.numpy(), num_classes, seed=seed)
    acc = fitted.accuracy(val_x, vy.numpy())
    chance = float(torch.bincount(vy).max() / len(vy))
    earlier_acc = None
    if early_train and early_val and sum(map(len, early_train)) == len(ty) and sum(map(len, early_val)) == len(vy):
        # at the last depth's C: one fit instead of a search, so the second depth costs little
        early = fit_probe(torch.cat(early_train).double().numpy(), ty.numpy(), num_classes, cs=(fitted.c,))
        earlier_acc = early.accuracy(torch.cat(early_val).double().numpy(), vy.numpy())
    return ProbeResult(acc, chance, len(ty), time.perf_counter() - tic, fitted,
                       knn_acc=knn_accuracy(train_x, ty.numpy(), val_x, vy.numpy()), hscore=h_score(train_x, ty.numpy()),
                       bn_shift=shift.value(), earlier_acc=earlier_acc)


@contextlib.contextmanager
def pooled_outputs(module: nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """While open, every forward pass through ``module`` adds its output, averaged over
    positions (the spatial axes of an NCHW map, the tokens of a sequence), to the list."""
    got: list[torch.Tensor] = []
    if module is None:
        yield got
        return

    def grab(_m: nn.Module, _args: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor):
            t = out.float()
            got.append((t.mean((2, 3)) if t.dim() == 4 else t.mean(1) if t.dim() == 3 else t.flatten(1)).cpu())

    handle = module.register_forward_hook(grab)
    try:
        yield got
    finally:
        handle.remove()


@one_thread
def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, k: int = 10) -> float:
    """Validation accuracy of k nearest neighbours (cosine, standardised features): evidence
    that needs no fitting at all."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    knn = KNeighborsClassifier(n_neighbors=min(k, len(train_y)), metric="cosine")
    knn.fit(scaler.transform(train_x), train_y)
    return float(np.mean(knn.predict(scaler.transform(val_x)) == val_y))


@one_thread
def h_score(x: np.ndarray, y: np.ndarray) -> float:
    """H-score, ``tr(cov(f)^-1 cov(E[f|y]))`` (Bao et al., 2019), on standardised features:
    how much of the features' variance separates the classes (higher: easier transfer)."""
    f = (x - x.mean(0)) / (x.std(0) + 1e-8)
    class_means = np.zeros_like(f)
    for c in np.unique(y):
        class_means[y == c] = f[y == c].mean(0)
    cov_f = np.cov(f, rowvar=False) + 1e-3 * np.eye(f.shape[1])  # shrinkage: fewer images than features
    cov_g = np.cov(class_means, rowvar=False)
    return float(np.trace(np.linalg.solve(cov_f, cov_g)))


def load_probe_head(head: nn.Module, probe: LinearHead) -> bool:
    """Make ``head`` the probe, when it is a linear layer of the probe's shape (an MLP head
    starts fresh). Returns whether it did."""
    if not isinstance(head, nn.Linear) or tuple(head.weight.shape) != probe.weight.shape:
        return False
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(probe.weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(probe.bias, dtype=head.bias.dtype))
    return True


def earlier_depth(model: nn.Module, groups: Sequence[LayerGroup], sample: torch.Tensor) -> tuple[str, str] | None:
    """(group, module) whose pooled output is the probe's earlier depth: the output of every
    group before the last one of the body (Head2Toe-style evidence on how specialised the
    last stage is); None for a model of fewer than two body groups."""
    k = len(groups) - 2
    if k < 1:
        return None
    rng = get_rng()  # finding it must not shift the training RNG (a re-run without the probe replays it)
    try:
        module = prefix_output(model, groups, k, sample)
    finally:
        set_rng(rng)
    return (groups[k - 1].name, module) if module else None

"""Evaluation: accuracy and loss over a loader or cached features, with TTA and DDP gathering."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from layerwise.distributed import DistInfo, gather_cat, unshard_order
from layerwise.hardware import Amp, to_device
from layerwise.tta import predict_proba


@dataclass
class EvalResult:
    loss: float
    acc: float
    labels: torch.Tensor
    probs: torch.Tensor

    @classmethod
    def from_probs(cls, probs: torch.Tensor, labels: torch.Tensor) -> EvalResult:
        """Mean NLL and accuracy of class probabilities against labels."""
        loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
        return cls(loss, (probs.argmax(-1) == labels).float().mean().item(), labels, probs)

    @property
    def preds(self) -> torch.Tensor:
        return self.probs.argmax(-1)

    def confusion(self, num_classes: int) -> torch.Tensor:
        idx = self.labels * num_classes + self.preds
        return torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)

    def per_class_acc(self, num_classes: int) -> list[float]:
        cm = self.confusion(num_classes).float()
        return (cm.diag() / cm.sum(1).clamp(min=1)).tolist()


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, amp: Amp, device: torch.device,
             views: Sequence[str] = (), channels_last: bool = False) -> EvalResult:
    """Accuracy and mean NLL over ``loader``; TTA views are averaged as probabilities."""
    was_training = model.training
    model.eval()
    labels, probs = [], []
    for x, y in loader:
        x = to_device(x, device, channels_last)
        with amp.autocast():
            probs.append(predict_proba(model, x, views).float().cpu())
        labels.append(y)
    model.train(was_training)
    p, y = torch.cat(probs), torch.cat(labels)
    return EvalResult.from_probs(p, y)


@torch.inference_mode()
def evaluate_features(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, amp: Amp,
                      device: torch.device, batch_size: int = 1024) -> EvalResult:
    """:func:`evaluate` on cached head inputs (no TTA: views were not cached)."""
    was_training = head.training
    head.eval()
    with amp.autocast():
        probs = torch.cat([head(feats[i:i + batch_size].to(device)).float().softmax(-1).cpu()
                           for i in range(0, len(labels), batch_size)])
    head.train(was_training)
    return EvalResult.from_probs(probs, labels)


def gather_eval(ev: EvalResult, info: DistInfo) -> EvalResult:
    """Every rank's shard of the validation set, back in dataset order, scored once."""
    if not info.enabled:
        return ev
    probs, labels = gather_cat(ev.probs, info), gather_cat(ev.labels, info)
    order = unshard_order(len(labels), info)
    probs, labels = probs[order], labels[order]
    return EvalResult.from_probs(probs, labels)


def evaluate_images(model: nn.Module, items: Sequence[tuple], transform: Callable, amp: Amp, device: torch.device, *,
                    batch_size: int, views: Sequence[str] = (), channels_last: bool = False) -> EvalResult:
    """``items`` (readable image files with labels) through ``transform``, in order, evaluated:
    what ``evaluate`` on a run folder and fit's final test score share."""
    from layerwise.data import ImageDataset, collate_skipping

    loader = DataLoader(ImageDataset(items, transform), batch_size=batch_size, collate_fn=collate_skipping)
    return evaluate(model, loader, amp, device, views=views, channels_last=channels_last)


def test_result(ev: EvalResult, items: Sequence[tuple], skipped: list[dict], views: Sequence[str]) -> dict:
    """test.json: a score on DATA/test, and each image's right/wrong (``class/file`` keys), so
    that two runs can be compared pairwise on the same images."""
    return {"test_acc": ev.acc, "test_loss": ev.loss, "images": len(items), "skipped": skipped,
            "views": list(views), "note": "DATA/test, never used for a choice (strategy, epoch, threshold)",
            "correct": {image_key(src): int(ok) for (src, _), ok in zip(items, (ev.preds == ev.labels).tolist())}}


def score_test(score: Callable[[Sequence[str]], EvalResult], items: Sequence[tuple], skipped: list[dict],
               views: Sequence[str]) -> dict:
    """test.json from ``score(views)``; with TTA views, also the score without them
    (``without_views``, image by image), so what TTA added is measured on the same images."""
    out = test_result(score(views), items, skipped, views)
    if views:
        plain = test_result(score(()), items, skipped, ())
        out["without_views"] = {k: plain[k] for k in ("test_acc", "test_loss", "correct")}
    return out


def image_key(src: object) -> str:
    """``class/file`` for an image file; the index for an in-memory image."""
    return f"{Path(src).parent.name}/{Path(src).name}" if isinstance(src, (str, Path)) else str(src)

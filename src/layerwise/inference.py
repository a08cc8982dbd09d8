"""Use a finished run: rebuild its model, evaluate it, predict, with optional TTA."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from layerwise.augment import eval_transform
from layerwise.checkpoint import load_weights
from layerwise.data import ImageDataset, class_counts, eval_items, open_image
from layerwise.errors import DataError, MissingPathError
from layerwise.models import create_model


@dataclass
class RunModel:
    """A trained model with what it needs to be fed."""

    model: nn.Module
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int

    def transform(self):  # noqa: ANN201 - a torchvision Compose
        return eval_transform(self.img_size, self.mean, self.std)


def load_run(run: str | Path, weights: str = "best") -> RunModel:
    """Rebuild RUN's architecture and head, then load ``best`` (or ``last``) weights."""
    run = Path(run)
    info_path = run / "model.json"
    if not info_path.is_file():
        raise MissingPathError(f"{str(run)!r} is not a layerwise run folder (no model.json); pass the --out of a fit")
    info = json.loads(info_path.read_text())
    wpath = run / "best.safetensors" if weights == "best" else run / "last" / "model.safetensors"
    if not wpath.is_file():
        raise MissingPathError(f"{str(wpath)!r} does not exist; the run has not finished an epoch yet")
    # Build the exact architecture that was trained (e.g. tf_efficientnet_lite0), unweighted.
    loaded = create_model(f"{info['source']}/{info['arch']}", info["num_classes"], weights="none",
                          head=info["head"], hidden=info["hidden"])
    load_weights(wpath, loaded.model)
    loaded.model.eval()
    return RunModel(loaded.model, info["classes"], tuple(info["mean"]), tuple(info["std"]), info["img_size"])


def evaluate_run(run: str | Path, data: str, *, views: Sequence[str] = (), batch_size: int = 64,
                 precision: str = "fp32", device: str = "auto") -> dict:
    """Accuracy, per-class accuracy and confusion matrix of RUN's best weights on DATA."""
    from layerwise.evaluation import evaluate
    from layerwise.hardware import Amp, pick_device

    rm = load_run(run)
    items = eval_items(data, rm.classes)
    dev = pick_device(device)
    loader = DataLoader(ImageDataset(items, rm.transform()), batch_size=batch_size)
    res = evaluate(rm.model.to(dev), loader, Amp(precision, dev), dev, views=views)
    k = len(rm.classes)
    return {
        "data": data, "images": len(items), "tta": list(views), "accuracy": res.acc, "loss": res.loss,
        "per_class_accuracy": dict(zip(rm.classes, res.per_class_acc(k))),
        "class_counts": class_counts(items, rm.classes),
        "confusion": res.confusion(k).tolist(), "classes": rm.classes,
    }


def predict(run: str | Path, images: Sequence[str], *, views: Sequence[str] = (), topk: int = 3) -> list[dict]:
    """Top-k classes with probabilities for each image file."""
    from layerwise.tta import predict_proba

    rm = load_run(run)
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise MissingPathError(f"image file(s) not found: {', '.join(missing)}")
    tf = rm.transform()
    out = []
    for path in images:
        try:
            x = tf(open_image(path)).unsqueeze(0)
        except OSError as e:
            raise DataError(f"cannot read image {path!r}: {e}") from e
        p = predict_proba(rm.model, x, views)[0]
        top = p.topk(min(topk, len(rm.classes)))
        out.append({"image": path, "top": [{"class": rm.classes[i], "probability": float(v)}
                                           for v, i in zip(top.values.tolist(), top.indices.tolist())]})
    return out


EXPORT_FORMATS = ("onnx", "torchscript")


def export_run(run: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """Write RUN's best model as ONNX or TorchScript (batch dimension dynamic)."""
    from layerwise.errors import UnknownNameError

    if fmt not in EXPORT_FORMATS:
        raise UnknownNameError("export format", fmt, EXPORT_FORMATS)
    rm = load_run(run)
    x = torch.zeros(1, 3, rm.img_size, rm.img_size)
    path = Path(out) if out else Path(run) / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")
    if fmt == "onnx":
        torch.onnx.export(rm.model, (x,), str(path), dynamo=False, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    else:
        torch.jit.trace(rm.model, x).save(str(path))
    return path

"""Use a finished run: rebuild its model, evaluate it, predict, with optional TTA."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from layerwise import rundir
from layerwise.augment import eval_transform
from layerwise.checkpoint import load_state, load_weights
from layerwise.data import (
    IMAGE_ERRORS,
    check_images,
    class_counts,
    eval_items,
    open_image,
)
from layerwise.errors import DataError, LayerwiseError, MissingPathError
from layerwise.hardware import Amp
from layerwise.models import create_model

if TYPE_CHECKING:
    from layerwise.evaluation import EvalResult


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


def load_run(run: str | Path, *, paused: bool = False) -> RunModel:
    """Rebuild RUN's architecture and head, then load its best weights (``paused``: the
    weights its checkpoint holds, where the run paused, the EMA's when it keeps one; auto's
    race scores a rung shorter than an epoch so)."""
    run = Path(run)
    info = rundir.read_model_info(run)
    wpath = rundir.RunDir(run).state if paused else rundir.RunDir(run).best
    if not wpath.is_file():
        raise MissingPathError(f"{str(wpath)!r} does not exist; the run has not "
                               + ("started" if paused else "finished an epoch yet"))
    # Build the exact architecture that was trained (e.g. tf_efficientnet_lite0), unweighted,
    # once its shapes are known to match the weights file: a crafted model.json must not make
    # us allocate a giant model first.
    build = dict(name=f"{info['source']}/{info['arch']}", num_classes=info["num_classes"], weights="none",
                 head=info["head"], hidden=info["hidden"])
    if paused:  # our own checkpoint, loaded weights-only
        loaded = create_model(**build)
        loaded.model.load_state_dict(paused_weights(run))
    else:
        _check_shapes(wpath, build)
        loaded = create_model(**build)
        load_weights(wpath, loaded.model)
    loaded.model.eval()
    return RunModel(loaded.model, info["classes"], tuple(info["mean"]), tuple(info["std"]), info["img_size"])


def paused_weights(run: Path) -> dict[str, torch.Tensor]:
    """The weights RUN's checkpoint evaluates with, where it paused: its EMA's (AveragedModel
    keeps them under ``module.``) when it keeps one, else the model's."""
    state = load_state(rundir.RunDir(run).state)
    ema = state.get("ema")
    if ema is not None:
        return {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}
    return state["model"]


@dataclass
class Scorer:
    """A run's model on a device with fixed numerics: what evaluate, auto's race, WiSE-FT and
    soups score image lists with. Loading other weights into ``run.model`` (a mix, a soup)
    scores those."""

    run: RunModel
    device: torch.device
    amp: Amp
    batch_size: int
    channels_last: bool = False

    def __call__(self, items: Sequence[tuple], *, views: Sequence[str] = ()) -> EvalResult:
        from layerwise.evaluation import evaluate_images

        return evaluate_images(self.run.model, items, self.run.transform(), self.amp, self.device,
                               batch_size=self.batch_size, views=views, channels_last=self.channels_last)


def scorer(run: str | Path, *, precision: str = "fp32", device: str = "auto", batch_size: int | None = None,
           channels_last: bool = False, paused: bool = False) -> Scorer:
    """RUN's best weights (``paused``: :func:`load_run`'s), ready to score images."""
    from layerwise.hardware import pick_device

    rm, dev = load_run(run, paused=paused), pick_device(device)
    rm.model.to(dev)
    return Scorer(rm, dev, Amp(precision, dev), batch_size or eval_batch_size(rm.img_size), channels_last)


def validated_scorer(run: str | Path, *, paused: bool = False) -> Scorer:
    """RUN's best weights (``paused``: :func:`load_run`'s) with the numerics the run validated
    with (config.yaml's device, precision and memory format), so a score on val is its metrics
    row's."""
    from layerwise.config import load_yaml

    saved = load_yaml(rundir.RunDir(Path(run)).config)
    return scorer(run, precision=saved["precision"], device=saved["device"], channels_last=saved["channels_last"],
                  paused=paused)


def _check_shapes(wpath: Path, build: dict) -> None:
    """The architecture model.json names, built on the meta device (no memory), against the
    tensor shapes in the weights file's header."""
    from safetensors import safe_open

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in create_model(**build).model.state_dict().items()}
    try:
        with safe_open(str(wpath), framework="pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise rundir.RunFileError(f"cannot load weights from {str(wpath)!r}: not a readable safetensors file ({e}); "
                                  "re-run the fit to rewrite it") from e
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        raise rundir.RunFileError(
            f"cannot load weights: model.json and {wpath.name} do not match: {build['name']} with a {build['head']} head "
            f"(hidden {build['hidden']}, {build['num_classes']} classes) differs in {', '.join(diff[:3])}"
            + (f" and {len(diff) - 3} more" if len(diff) > 3 else "") + "; the run folder was edited or mixed up")


EVAL_ACTIVATION_FACTOR = 40  # a forward pass holds about this many times its input in activations
EVAL_RAM_SHARE = 8  # evaluation takes at most an eighth of the memory


def eval_batch_size(img_size: int, *, ram: int | None = None, most: int = 64) -> int:
    """Images per evaluation batch: ``most``, fewer when large sides would need more than
    an eighth of the memory (64 images at 2048 px asked for about 17 GB)."""
    from layerwise.hardware import total_ram

    per_image = 3 * img_size * img_size * 4 * EVAL_ACTIVATION_FACTOR
    return max(1, min(most, (ram or total_ram()) // EVAL_RAM_SHARE // per_image))


def run_views(run: str | Path) -> list[str]:
    """The TTA views RUN's final evaluation used (config.yaml's resolved ``tta``; none for a
    run without, or one older than the field)."""
    from layerwise.config import load_yaml

    cfg = rundir.RunDir(Path(run)).config
    return list(load_yaml(cfg).get("tta") or []) if cfg.is_file() else []


def evaluate_run(run: str | Path, data: str, *, views: Sequence[str] | None = None, batch_size: int | None = None,
                 precision: str = "fp32", device: str = "auto") -> dict:
    """Accuracy, per-class accuracy and confusion matrix of RUN's best weights on DATA, with
    ``views`` (None: the run's own, so test.json's score is reproduced; ``["identity"]``: none)."""
    views = run_views(run) if views is None else views
    score = scorer(run, precision=precision, device=device, batch_size=batch_size)
    rm = score.run
    scored, items = eval_items(data, rm.classes)
    items, skipped = check_images(items)  # unreadable files are listed, as fit does, not a crash
    if not items:
        raise DataError(f"no readable images in {scored}: all {len(skipped)} failed to decode, "
                        f"e.g. {skipped[0]['path']} ({skipped[0]['reason']})")
    res = score(items, views=views)
    k = len(rm.classes)
    return {
        "data": data, "scored": scored, "images": len(items), "skipped": skipped,
        "tta": list(views), "accuracy": res.acc, "loss": res.loss,
        "per_class_accuracy": dict(zip(rm.classes, res.per_class_acc(k))),
        "class_counts": class_counts(items, rm.classes),
        "confusion": res.confusion(k).tolist(), "classes": rm.classes,
    }


def iter_predictions(run: str | Path, images: Sequence[str], *, views: Sequence[str] | None = None,
                     topk: int = 3) -> Iterator[dict]:
    """Top-k classes with probabilities for each image file, as each is done, with ``views``
    (None: the run's own TTA views). A file that is missing or unreadable gives ``{"image",
    "error"}`` instead: one bad file of many costs only itself."""
    from layerwise.tta import predict_proba

    views = run_views(run) if views is None else views
    rm = load_run(run)
    tf = rm.transform()
    for path in images:
        if not Path(path).is_file():
            yield {"image": path, "error": "not found"}
            continue
        try:
            x = tf(open_image(path)).unsqueeze(0)
        except IMAGE_ERRORS as e:  # truncated, not an image, or a decompression bomb
            yield {"image": path, "error": f"{type(e).__name__}: {e}"}
            continue
        p = predict_proba(rm.model, x, views)[0]
        top = p.topk(min(topk, len(rm.classes)))
        yield {"image": path, "top": [{"class": rm.classes[i], "probability": float(v)}
                                      for v, i in zip(top.values.tolist(), top.indices.tolist())]}


def predict(run: str | Path, images: Sequence[str], *, views: Sequence[str] | None = None, topk: int = 3) -> list[dict]:
    """:func:`iter_predictions` as a list; an error only when no image could be read."""
    out = list(iter_predictions(run, images, views=views, topk=topk))
    if out and all("error" in r for r in out):
        raise DataError("no image could be read: " + "; ".join(f"{r['image']} ({r['error']})" for r in out[:10]))
    return out


EXPORT_FORMATS = ("onnx", "torchscript")


PARITY_TOLERANCE = 1e-3  # max |logit difference| an export may show against PyTorch


@dataclass
class Export:
    """An exported file, how it was made, and how closely it reproduces PyTorch's logits."""

    path: Path
    exporter: str
    max_abs_diff: float | None  # None: no runtime to check with (pip install onnxruntime)
    images: int


def export_run(run: str | Path, fmt: str, out: str | Path | None = None) -> Export:
    """Write RUN's best model as ONNX or TorchScript (batch dimension dynamic), then run the
    file on random images of two batch sizes and compare its logits with PyTorch's."""
    from layerwise.errors import UnknownNameError

    if fmt not in EXPORT_FORMATS:
        raise UnknownNameError("export format", fmt, EXPORT_FORMATS)
    files = rundir.RunDir(Path(run))
    path = Path(out) if out else (files.onnx if fmt == "onnx" else files.torchscript)
    _check_output(path)
    rm = load_run(run)
    x = torch.zeros(1, 3, rm.img_size, rm.img_size)
    with _written_whole(path) as tmp:
        if fmt == "onnx":
            exporter = _export_onnx(rm.model, x, tmp)
        else:  # serialised in memory and written by Python: a full disk is an OSError, not a C++ abort
            import io

            exporter, buf = "torch.jit.trace", io.BytesIO()
            torch.jit.save(torch.jit.trace(rm.model, x), buf)
            tmp.write_bytes(buf.getvalue())
    if fmt == "onnx":
        run_file = _onnx_runner(path)
    else:
        scripted = torch.jit.load(str(path))
        run_file = lambda batch: scripted(batch).detach()  # noqa: E731
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, rm.img_size, rm.img_size, generator=g) for n in (1, 3)]
    diff = None
    if run_file is not None:
        with torch.inference_mode():
            diff = max(float((run_file(b) - rm.model(b)).abs().max()) for b in batches)
        if diff > PARITY_TOLERANCE:
            raise LayerwiseError(f"{path} was written, but its logits differ from PyTorch's by up to {diff:.2e} "
                                 f"(tolerance {PARITY_TOLERANCE:g}); do not deploy it. Try --format torchscript")
    return Export(path, exporter, diff, sum(len(b) for b in batches))


def _check_output(path: Path) -> None:
    """Where the export goes must be a writable file path, checked before minutes of work."""
    if path.is_dir():
        raise LayerwiseError(f"--output {str(path)!r} is a folder; give a file path, e.g. {path / 'model.onnx'}")
    if not path.parent.is_dir():
        raise MissingPathError(f"--output {str(path)!r}: its folder {str(path.parent)!r} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise LayerwiseError(f"--output {str(path)!r}: the folder {str(path.parent)!r} is not writable; "
                             "choose another --output")


@contextlib.contextmanager
def _written_whole(path: Path) -> Iterator[Path]:
    """A temp file beside ``path``, renamed onto it once written whole: a failed or full-disk
    write leaves no partial file under the final name, and says why."""
    tmp = path.with_name(f".{path.name}.export{rundir.TMP_SUFFIX}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise LayerwiseError(f"could not write {str(path)!r}: {e.strerror or e}; free space there or choose "
                             "another --output (nothing was left under that name)") from e
    finally:
        tmp.unlink(missing_ok=True)


def _export_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> str:
    """torch.export-based ONNX (the maintained exporter), else the legacy TorchScript one
    when onnxscript is missing or the model does not export that way."""
    import io
    import warnings

    names = {"input_names": ["image"], "output_names": ["logits"]}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
        return "torch.export (dynamo)"
    except Exception:  # noqa: BLE001 - any failure of the new path falls back to the proven one
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (x,), str(path), dynamo=False, dynamic_axes={"image": {0: "batch"},
                              "logits": {0: "batch"}}, **names)
        return "torch.onnx legacy (TorchScript)"


def _onnx_runner(path: Path):  # noqa: ANN202 - a callable batch -> logits, or None
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: torch.from_numpy(session.run(None, {name: batch.numpy()})[0])

"""Datasets: image folders, CSV files, stratified splits and the embedded default.

DATA is one of:
- a folder with ``train/`` and ``val/`` (optional ``test/``) class folders;
- one folder of class folders, split with ``val_split`` (stratified, seeded);
- a CSV of ``path,label`` rows (paths relative to the CSV), split likewise;
- nothing: the embedded default, scikit-learn's 1,797 real handwritten digits.
"""

from __future__ import annotations

import csv
import json
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from layerwise.errors import DataError, MissingPathError, read_user_text
from layerwise.progress import bar

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
Source = str | np.ndarray  # a file path, or an in-memory HxW / HxWx3 uint8 image
Item = tuple[Source, int]
DEFAULT_NAME = "digits (scikit-learn, embedded)"
DEFAULT_IMG_SIZE = 96  # the digits are 8x8; 96 px measured more accurate than 64 and fast on a CPU


@dataclass
class Splits:
    """Train and val items over one class list (a test/ split is for ``evaluate``)."""

    train: list[Item]
    val: list[Item]
    classes: list[str]
    name: str = ""
    skipped: list[dict] = field(default_factory=list)  # unreadable files dropped by the data check
    test: list[Item] = field(default_factory=list)  # DATA/test: scored once at the end, never used for a choice

    @property
    def images_per_class(self) -> float:
        return len(self.train) / max(1, len(self.classes))


# What a broken or hostile image file raises while it is opened and decoded.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def open_image(src: Source) -> Image.Image:
    """An RGB PIL image, with EXIF orientation applied to photos.

    Raises one of ``IMAGE_ERRORS`` for unreadable files: truncated, empty, not an image,
    or over PIL's decompression-bomb pixel limit.
    """
    if isinstance(src, np.ndarray):
        return Image.fromarray(src).convert("RGB")
    with warnings.catch_warnings():
        # Past MAX_IMAGE_PIXELS PIL only warns; treat that as the bomb it may be.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _decode(src)


def _decode(src: str) -> Image.Image:
    with Image.open(src) as im:
        im.load()  # decode now, so truncation fails here and not inside a transform
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            # Composite transparency on white rather than letting it turn black.
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float32) / 257.0  # 16-bit range onto 8-bit
            return Image.fromarray(arr.round().clip(0, 255).astype(np.uint8)).convert("RGB")
        return im.convert("RGB")


class ImageDataset(Dataset):
    """(image tensor, label) pairs from items, through ``transform``.

    An image that fails to decode yields ``None`` (with a warning) instead of killing
    the epoch; :func:`collate_skipping` drops it from the batch.
    """

    def __init__(self, items: Sequence[Item], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        src, label = self.items[i]
        try:
            img = open_image(src)
        except IMAGE_ERRORS as e:
            warnings.warn(f"skipping unreadable image {src}: {e}", stacklevel=1)
            return None
        return self.transform(img), label


def collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.utils.data import default_collate

    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return default_collate(kept)


# Files this process has decoded, by (path, size, mtime, PIL's pixel limit): None when
# readable, else why not.
# auto's race sets the data up once per candidate and --model auto once per backbone, and
# each set-up checks it; decoding a large folder again each time cost minutes, not seconds.
CHECKED_KEPT = 500_000
_checked: dict[tuple[str, int, int, int | None], str | None] = {}


def check_images(items: Sequence[Item], *, progress: bool = False) -> tuple[list[Item], list[dict]]:
    """Decode every file once per process (a file changed since is decoded again); returns the
    readable items and ``{path, reason}`` per skip."""
    good: list[Item] = []
    skipped: list[dict] = []
    for src, label in bar(items, "checking images", enabled=progress, unit="img"):
        reason = None if isinstance(src, np.ndarray) else _unreadable(src)
        if reason is None:
            good.append((src, label))
        else:
            skipped.append({"path": src, "reason": reason})
    return good, skipped


def _unreadable(src: str) -> str | None:
    """Why ``src`` cannot be read (None: it can), decoded only if not seen unchanged before."""
    try:
        st = os.stat(src)
    except OSError as e:  # not cached: a missing file may appear
        return f"{type(e).__name__}: {e}"
    key = (src, st.st_size, st.st_mtime_ns, Image.MAX_IMAGE_PIXELS)
    if key not in _checked:
        if len(_checked) >= CHECKED_KEPT:
            _checked.clear()
        try:
            open_image(src)
            _checked[key] = None
        except IMAGE_ERRORS as e:
            _checked[key] = f"{type(e).__name__}: {e}"
    return _checked[key]


def drop_unreadable(splits: Splits, *, check: str, limit: int, progress: bool) -> None:
    """Decode every file once (``check`` on, or auto under ``limit`` images) and drop the
    unreadable ones from ``splits``, keeping them in ``splits.skipped``."""
    if check == "off" or (check == "auto" and len(splits.train) + len(splits.val) > limit):
        return
    splits.train, bad_train = check_images(splits.train, progress=progress)
    splits.val, bad_val = check_images(splits.val, progress=progress)
    splits.skipped = bad_train + bad_val
    for part, items in (("train", splits.train), ("val", splits.val)):
        empty = set(range(len(splits.classes))) - {label for _, label in items}
        if empty:
            names = ", ".join(splits.classes[i] for i in sorted(empty))
            raise DataError(f"after skipping unreadable images, class(es) {names} have no {part} images; "
                            "fix or replace those files")


def write_skipped(path: Path, skipped: list[dict]) -> None:
    path.write_text(json.dumps({"count": len(skipped), "files": skipped}, indent=2) + "\n")


# --- discovery -------------------------------------------------------------------------


def _not_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8 come back from the OS as surrogates
        return True
    return False


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def scan_class_folders(root: Path) -> tuple[list[Item], list[str]]:
    """Items and sorted class names from ``root/<class>/<images>`` (symlinks followed)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    undecodable = [c for c in classes if not c.isprintable() or _not_utf8(c)]
    if undecodable:  # caught here, not after training when the report cannot print the name
        shown = ", ".join(repr(os.fsencode(c))[1:] for c in undecodable[:5])
        raise DataError(f"class folder name(s) {shown} in {str(root)!r} are not printable UTF-8; class names are "
                        "written to model.json and the report, so rename them (e.g. convmv -f latin1 -t utf-8)")
    if not classes:
        raise DataError(f"{str(root)!r} has no class folders; expected {root}/<class name>/<images>")
    items: list[Item] = []
    for idx, c in enumerate(classes):
        files = sorted(p for p in (root / c).rglob("*") if p.is_file() and _is_image(p))
        if not files:
            raise DataError(
                f"class folder {str(root / c)!r} has no images ({', '.join(sorted(IMAGE_EXTS))}); "
                "add images or remove the folder"
            )
        items += [(str(p), idx) for p in files]
    return items, classes


def read_csv(path: Path) -> tuple[list[Item], list[str]]:
    """Items from a ``path,label`` CSV; relative paths are relative to the CSV."""
    rows = list(csv.reader(read_user_text(path, "CSV file").splitlines()))
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    pairs: list[tuple[str, str]] = []
    missing: list[str] = []
    blank: list[int] = []
    for n, row in enumerate(rows, start=2):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) < 2 or not row[1].strip():
            blank.append(n)
            continue
        p = Path(row[0].strip())
        p = p if p.is_absolute() else path.parent / p
        (pairs if p.is_file() else missing).append((str(p), row[1].strip()) if p.is_file() else str(p))
    if blank:
        raise DataError(f"{str(path)!r}: rows {blank[:10]} have no label; every row needs path,label")
    if missing:
        raise DataError(f"{str(path)!r}: {len(missing)} paths do not exist, e.g. {missing[:3]}; "
                        "paths are read relative to the CSV file")
    if not pairs:
        raise DataError(f"{str(path)!r} lists no images; expected rows of path,label")
    classes = sorted({label for _, label in pairs})
    index = {c: i for i, c in enumerate(classes)}
    return [(p, index[label]) for p, label in pairs], classes


def stratified_split(items: Sequence[Item], val_split: float, seed: int, classes: Sequence[str]) -> tuple[list[Item], list[Item]]:
    """Per class, a seeded shuffle and ``round(n * val_split)`` (at least 1) to val."""
    rng = random.Random(seed)
    train, val = [], []
    by_class: dict[int, list[Item]] = {}
    for it in items:
        by_class.setdefault(it[1], []).append(it)
    for label in sorted(by_class):
        group = list(by_class[label])
        k = max(1, round(len(group) * val_split))
        if k >= len(group):
            raise DataError(
                f"class {classes[label]!r} has {len(group)} image(s): --val-split {val_split} leaves it "
                "no training or no validation image; add images or provide a val/ folder"
            )
        rng.shuffle(group)
        val += group[:k]
        train += group[k:]
    return train, val


def _check_classes(classes: Sequence[str], where: str) -> None:
    if len(classes) < 2:
        raise DataError(f"{where} has a single class ({', '.join(classes)}); a classifier needs at least two")


def digits() -> Splits:
    """The embedded default: 1,797 real 8x8 handwritten digits shipped with scikit-learn."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    items = [(img, int(t)) for img, t in zip(imgs, d.target)]
    classes = [str(i) for i in range(10)]
    train, val = stratified_split(items, 0.2, 0, classes)
    return Splits(train, val, classes, name=DEFAULT_NAME)


def load_splits(data: str | None, *, val_split: float = 0.2, seed: int = 0) -> Splits:
    """Resolve DATA (see module docstring) into train/val items; a test/ folder is checked
    against train/'s classes now, so ``evaluate`` later finds it consistent."""
    if data is None:
        return digits()
    root = Path(data)
    if not root.exists():
        raise MissingPathError(f"data path {data!r} does not exist; give a folder of class folders, "
                               "a folder with train/ and val/, or a CSV of path,label")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"{data!r} is a file but not a .csv; DATA is a folder or a CSV of path,label")
        items, classes = read_csv(root)
        _check_classes(classes, data)
        train, val = stratified_split(items, val_split, seed, classes)
        return Splits(train, val, classes, name=root.name)
    if (root / "train").is_dir():
        train, classes = scan_class_folders(root / "train")
        _check_classes(classes, str(root / "train"))
        test = _matching(root / "test", classes) if (root / "test").is_dir() else []
        if (root / "val").is_dir():
            return Splits(train, _matching(root / "val", classes), classes, name=root.name, test=test)
        train, val = stratified_split(train, val_split, seed, classes)
        return Splits(train, val, classes, name=root.name, test=test)
    items, classes = scan_class_folders(root)
    _check_classes(classes, data)
    train, val = stratified_split(items, val_split, seed, classes)
    return Splits(train, val, classes, name=root.name)


def _matching(folder: Path, classes: Sequence[str], against: str = "train/") -> list[Item]:
    """Items of ``folder`` whose class folders are exactly ``classes``."""
    items, found = scan_class_folders(folder)
    if found != list(classes):
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise DataError(
            f"{str(folder)!r} classes do not match {against}: missing {missing or 'none'}, extra {extra or 'none'}; "
            "every split needs the same class folders"
        )
    return items


def eval_items(data: str, classes: Sequence[str]) -> tuple[str, list[Item]]:
    """What to evaluate: a folder of class folders as it is; a dataset root's test/, else val/.
    Returns the folder (or CSV) scored, and its items."""
    root = Path(data)
    if not root.exists():
        raise MissingPathError(f"data path {data!r} does not exist")
    if root.is_file():
        items, found = read_csv(root)
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{data!r} has labels the model does not know: {unknown}; known: {list(classes)}")
        return str(root), [(p, index[found[label]]) for p, label in items]
    for sub in ("test", "val"):
        if (root / sub).is_dir():
            return str(root / sub), _matching(root / sub, classes, "the run's classes")
    return str(root), _matching(root, classes, "the run's classes")


def spread(n: int, k: int) -> list[int]:
    """``k`` indices evenly spread over ``range(n)`` (all of them when ``k >= n``): a subset of
    a class-ordered list that keeps every class, where its first ``k`` would not."""
    return list(range(n)) if k >= n else [i * n // k for i in range(k)]


def class_counts(items: Sequence[Item], classes: Sequence[str]) -> dict[str, int]:
    counts = Counter(label for _, label in items)
    return {c: counts.get(i, 0) for i, c in enumerate(classes)}

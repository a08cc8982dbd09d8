"""Work done once instead of every epoch.

- :class:`DecodedImages`: every image decoded and resized once into a uint8 tensor store;
  augmentation then runs on tensors.
- :class:`DiskImages`: the same store memory-mapped on disk, shared across runs.

Activations captured from a forward pass live in :mod:`layerwise.capture`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from layerwise.augment import CROP_PCT
from layerwise.data import ImageDataset, Item
from layerwise.hardware import RAM_BUDGET, total_ram
from layerwise.progress import bar

CACHE_MODES = ("auto", "ram", "disk", "off")


def stored_side(img_size: int) -> int:
    """Short side kept in the store: the eval resize, so crops keep full resolution."""
    return int(round(img_size / CROP_PCT))


def fits_in_ram(n_images: int, img_size: int) -> bool:
    side = stored_side(img_size)
    return n_images * 3 * side * side * 4 // 3 < RAM_BUDGET * total_ram()  # 4/3: non-square images


# Decoded stores kept in this process: a run's train and val. The next run over the same files
# in the same process (each candidate of auto's race, each strategy of compare) takes them
# instead of decoding again: on a 2-core CPU decoding was a tenth of a 4-epoch race.
MEMO_STORES = 2
_memo: OrderedDict[str, tuple[list[torch.Tensor], list[int]]] = OrderedDict()


class DecodedImages(Dataset):
    """Items decoded once to uint8 CHW tensors (short side ``stored_side``), then passed
    through ``transform`` as ``tv_tensors.Image`` on every access. The store is shared with
    a later one over the same files (:func:`cache_key`) in this process; it is never written."""

    def __init__(self, items: Sequence[Item], img_size: int, transform: Callable, *, workers: int = 0,
                 progress: bool = False) -> None:
        self.transform = transform
        key = cache_key(items, stored_side(img_size))
        if key not in _memo:
            _memo[key] = _decode(items, img_size, workers, progress)
            while len(_memo) > MEMO_STORES:
                _memo.popitem(last=False)
        _memo.move_to_end(key)
        self.images, self.labels = _memo[key]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(tv_tensors.Image(self.images[i])), self.labels[i]


# Images per handoff from a decoding worker: each handoff passes its tensors through shared
# memory one file descriptor at a time, which cost more than the decoding itself for 1,250
# small images on 2 cores (a batch travels as one flat tensor instead).
DECODE_BATCH = 32


def _pack(batch: list) -> tuple[torch.Tensor, list[tuple[int, ...]], list[int]]:
    """A batch of decoded images (None: unreadable, left out) as one flat uint8 tensor, their
    shapes and labels."""
    kept = [s for s in batch if s is not None]
    flat = torch.cat([img.reshape(-1) for img, _ in kept]) if kept else torch.empty(0, dtype=torch.uint8)
    return flat, [tuple(img.shape) for img, _ in kept], [int(label) for _, label in kept]


def _unpack(batches: Iterable[tuple[torch.Tensor, list[tuple[int, ...]], list[int]]]) -> Iterator[tuple[torch.Tensor, int]]:
    """Each image of :func:`_pack`'s batches, a view of its batch: copied out of a worker's
    shared memory, which is not kept (each batch there holds a file descriptor open)."""
    for flat, shapes, labels in batches:
        flat, pos = (flat.clone() if flat.is_shared() else flat), 0
        for shape, label in zip(shapes, labels):
            n = math.prod(shape)
            yield flat[pos:pos + n].view(shape), label
            pos += n


def _decode(items: Sequence[Item], img_size: int, workers: int, progress: bool) -> tuple[list[torch.Tensor], list[int]]:
    decode = v2.Compose([v2.PILToTensor(), v2.Resize(stored_side(img_size), antialias=True)])
    loader = DataLoader(ImageDataset(items, decode), batch_size=DECODE_BATCH, num_workers=workers, collate_fn=_pack)
    it: Iterator = _unpack(loader)
    if progress:
        it = bar(it, "decoding images once", total=len(items), unit="img")
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for image, label in it:
        images.append(image)
        labels.append(label)
    return images, labels


def cache_key(items: Sequence[Item], side: int) -> str:
    """Changes whenever a file (path, size, mtime) or the stored size changes."""
    h = hashlib.sha1(f"v1:{side}".encode())
    for src, label in items:
        if isinstance(src, np.ndarray):
            h.update(hashlib.sha1(src.tobytes()).digest())
        else:
            st = os.stat(src)
            h.update(f"{src}|{st.st_size}|{st.st_mtime_ns}".encode())
        h.update(str(label).encode())
    return h.hexdigest()[:20]


class DiskImages(Dataset):
    """Like :class:`DecodedImages`, but the uint8 store is a memory-mapped file in
    ``cache_dir``, keyed by :func:`cache_key` so a stale store is never read, and shared
    by every run (and every ``compare`` strategy) over the same files."""

    def __init__(self, items: Sequence[Item], img_size: int, transform: Callable, *, cache_dir: Path,
                 workers: int = 0, progress: bool = False) -> None:
        self.transform = transform
        base = cache_dir / f"decoded-{cache_key(items, stored_side(img_size))}"
        index_path = base.with_suffix(".json")
        if not index_path.is_file():
            self._build(items, img_size, base, workers, progress)
        index = json.loads(index_path.read_text())
        self.offsets, self.shapes, self.labels = index["offsets"], index["shapes"], index["labels"]
        self.data = np.memmap(base.with_suffix(".u8"), dtype=np.uint8, mode="r")

    @staticmethod
    def _build(items: Sequence[Item], img_size: int, base: Path, workers: int, progress: bool) -> None:
        from layerwise.checkpoint import atomic_write_text

        images, labels = _decode(items, img_size, workers, progress)
        base.parent.mkdir(parents=True, exist_ok=True)
        offsets, shapes, pos = [], [], 0
        tmp = base.with_suffix(".u8.tmp")
        with open(tmp, "wb") as f:
            for img in images:
                offsets.append(pos)
                shapes.append(list(img.shape))
                f.write(img.numpy().tobytes())
                pos += img.numel()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, base.with_suffix(".u8"))  # data first: the index marks the store complete
        atomic_write_text(base.with_suffix(".json"),
                          json.dumps({"offsets": offsets, "shapes": shapes, "labels": labels}))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        shape = self.shapes[i]
        n = shape[0] * shape[1] * shape[2]
        arr = np.array(self.data[self.offsets[i]:self.offsets[i] + n]).reshape(shape)
        return self.transform(tv_tensors.Image(torch.from_numpy(arr))), self.labels[i]

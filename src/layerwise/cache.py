"""Work done once instead of every epoch.

- :class:`DecodedImages`: every image decoded and resized once into a uint8 tensor store;
  augmentation then runs on tensors.
- :func:`head_features`: while only the head trains, the frozen rest of the model gives the
  same output every epoch, so its output (the head's input) is computed once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from layerwise.augment import CROP_PCT
from layerwise.data import ImageDataset, Item
from layerwise.errors import LayerwiseError
from layerwise.progress import bar

CACHE_MODES = ("auto", "ram", "disk", "off")
RAM_BUDGET = 0.25  # 'auto' caches decoded images when they fit in a quarter of the RAM


def stored_side(img_size: int) -> int:
    """Short side kept in the store: the eval resize, so crops keep full resolution."""
    return int(round(img_size / CROP_PCT))


def total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def fits_in_ram(n_images: int, img_size: int) -> bool:
    side = stored_side(img_size)
    return n_images * 3 * side * side * 4 // 3 < RAM_BUDGET * total_ram()  # 4/3: non-square images


class DecodedImages(Dataset):
    """Items decoded once to uint8 CHW tensors (short side ``stored_side``), then passed
    through ``transform`` as ``tv_tensors.Image`` on every access."""

    def __init__(self, items: Sequence[Item], img_size: int, transform: Callable, *, workers: int = 0,
                 progress: bool = False) -> None:
        self.transform = transform
        decode = v2.Compose([v2.PILToTensor(), v2.Resize(stored_side(img_size), antialias=True)])
        loader = DataLoader(ImageDataset(items, decode), batch_size=None, num_workers=workers)
        it: Iterator = iter(loader)
        if progress:
            it = bar(it, "decoding images once", total=len(items), unit="img")
        self.images: list[torch.Tensor] = []
        self.labels: list[int] = []
        for sample in it:
            if sample is not None:
                self.images.append(sample[0].clone())
                self.labels.append(int(sample[1]))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(tv_tensors.Image(self.images[i])), self.labels[i]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "layerwise"


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

        store = DecodedImages(items, img_size, lambda x: x, workers=workers, progress=progress)
        base.parent.mkdir(parents=True, exist_ok=True)
        offsets, shapes, pos = [], [], 0
        tmp = base.with_suffix(".u8.tmp")
        with open(tmp, "wb") as f:
            for img in store.images:
                offsets.append(pos)
                shapes.append(list(img.shape))
                f.write(img.numpy().tobytes())
                pos += img.numel()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, base.with_suffix(".u8"))  # data first: the index marks the store complete
        atomic_write_text(base.with_suffix(".json"),
                          json.dumps({"offsets": offsets, "shapes": shapes, "labels": store.labels}))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        shape = self.shapes[i]
        n = shape[0] * shape[1] * shape[2]
        arr = np.array(self.data[self.offsets[i]:self.offsets[i] + n]).reshape(shape)
        return self.transform(tv_tensors.Image(torch.from_numpy(arr))), self.labels[i]


# --- frozen-prefix feature cache ---------------------------------------------------------------


class _Captured(Exception):
    """Raised by the hook to stop the forward pass once the captured tensor is known."""


def head_features(model: nn.Module, head: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                  autocast: Callable, prepare: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input for every sample of ``loader``, with the rest of the model in eval
    mode and without autograd; the head itself is never run."""
    return captured(model, head, loader, device, autocast, prepare, output=False)


def spill_tensor(shape: Sequence[int], folder: Path) -> torch.Tensor:
    """A float32 tensor in a memory-mapped file of ``folder``, for activations larger than the
    RAM budget. The file is unlinked at once: the mapping keeps it alive, and its disk space
    comes back when the tensor is freed, even if the process is killed. Its blocks are reserved
    first: a full disk is then an error here, not a SIGBUS on a later write to the mapping."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix="activations-", suffix=".f32")
    reserve = getattr(os, "posix_fallocate", None)  # not on macOS: there the file grows as it is written
    try:
        try:
            if reserve is not None:
                reserve(fd, 0, 4 * math.prod(shape))
        except OSError as e:  # a file system that cannot reserve (EOPNOTSUPP, EINVAL) maps it unreserved
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise LayerwiseError(f"no room for the feature cache's {4 * math.prod(shape) / 2**30:.1f} GiB in "
                                     f"{folder} ({e.strerror}); free space there, point XDG_CACHE_HOME elsewhere, or "
                                     "run with --feature-cache off") from e
        flat = torch.from_file(name, shared=True, size=math.prod(shape), dtype=torch.float32)
    finally:
        os.close(fd)
        os.unlink(name)
    return flat.view(*shape)


@torch.inference_mode()
def captured(model: nn.Module, module: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, autocast: Callable, prepare: Callable[[torch.Tensor], torch.Tensor], *,
             output: bool, into: Callable[[Sequence[int]], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``module``'s input (or ``output``) for every sample of ``loader``, with the model in
    eval mode and without autograd; the forward pass stops there. ``into(per_sample_shape)``,
    if given, allocates the store the rows are written to (a memory map); else they are
    concatenated in RAM."""
    grabbed: list[torch.Tensor] = []
    store: list[torch.Tensor] = []  # into's tensor, once the first batch gives the shape
    rows = 0

    def keep(t: torch.Tensor) -> None:
        nonlocal rows
        if into is None:
            grabbed.append(t.float().cpu().contiguous())
            return
        if not store:
            store.append(into(t.shape[1:]))
        store[0][rows:rows + len(t)] = t.float().cpu()
        rows += len(t)

    def grab_input(_m: nn.Module, args: tuple) -> None:
        keep(args[0])
        raise _Captured

    def grab_output(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        keep(out)
        raise _Captured

    was_training = model.training
    model.eval()
    handle = module.register_forward_hook(grab_output) if output else module.register_forward_pre_hook(grab_input)
    labels = []
    try:
        for x, y in loader:
            if not y.numel():
                continue
            with autocast():
                try:
                    model(prepare(x.to(device)))
                except _Captured:
                    pass
            labels.append(y)
    finally:
        handle.remove()
        model.train(was_training)
    return (store[0][:rows] if store else torch.cat(grabbed)), torch.cat(labels)


def feature_batches(feats: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                    drop_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches of cached features, as a DataLoader over them would give."""
    order = torch.randperm(len(labels), generator=generator)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        yield feats[idx], labels[idx]


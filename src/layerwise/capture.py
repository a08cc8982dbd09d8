"""Activations captured from a forward pass: a module's input or output for every sample of a
loader, with the pass stopped there. While only the head trains, the frozen rest of the model
gives the same output every epoch, so the probe, the prefix replay and the feature cache read
it once through these functions."""

from __future__ import annotations

import errno
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from layerwise.errors import LayerwiseError


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


"""Run-folder files written atomically: a crash mid-write leaves the previous copy intact.

Weights are safetensors; training state is a ``torch.save`` of tensors and plain
containers, read back with ``weights_only=True`` (never full pickle).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerwise.errors import LayerwiseError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _serialise(save: Callable[[io.BytesIO], None]) -> bytes:
    buf = io.BytesIO()
    save(buf)
    return buf.getvalue()


def state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors (safetensors refuses strided or channels_last views)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_weights(path: Path, model: nn.Module) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save(state_dict_cpu(model)))


def load_weights(path: Path, model: nn.Module) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))


def save_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, _serialise(lambda buf: torch.save(state, buf)))


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise LayerwiseError(f"refusing to load {str(path)!r}: it holds pickled code, not just tensors") from e


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines log; a last line cut short by a crash is dropped."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return rows

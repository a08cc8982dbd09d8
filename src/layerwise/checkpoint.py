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
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerwise.errors import LayerwiseError, quote_error

TMP_SUFFIX = ".tmp"  # atomic writes go to .NAME.XXXX.tmp beside their target


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide a shared run from its group
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    """Load a safetensors file into ``model``; a truncated, foreign or wrong-shape file is
    a user error naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise LayerwiseError(f"cannot load weights {str(path)!r}: {quote_error(e, 300)}. The file is damaged or belongs to "
                             "another model; re-run the fit, or point at the right run folder") from e


def save_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, _serialise(lambda buf: torch.save(state, buf)))


class CorruptCheckpointError(LayerwiseError):
    """A run's training state that cannot be read back."""


def load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if zipfile.is_zipfile(path):  # a well-formed torch file whose pickle names code
            raise LayerwiseError(f"refusing to load {str(path)!r}: it holds pickled code, not just tensors") from e
        raise _damaged(path, e) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated or not a torch file
        raise _damaged(path, e) from e
    if not isinstance(state, dict) or not {"epoch", "step", "model", "optimizer"} <= set(state):
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} is not a layerwise training state")
    return state


def _damaged(path: Path, e: Exception) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"checkpoint {str(path)!r} is damaged ({quote_error(e)}); "
        "delete it to restart the run from its last good state, or start a new run")


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

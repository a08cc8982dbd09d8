from __future__ import annotations

import os

import pytest
import torch

from layerwise.checkpoint import (
    CorruptCheckpointError,
    atomic_write_bytes,
    load_state,
    load_weights,
    save_state,
    save_weights,
)
from layerwise.errors import LayerwiseError


def test_atomic_write_keeps_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp file left behind


def test_weights_roundtrip_channels_last(tmp_path, tiny):
    tiny.to(memory_format=torch.channels_last)
    save_weights(tmp_path / "w.safetensors", tiny)
    other = type(tiny)()
    load_weights(tmp_path / "w.safetensors", other)
    for (k, a), b in zip(tiny.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def test_state_roundtrip_and_refusal_of_pickled_code(tmp_path):
    save_state(tmp_path / "s.pt", {"epoch": 3, "step": 9, "model": {"t": torch.ones(2)}, "optimizer": {"a": [1, 2]}})
    assert load_state(tmp_path / "s.pt")["epoch"] == 3
    torch.save({"f": os.system}, tmp_path / "evil.pt")
    with pytest.raises(LayerwiseError, match="pickled code"):
        load_state(tmp_path / "evil.pt")


def _state():
    return {"epoch": 0, "step": 1, "model": {"w": torch.ones(3)}, "optimizer": {}}


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "other-dict"])
def test_damaged_state_is_a_user_error(tmp_path, damage):
    p = tmp_path / "state.pt"
    save_state(p, _state())
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        p.write_bytes(b"not a checkpoint at all")
    elif damage == "empty":
        p.write_bytes(b"")
    else:
        torch.save({"something": 1}, p)
    with pytest.raises(CorruptCheckpointError, match="state.pt"):
        load_state(p)


@pytest.mark.parametrize("damage", ["truncate", "wrong-shape"])
def test_damaged_weights_are_a_user_error(tmp_path, tiny, damage):
    p = tmp_path / "best.safetensors"
    save_weights(p, tiny)
    if damage == "truncate":
        p.write_bytes(p.read_bytes()[:100])
    else:
        save_weights(p, torch.nn.Linear(5, 5))
    with pytest.raises(LayerwiseError, match="cannot load weights .*best.safetensors"):
        load_weights(p, tiny)


def test_run_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a", b"x")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "b", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644  # readable by others on a shared machine
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o600



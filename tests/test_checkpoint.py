from __future__ import annotations

import os

import pytest
import torch

from layerwise.checkpoint import atomic_write_bytes, load_state, load_weights, save_state, save_weights
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
    save_state(tmp_path / "s.pt", {"epoch": 3, "t": torch.ones(2), "nested": {"a": [1, 2]}})
    assert load_state(tmp_path / "s.pt")["epoch"] == 3
    torch.save({"f": os.system}, tmp_path / "evil.pt")
    with pytest.raises(LayerwiseError, match="pickled code"):
        load_state(tmp_path / "evil.pt")

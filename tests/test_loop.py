"""The epoch loop's logs (loop.py): TensorBoard gets every epoch's scalars, and the writer is
closed (its events flushed) however the loop ends."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest

from conftest import TINY
from layerwise.checkpoint import read_jsonl
from layerwise.cli import main


class _Writer:
    """A SummaryWriter that records what it is given: the test runs without tensorboard."""

    made: list[_Writer] = []

    def __init__(self, logdir: str) -> None:
        self.logdir, self.scalars, self.closed = logdir, [], False
        _Writer.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def writer(monkeypatch):
    _Writer.made = []
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = _Writer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return _Writer.made


def test_every_epochs_scalars_reach_tensorboard_and_the_writer_is_closed(data, tmp_path, writer):
    run = tmp_path / "run"
    assert main(["fit", str(data), *TINY, "--strategy", "full", "--epochs", "2", "--out", str(run)]) == 0
    (w,) = writer
    assert w.logdir == str(run / "tb") and w.closed
    rows = read_jsonl(run / "metrics.jsonl")
    want = [(k, r[k], r["epoch"]) for r in rows for k in ("train_loss", "train_acc", "val_loss", "val_acc",
                                                           "images_per_second")]
    assert w.scalars == want


def test_the_writer_is_closed_when_the_loop_pauses_or_fails(data, tmp_path, writer, monkeypatch):
    from layerwise import engine, loop
    from layerwise.config import RunConfig

    cfg = RunConfig(data=str(data), model="timm/test_efficientnet", weights="none", img_size=32, batch_size=8,
                    workers=0, quiet=True, strategy="full", epochs=3, out=str(tmp_path / "paused"))
    engine.fit(cfg, until=1)  # auto's race pauses a candidate after its rung
    assert writer[-1].closed and [s for s in writer[-1].scalars if s[0] == "val_acc"] != []

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(loop, "_record", boom)
    with pytest.raises(OSError):
        engine.fit(dataclasses.replace(cfg, out=str(tmp_path / "failed")))
    assert writer[-1].closed and writer[-1].scalars == []

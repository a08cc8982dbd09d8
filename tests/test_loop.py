"""The epoch loop's logs (loop.py): TensorBoard gets every epoch's scalars, and the writer is
closed (its events flushed) however the loop ends."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

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


@given(st.integers(0, 5), st.floats(0.0, 6.0, allow_nan=False), st.integers(1, 400))
def test_a_pause_inside_an_epoch_falls_after_its_share_of_the_batches(epoch, until, batches):
    from layerwise.loop import pause_batch

    at = pause_batch(until, epoch, batches)
    if epoch < until < epoch + 1:
        assert at is not None and 1 <= at <= batches
        assert at / batches >= until - epoch and (at - 1) / batches < max(until - epoch, 1 / batches)
    else:
        assert at is None


def _cfg(data, out, **kw):
    from layerwise.config import RunConfig

    return RunConfig(data=str(data), model="timm/test_efficientnet", weights="none", img_size=32, batch_size=8,
                     workers=0, quiet=True, strategy="full", epochs=2, precision="fp32", channels_last=False,
                     out=str(out), **kw)


@pytest.mark.parametrize("kw", [{}, {"ema": 0.9}], ids=["model", "ema"])
def test_a_pause_mid_epoch_checkpoints_there_and_resumes_to_an_uninterrupted_run(data, tmp_path, kw):
    """auto's race pauses a candidate half-way through an epoch (a rung shorter than an epoch):
    the checkpoint holds the first half of epoch 0's batches and no epoch row; the paused
    weights are what a scorer of the paused run loads; resumed, the run ends bit for bit where
    one run straight through ends."""
    from layerwise import engine
    from layerwise.checkpoint import load_state
    from layerwise.inference import load_run

    paused = tmp_path / "paused"
    engine.fit(_cfg(data, paused, **kw), until=0.5)
    state = load_state(paused / "last" / "state.pt")
    assert state["epoch"] == -1 and state["progress"]["batches"] == 2 and state["step"] == 2  # 3 batches an epoch
    assert read_jsonl(paused / "metrics.jsonl") == [] and not (paused / "best.safetensors").exists()
    scored = load_run(paused, paused=True).model.state_dict()
    source = {k.removeprefix("module."): v for k, v in state["ema"].items()} if kw else state["model"]
    assert all(torch.equal(v, source[k]) for k, v in scored.items())
    if kw:  # the EMA's weights, not the model's
        assert any(not torch.equal(scored[k], state["model"][k]) for k in scored if scored[k].is_floating_point())
    engine.fit(_cfg(data, paused, **kw), resume=True, until=0.5)  # already there: nothing trained
    assert load_state(paused / "last" / "state.pt")["step"] == 2
    engine.fit(_cfg(data, paused, **kw), resume=True)
    straight = tmp_path / "straight"
    engine.fit(_cfg(data, straight, **kw))
    a, b = load_file(paused / "best.safetensors"), load_file(straight / "best.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(paused / "steps.jsonl") == read_jsonl(straight / "steps.jsonl")
    assert [r["val_acc"] for r in read_jsonl(paused / "metrics.jsonl")] == \
        [r["val_acc"] for r in read_jsonl(straight / "metrics.jsonl")]

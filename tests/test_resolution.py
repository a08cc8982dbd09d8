from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_image_folder
from layerwise.checkpoint import read_jsonl
from layerwise.cli import main
from layerwise.resolution import MIN_SIDE, SIZE_STEP, default_start, describe, train_sizes

TINY = ["--model", "timm/test_efficientnet", "--weights", "none", "--batch-size", "8", "--workers", "0", "--quiet",
        "--strategy", "full", "--augment", "light"]


@given(st.integers(1, 60), st.integers(16, 1024), st.booleans(), st.one_of(st.none(), st.integers(16, 1024)))
def test_sizes_ramp_up_to_the_final_side_and_end_there(epochs, final, progressive, start):
    sizes = train_sizes(epochs, final, progressive=progressive, start=start)
    assert len(sizes) == epochs and sizes[-1] == final
    assert list(sizes) == sorted(sizes)  # never back down
    assert all(s == final or (s % SIZE_STEP == 0 and s >= MIN_SIDE) for s in sizes)
    if not progressive or epochs == 1:
        assert set(sizes) == {final}
    elif start is None and epochs >= 2:
        assert sizes[0] == default_start(final) <= final


def test_224_starts_at_half_and_saves_about_40_percent_of_the_pixels():
    sizes = train_sizes(5, 224, progressive=True)
    assert sizes == (112, 128, 160, 192, 224)
    assert sum(s * s for s in sizes) / (5 * 224 * 224) == pytest.approx(0.564, abs=1e-3)
    assert describe(sizes, 224) == "train 112->224px progressive, eval 224px"
    assert describe((160,) * 3, 224) == "train 160px, eval 224px" and describe((224,), 224) == "224px"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=8, size=40)


def _record_batch_sides(monkeypatch) -> dict[int, set[int]]:
    """epoch -> the sides of the training batches it ran."""
    from layerwise import trainer

    seen: dict[int, set[int]] = {}
    now = {"epoch": -1}
    real_step, real_epoch = trainer.train_step, trainer.Trainer.train_epoch

    def epoch_spy(self, epoch, *a, **k):
        now["epoch"] = epoch
        return real_epoch(self, epoch, *a, **k)

    def step_spy(model, batch, *a, **k):
        seen.setdefault(now["epoch"], set()).add(batch[0].shape[-1])
        return real_step(model, batch, *a, **k)

    monkeypatch.setattr(trainer, "train_step", step_spy)
    monkeypatch.setattr(trainer.Trainer, "train_epoch", epoch_spy)
    return seen


def test_progressive_trains_each_epoch_at_its_planned_side_from_one_decoded_cache(data, tmp_path, monkeypatch):
    from layerwise import loaders

    builds = []
    real_cache = loaders.DecodedImages.__init__

    def counting(self, items, img_size, *a, **k):
        builds.append(img_size)
        real_cache(self, items, img_size, *a, **k)

    monkeypatch.setattr(loaders.DecodedImages, "__init__", counting)
    sides = _record_batch_sides(monkeypatch)
    run = tmp_path / "run"
    assert main(["fit", str(data), *TINY, "--img-size", "64", "--progressive", "--epochs", "3", "--cache", "ram",
                 "--out", str(run)]) == 0
    plan = json.loads((run / "plan.json").read_text())
    planned = [e["train_size"] for e in plan["epochs"]]
    assert planned == [32, 48, 64]
    assert [r["train_size"] for r in read_jsonl(run / "metrics.jsonl")] == planned
    assert sides == {0: {32}, 1: {48}, 2: {64}}
    assert builds == [64, 64]  # train and val decoded once, at the final side
    assert "train 32->64px progressive, eval 64px" in (run / "report.md").read_text()


def test_resume_mid_schedule_trains_at_the_side_of_its_epoch(data, tmp_path, monkeypatch):
    from layerwise import engine

    run = tmp_path / "run"
    args = ["fit", str(data), *TINY, "--img-size", "64", "--progressive", "--epochs", "3", "--out", str(run)]
    real = engine.Trainer.train_epoch

    def interrupted_in_epoch_1(self, epoch, stop, *a, **k):
        if epoch == 1:
            stop.flag = True  # SIGINT during epoch 1: a mid-epoch checkpoint, then exit 130
        return real(self, epoch, stop, *a, **k)

    monkeypatch.setattr(engine.Trainer, "train_epoch", interrupted_in_epoch_1)
    assert main(args) == 130
    monkeypatch.undo()
    sides = _record_batch_sides(monkeypatch)
    assert main(["fit", "--resume", str(run), "--quiet"]) == 0
    assert sides == {1: {48}, 2: {64}}
    assert [r["train_size"] for r in read_jsonl(run / "metrics.jsonl")] == [32, 48, 64]


def test_train_low_test_high(data, tmp_path, monkeypatch):
    sides = _record_batch_sides(monkeypatch)
    run = tmp_path / "run"
    assert main(["fit", str(data), *TINY, "--img-size", "64", "--train-size", "48", "--epochs", "1",
                 "--out", str(run)]) == 0
    assert sides == {0: {48}}
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows[0]["train_size"] == 48
    report = (run / "report.md").read_text()
    assert "train 48px, eval 64px" in report


def test_a_start_above_the_final_side_is_a_clear_error(data, tmp_path, capsys):
    assert main(["fit", str(data), *TINY, "--img-size", "64", "--progressive", "--progressive-from", "96",
                 "--epochs", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "progressive_from" in err and "64" in err and "96" in err


from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from layerwise.resolution import snap  # noqa: E402


@given(st.floats(1, 5000))
def test_snap_lands_on_the_grid_below_the_side(side):
    s = snap(side)
    assert s % SIZE_STEP == 0 and s >= MIN_SIDE
    assert s <= side or s == MIN_SIDE  # down, except where the floor lifts it
    assert side - s < SIZE_STEP or s == MIN_SIDE
    assert snap(s) == s

"""The benchmarks' shared helpers (bench/competitor.py): the load record and atomic saves."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from competitor import save_json, with_load  # noqa: E402


def test_with_load_passes_arguments_and_returns_the_load_before_and_after():
    out, load = with_load(lambda a, *, b: a + b, 2, b=3)
    assert out == 5
    assert len(load) == 2 and all(x >= 0 for x in load)
    # before and after the call, from the system's own 1-minute average
    seen = iter([(0.25, 0, 0), (1.5, 0, 0)])
    import os

    real = os.getloadavg
    os.getloadavg = lambda: next(seen)  # type: ignore[assignment]
    try:
        assert with_load(lambda: "ran")[1] == [0.25, 1.5]
    finally:
        os.getloadavg = real


def test_save_json_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    save_json(path, {"a": 1})
    save_json(path, {"a": 2, "b": [1, 2]})
    assert json.loads(path.read_text()) == {"a": 2, "b": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_save_json_that_fails_keeps_the_previous_file(tmp_path):
    path = tmp_path / "results.json"
    save_json(path, {"a": 1})
    with pytest.raises(TypeError):
        save_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}


def test_the_plain_loop_trains_the_offline_weights_and_prints_an_epoch_a_line(tmp_path):
    """bench/plain_loop.py end to end, on images made here: one JSON row per epoch."""
    import json
    import shutil
    import subprocess
    import sys

    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "d", classes=2, per_class=8)
    shutil.copytree(data / "val", data / "test")
    out = subprocess.run([sys.executable, "bench/plain_loop.py", str(data), "--epochs", "2", "--img-size", "32",
                          "--batch-size", "4", "--workers", "0"], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["epoch"] for r in rows if "epoch" in r] == [0, 1]
    assert all(0 <= r["val_acc"] <= 1 and r["images_per_second"] > 0 for r in rows if "epoch" in r)
    test = rows[-1]  # the final model on test/, per image: it is the last epoch's val, image for image
    assert set(test["correct"]) == {f"{f.parent.name}/{f.name}" for f in (data / "test").rglob("*.png")}
    assert test["test_acc"] == pytest.approx(rows[1]["val_acc"]) == sum(test["correct"].values()) / len(test["correct"])
    assert rows[1]["elapsed_seconds"] > rows[0]["elapsed_seconds"]

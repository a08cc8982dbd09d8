"""bench/race_cost.py: the subset it races on, the pair order, the ratio and its summary, on
made-up files and records."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from race_cost import LOADED, order, parse_size, report, subset, summary  # noqa: E402


def test_a_size_names_a_dataset_and_images_per_class():
    assert parse_size("gtsrb:22:6") == ("gtsrb", 22, 6)
    for bad in ("gtsrb:22", "gtsrb:0:6", "gtsrb:x:6", "gtsrb:22:6:1"):
        with pytest.raises(SystemExit, match=bad):
            parse_size(bad)


def test_the_subset_keeps_the_first_files_of_each_class_by_name(tmp_path):
    data = tmp_path / "d"
    for part, n in (("train", 5), ("val", 3)):
        for cls in ("a", "b"):
            (data / part / cls).mkdir(parents=True)
            for i in reversed(range(n)):  # written out of order: the cut is by name
                (data / part / cls / f"{i}.png").write_bytes(b"x")
    out = subset(data, 2, 1, tmp_path / "cut")
    assert sorted(p.name for p in (out / "train" / "a").iterdir()) == ["0.png", "1.png"]
    assert [p.name for p in (out / "val" / "b").iterdir()] == ["0.png"]
    assert (out / "train" / "a" / "0.png").resolve() == (data / "train" / "a" / "0.png").resolve()
    assert subset(data, 2, 1, tmp_path / "cut") == out  # written once, then reused


def test_the_pair_order_alternates_between_rounds():
    assert order(0) == ("discriminative", "auto") and order(1) == ("auto", "discriminative")


def _rec(size: str, variant: str, rnd: int, wall: float, load: float = 0.5, **extra) -> dict:
    return {"size": size, "variant": variant, "round": rnd, "wall": wall, "load": [load, load], "epochs": 5,
            "batch": 8, "limit": None} | extra


def test_a_ratio_is_auto_over_its_own_rounds_reference_and_shared_rounds_leave_the_mean():
    plan = {"raced": ["full", "discriminative-bn-eval"], "rung": 0.5, "priced": 1.49}
    recs = [_rec("g:22:6", "discriminative", 0, 20), _rec("g:22:6", "auto", 0, 30, **plan),
            _rec("g:22:6", "auto", 1, 40, **plan), _rec("g:22:6", "discriminative", 1, 25),
            _rec("g:22:6", "discriminative", 2, 10), _rec("g:22:6", "auto", 2, 40, load=LOADED + 1, **plan),
            _rec("g:22:6", "discriminative", 3, 10)]  # round 3 unfinished: not a pair
    s = summary({str(i): r for i, r in enumerate(recs)})["g:22:6"]
    assert s["ratios"] == {0: 1.5, 1: 1.6, 2: 4.0} and s["clean"] == 2
    assert math.isclose(s["geomean"], math.sqrt(1.5 * 1.6)) and s["priced"] == 1.49
    text = report({str(i): r for i, r in enumerate(recs)})
    assert "| g:22:6 | 5, 8 | full, discriminative-bn-eval for 0.5 epoch(s) | 1.49 | default | 30, 40, 40 | 20, 25, 10 | 1.50, 1.60, 4.00 † | 1.55 |" in text


def test_a_run_that_did_not_race_says_so():
    recs = {"a": _rec("g:50:12", "discriminative", 0, 20), "b": _rec("g:50:12", "auto", 0, 25)}
    assert "| g:50:12 | 5, 8 | no race | — | default | 25 | 20 | 1.25 | 1.25 |" in report(recs)

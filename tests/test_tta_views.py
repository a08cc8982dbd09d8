"""bench/tta_views.py: one pass per view group gives every view set's outcome exactly; the
report counts a repeated run once, aggregates per dataset first, and is the committed one."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import TINY, make_image_folder
from layerwise.cli import main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import tta_views  # noqa: E402


def test_each_view_set_is_what_evaluate_gives_with_those_views(tmp_path):
    """The views' probabilities are recovered from averages (hflip's = 2 x mean - identity's):
    each set's right/wrong must equal a direct evaluation with that set."""
    import torch

    from layerwise.data import eval_items
    from layerwise.inference import validated_scorer

    split = tmp_path / "split" / "ds"
    make_image_folder(split, classes=3, per_class=6)
    shutil.copytree(make_image_folder(tmp_path / "o", classes=3, per_class=5, size=20) / "val", split / "test")
    run = tmp_path / "suite" / "ds" / "auto-112px-seed0"
    assert main(["fit", str(split), *TINY, "--strategy", "full", "--epochs", "2", "--lr", "0.05", "--precision", "fp32",
                 "--out", str(run)]) == 0
    got = tta_views.measure(run, tmp_path / "split")
    score = validated_scorer(run)
    views = {"none": [], "hflip": ["hflip"], "multi-scale": ["multi-scale"], "hflip+multi-scale": ["hflip", "multi-scale"]}
    for part in ("val", "test"):
        _, items = eval_items(str(split / part), score.run.classes)
        labels = torch.tensor([y for _, y in items])
        probs = tta_views.view_probs(score, items)
        for name, v in views.items():
            direct = score(items, views=v).probs
            torch.testing.assert_close(probs[name], direct, rtol=0, atol=1e-5)  # not only the argmax
            want = "".join("1" if ok else "0" for ok in (direct.argmax(-1) == labels).tolist())
            assert got[part][name] == want, (part, name)


def _rec(ds: str, none: str, both: str, val_both: str = "0000") -> dict:
    sets = {"none": none, "hflip": none, "multi-scale": none, "hflip+multi-scale": both}
    return {"dataset": ds, "test": sets, "val": {**{k: "0011" for k in sets}, "hflip+multi-scale": val_both}}


def test_repeats_count_once_and_datasets_weigh_equally():
    recs = {"a/auto-1": _rec("a", "0000", "1100"), "a/auto-1-auto": _rec("a", "0000", "1100"),  # a repeat
            "a/auto-2": _rec("a", "0000", "0000"), "b/auto-1": _rec("b", "0000", "1111")}
    runs = tta_views.distinct(recs)
    assert sorted(runs) == ["a/auto-1", "a/auto-2", "b/auto-1"]
    s = tta_views.summary(runs)["hflip+multi-scale"]
    assert s["per_dataset"] == {"a": pytest.approx(25.0), "b": pytest.approx(100.0)}
    assert s["mean"] == pytest.approx(62.5) and s["min"] == pytest.approx(25.0)
    assert s["interval"][0] <= s["mean"] <= s["interval"][1]


def test_the_choice_on_val_prefers_fewer_views_on_a_tie():
    assert tta_views.best_on_val(_rec("a", "0", "1", val_both="0011")) == "none"
    assert tta_views.best_on_val(_rec("a", "0", "1", val_both="0111")) == "hflip+multi-scale"


def test_the_committed_report_is_the_committed_records():
    path = ROOT / "bench" / "results" / "tta-views.json"
    assert path.is_file(), "bench/results/tta-views.json is committed with its report"
    records = json.loads(path.read_text())
    assert (ROOT / "bench" / "results" / "tta-views.md").read_text() == tta_views.report(records)


def test_the_docs_quote_the_committed_measurement():
    records = json.loads((ROOT / "bench" / "results" / "tta-views.json").read_text())
    runs = tta_views.distinct(records)
    s = tta_views.summary(runs)
    text = " ".join((ROOT / "docs" / "tutorial-mapping.md").read_text().split())

    def cell(name: str) -> str:
        lo, hi = s[name]["interval"]
        return f"{s[name]['mean']:+.1f} [{lo:+.1f}, {hi:+.1f}]"

    both = s["hflip+multi-scale"]
    assert f"({len(runs)} distinct runs" in text
    assert f"together added {cell('hflip+multi-scale').replace(' [', ' points of test accuracy [', 1)}" in text
    assert f"on no dataset less than {both['min']:+.1f}" in text
    assert f"`hflip` alone {cell('hflip')}" in text and f"on val did no better ({cell('best on val, per run')})" in text
    losses = sum(v < 0 for v in s["hflip"]["per_dataset"].values())
    assert f"with a loss on {['no', 'one', 'two', 'three', 'four'][losses]} datasets" in text

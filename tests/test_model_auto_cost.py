"""bench/model_auto_cost.py: the pair order, the ratio and its summary, on made-up records; and
the README quotes the committed result when there is one."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from model_auto_cost import LOADED, MODELS, order, pairs, report, summary  # noqa: E402


def _rec(dataset: str, model: str, wall: float, load: float = 0.5, backbone: str | None = None) -> dict:
    return {"dataset": dataset, "model": model, "wall": wall, "load": [load, load], "best": 0.9, "test": 0.8,
            "backbone": backbone or model}


def _results(*recs: dict) -> dict:
    return {f"{r['dataset']}|{r['model']}|112|0": r for r in recs}


def test_the_pair_order_alternates_between_datasets():
    assert order(0) == MODELS and order(1) == MODELS[::-1] and order(2) == MODELS


def test_only_finished_pairs_are_compared_and_loaded_ones_leave_the_mean():
    res = _results(_rec("a", "efficientnet_lite0", 100), _rec("a", "auto", 120),
                   _rec("b", "efficientnet_lite0", 50), _rec("b", "auto", 100),
                   _rec("c", "efficientnet_lite0", 50), _rec("c", "auto", 200, load=LOADED + 1),
                   _rec("d", "auto", 500))  # no Lite0 run yet: not a pair
    assert set(pairs(res)) == {"a", "b", "c"}
    s = summary(res)
    assert s["ratios"] == {"a": 1.2, "b": 2.0, "c": 4.0}
    assert s["clean"] == 2 and math.isclose(s["geomean"], math.sqrt(1.2 * 2.0))


def test_the_report_marks_shared_runs_and_says_the_verdict():
    res = _results(_rec("a", "efficientnet_lite0", 100), _rec("a", "auto", 120, backbone="efficientnet_lite2"),
                   _rec("c", "efficientnet_lite0", 50), _rec("c", "auto", 200, load=LOADED + 1))
    text = report(res)
    assert "| a | 100 | 120 | 1.20× | efficientnet_lite2 |" in text
    assert "| c | 50 | 200 † | 4.00× |" in text
    assert "over the 1 pairs that did not share the CPU: **1.20×**, within issue 23's bound of 1.3×" in text
    res["a|auto|112|0"]["wall"] = 140
    assert "**1.40×**, above" in report(res)


def test_the_committed_report_is_the_committed_results():
    path = ROOT / "bench" / "results" / "model-auto-cost.json"
    assert report(json.loads(path.read_text())) == (ROOT / "bench" / "results" / "model-auto-cost.md").read_text()


def test_the_readme_quotes_the_measured_range():
    """The quickstart's --model auto cost is the committed pairs' lowest and highest ratio."""
    s = summary(json.loads((ROOT / "bench" / "results" / "model-auto-cost.json").read_text()))
    ratios = s["ratios"]
    readme = (ROOT / "README.md").read_text()
    words = {3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
    assert f"{min(ratios.values()):.2f}-{max(ratios.values()):.2f}x the wall" in readme
    assert f"of Lite0's auto on {words[len(ratios)]} suite datasets, {s['geomean']:.2f}x on average" in readme

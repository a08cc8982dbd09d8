"""bench/rung_schedule.py: the rung leader per schedule against the final ranking, on made-up
records; and docs/strategies.md quotes the committed results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from rung_schedule import FINAL, SCHEDULES, leader, outcomes, summary  # noqa: E402


def _suite(name: str, finals: dict[str, float]) -> dict:
    return {f"{name}|{FINAL[c]}|112|0": {"test": acc} for c, acc in finals.items()}


def _rungs(name: str, accs: dict[str, dict[str, float]]) -> dict:
    return {f"{name}|112|0": {"dataset": name, "seed": 0, "img": 112,
                              "rungs": {s: {c: {"val_acc": a} for c, a in v.items()} for s, v in accs.items()}}}


def test_a_schedule_whose_leader_ends_worse_pays_the_gap():
    finals = {"discriminative-bn-eval": 0.80, "full": 0.90, "lp-ft-bn-eval": 0.70}
    right = {"discriminative-bn-eval": 0.5, "full": 0.6, "lp-ft-bn-eval": 0.4}
    wrong = {"discriminative-bn-eval": 0.5, "full": 0.4, "lp-ft-bn-eval": 0.6}
    out = summary(_rungs("x", {"own": right, "restart": wrong, "constant": right}), _suite("x", finals))
    assert out["own"] == (1, 1, 0.0, 0.0)
    hits, n, mean, worst = out["restart"]
    assert (hits, n) == (0, 1) and mean == pytest.approx(20.0) and worst == pytest.approx(20.0)


def test_a_schedule_counts_only_the_datasets_where_it_ran():
    """A schedule added later (``half``) has run on fewer datasets than the others: its summary
    counts those, and the others' are unchanged."""
    finals = {"discriminative-bn-eval": 0.80, "full": 0.90, "lp-ft-bn-eval": 0.70}
    right = {"discriminative-bn-eval": 0.5, "full": 0.6, "lp-ft-bn-eval": 0.4}
    wrong = {"discriminative-bn-eval": 0.5, "full": 0.4, "lp-ft-bn-eval": 0.6}
    results = _rungs("x", {"own": right, "half": wrong}) | _rungs("y", {"own": right})
    out = summary(results, _suite("x", finals) | _suite("y", finals))
    assert out["own"] == (2, 2, 0.0, 0.0)
    assert out["half"][:2] == (0, 1) and out["half"][2] == pytest.approx(20.0)
    assert out["restart"] == (0, 0, 0.0, 0.0)


def test_ties_keep_the_race_order():
    assert leader({"discriminative-bn-eval": 0.5, "full": 0.5, "lp-ft-bn-eval": 0.4}) == "discriminative-bn-eval"


def test_a_dataset_without_its_fixed_runs_is_not_scored():
    finals = {"discriminative-bn-eval": 0.80, "full": 0.90}  # lp-ft's run missing
    accs = {s: {"discriminative-bn-eval": 0.5, "full": 0.6, "lp-ft-bn-eval": 0.4} for s in SCHEDULES}
    assert summary(_rungs("x", accs), _suite("x", finals))["own"][1] == 0


def test_strategies_md_quotes_the_committed_results():
    """Seed 0 compares all four schedules; the race's own and half an epoch also ran at seed 1."""
    results = json.loads((ROOT / "bench/results/rung-schedule.json").read_text())
    suite = json.loads((ROOT / "bench/results/suite-test.json").read_text())
    first, both = summary(results, suite, {0}), summary(results, suite)
    docs = " ".join((ROOT / "docs/strategies.md").read_text().split())
    (h0, n, m0, _), (h1, n1, m1, _), (h2, n2, m2, w2) = (first[s] for s in ("own", "restart", "constant"))
    datasets = sorted({r["dataset"] for r in results.values()})
    names = ", ".join(datasets[:-1]) + " and " + datasets[-1]
    assert f"the held-out splits of {names};" in docs
    assert (f"The race's own schedule's rung leader ended best on {h0} of {n} (regret {m0:.1f} points on average), "
            f"the restarted cosine's on {h1} of {n1} ({m1:.1f}), the constant LR's on {h2} of {n2} ({m2:.1f} on "
            f"average, {w2:.1f} at most)") in docs
    (ho, no, mo, wo), (hh, nh, mh, wh) = both["own"], both["half"]
    assert (f"Half an epoch of the race's own schedule (the rung where an epoch's does not fit, scored with the "
            f"weights it paused with) ended best on {hh} of {nh} ({mh:.1f} on average, {wh:.1f} at most) over "
            f"seeds 0 and 1, against {ho} of {no} ({mo:.1f}, {wo:.1f}) for a whole epoch's") in docs
    assert {r["seed"] for r in results.values()} == {0, 1}
    hq, nq, mq, wq = first["quarter"]
    assert f"A quarter of an epoch, measured to see whether the race could go shorter still, ended best on {hq} of " \
           f"{nq} at seed 0 ({mq:.1f} on average, {wq:.1f} at most)" in docs
    rows = [accs for *_, accs in outcomes(results, suite) if "half" in accs]
    same = sum(leader(a["own"]) == leader(a["half"]) for a in rows)
    assert f"the same leader on {same} of the {len(rows)}," in docs

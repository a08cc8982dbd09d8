"""The suite's held-out report: paired bootstrap intervals, the oracle and the leave-one-out row
(bench/heldout.py), on made-up records."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from heldout import (  # noqa: E402
    Diff,
    averaging,
    ceiling,
    complete,
    derived_rows,
    loo_rule,
    oracle,
    paired_matrix,
    report,
    suite_diff,
)


def rec(d: str, v: str, seed: int, bits: str, best: float = 0.5, **extra) -> dict:
    return {"dataset": d, "variant": v, "seed": seed, "img": 112, "test_correct": bits,
            "test": bits.count("1") / len(bits), "best": best} | extra


def test_a_constant_gap_has_a_point_interval():
    a = [rec("x", "auto", s, "1111") for s in range(3)]
    b = [rec("x", "b", s, "0000") for s in range(3)]  # every image, every seed: one more right
    d = suite_diff([paired_matrix(a, b)])
    assert (d.mean, d.lo, d.hi) == (1, 1, 1) and not d.inside_noise and d.cell() == "+100.0 [+100.0, +100.0]"


def test_one_seed_still_has_an_interval_from_the_test_images():
    """The images are resampled too: one seed of noisy outcomes is not a sure thing."""
    rng = np.random.default_rng(1)
    a = "".join(map(str, rng.integers(0, 2, 200)))
    b = "".join(map(str, rng.integers(0, 2, 200)))
    d = suite_diff([paired_matrix([rec("x", "auto", 0, a)], [rec("x", "b", 0, b)])])
    assert d.hi - d.lo > 0.1 and d.inside_noise and "inside the noise" in d.cell()


def test_seed_noise_widens_the_interval():
    """Two variants that trade places from seed to seed are no win, however many images agree."""
    n = 400
    a = [rec("x", "auto", 0, "1" * n), rec("x", "auto", 1, "0" * n), rec("x", "auto", 2, "1" * n)]
    b = [rec("x", "b", 0, "0" * n), rec("x", "b", 1, "1" * n), rec("x", "b", 2, "0" * n)]
    d = suite_diff([paired_matrix(a, b)])
    assert d.mean == pytest.approx(1 / 3) and d.lo < 0 < d.hi


def test_a_real_gap_on_many_images_is_found_and_covered():
    rng = np.random.default_rng(0)
    n, gap = 3000, 0.1
    a = [rec("x", "auto", s, "".join(map(str, (rng.random(n) < 0.8).astype(int)))) for s in range(3)]
    b = [rec("x", "b", s, "".join(map(str, (rng.random(n) < 0.8 - gap).astype(int)))) for s in range(3)]
    d = suite_diff([paired_matrix(a, b)])
    assert 0 < d.lo < gap < d.hi


def test_identical_outcomes_are_the_same_run_not_a_tie():
    a = [rec("x", "auto", s, "1010") for s in range(3)]
    assert suite_diff([paired_matrix(a, a)]).cell() == "the same run"
    assert Diff(0.0, -0.01, 0.01).cell() == "+0.0 [-1.0, +1.0] inside the noise"


def test_pairs_only_shared_seeds():
    a = [rec("x", "auto", 0, "11"), rec("x", "auto", 1, "11")]
    b = [rec("x", "b", 1, "00"), rec("x", "b", 2, "11")]
    assert paired_matrix(a, b).tolist() == [[1, 1]]
    with pytest.raises(ValueError, match="no seed"):
        paired_matrix(a[:1], b[:1])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(-1, 1), min_size=5, max_size=5), min_size=1, max_size=4), st.integers(0, 9))
def test_the_interval_holds_the_mean_and_stays_in_range(rows, seed):
    m = np.array(rows, dtype=np.int16)
    d = suite_diff([m], seed=seed)
    assert -1 <= d.lo <= d.hi <= 1 and d.mean == pytest.approx(m.mean())
    assert d.lo <= m.max() and d.hi >= m.min()


def test_a_seed_still_running_is_left_out_of_its_dataset_only():
    full = [rec(d, v, s, "10") for d in ("x", "y") for v in ("auto", "b") for s in (0, 1)]
    assert {d: sorted(r["seed"] for r in v["b"]) for d, v in complete(full).items()} == {"x": [0, 1], "y": [0, 1]}
    running = complete(full[:-1])  # y's b lacks seed 1: y is reported at seed 0, x at both
    assert {d: {v: sorted(r["seed"] for r in rs) for v, rs in runs.items()} for d, runs in running.items()} == {
        "x": {"auto": [0, 1], "b": [0, 1]}, "y": {"auto": [0], "b": [0]}}
    assert "Datasets: x, y; seeds: x 0, 1; y 0." in report(full[:-1], 112)
    assert "Datasets: x, y; seeds: 0, 1." in report(full, 112)
    no_b = [r for r in full if not (r["dataset"] == "y" and r["variant"] == "b")]
    assert set(complete(no_b)) == {"x"}  # a variant y never ran: y is not comparable


def test_the_oracle_is_best_on_test_and_the_loo_rule_learns_on_val():
    """Three datasets where val and test disagree: the rule must follow val, the oracle test."""
    runs = []
    for d, shift, val_best in (("x", 0.1, "lo"), ("y", 0.2, "lo"), ("z", 0.9, "hi")):
        runs.append(rec(d, "auto", 0, "11", bn_shift=shift))
        for v in ("lo", "hi"):
            bits = "11" if v != val_best else "10"  # the val winner is the test loser
            runs.append(rec(d, v, 0, bits, best=0.9 if v == val_best else 0.5))
    data = complete(runs)
    assert oracle(data["x"]) == "hi" and oracle(data["z"]) == "lo"
    assert derived_rows(data)["x"]["ceiling"] == data["x"]["hi"]  # one seed: the ceiling is its best run
    picks = loo_rule(data)
    assert picks["x"] == "lo"  # from y (low shift -> lo on val) and z (high shift -> hi)
    text = report(runs, 112)
    assert "| oracle |" in text and "| loo-rule |" in text and "Datasets: x, y, z; seeds: 0." in text


def test_the_averaging_gain_is_paired_against_the_winner_before_it():
    runs = []
    for d in ("x", "y", "z"):
        runs.append(rec(d, "auto", 0, "1110", bn_shift=0.1, race={"winner_test": {"test": 0.5, "test_correct": "1100"}}))
        runs.append(rec(d, "a", 0, "1100"))
    text = report(runs, 112)
    assert "| auto-before-averaging | 0.500 | +25.0 [" in text  # one more image right on each dataset


def test_tta_is_a_row_of_auto_s_own_runs_paired_against_them():
    runs = []
    for d in ("x", "y", "z"):
        runs.append(rec(d, "auto", 0, "1100", bn_shift=0.1, tta={"views": ["hflip"], "test": 0.75, "test_correct": "1110"}))
        runs.append(rec(d, "a", 0, "1100"))
    text = report(runs, 112)
    assert "| auto+tta | 0.750 | -25.0 [" in text  # one more image right with the views, on each dataset
    runs[0].pop("tta")  # one run without views: no row for its dataset
    assert "auto+tta" not in derived_rows(complete(runs))["x"] and "auto+tta" in derived_rows(complete(runs))["y"]


def test_the_soup_and_wise_ft_are_each_paired_against_what_they_started_from():
    """winner 1100 -> soup 1110 -> WiSE-FT 1111 on every dataset: +25 points each, +50 both; a
    dataset whose soup kept the winner alone counts the soup as the winner, and a run that did
    not race counts as no change."""
    runs = []
    for d in ("x", "y"):
        race = {"winner_test": {"test": 0.5, "test_correct": "1100"}, "soup_test": {"test": 0.75, "test_correct": "1110"}}
        runs += [rec(d, "auto+race-2.5", 0, "1111", race=race), rec(d, "a", 0, "1100"), rec(d, "auto", 0, "1010")]
    text = "\n".join(averaging(runs))
    row = next(line for line in text.splitlines() if line.startswith("| auto+race-2.5 |"))
    assert row.startswith("| auto+race-2.5 | 2 of 2 | +25.0 [") and "| +25.0 [" in row and "| +50.0 [" in row
    assert "| auto | 0 of 2 | the same run | the same run | the same run |" in text
    alone = [r | {"race": {"winner_test": r["race"]["winner_test"]}} if "race" in r else r for r in runs]
    row = next(line for line in "\n".join(averaging(alone)).splitlines() if line.startswith("| auto+race-2.5 |"))
    assert row.startswith("| auto+race-2.5 | 2 of 2 | the same run | +50.0 [")


def test_the_committed_held_out_report_is_recomputed_from_suite_test_json():
    """Every figure of bench/results/suite-test.md, recomputed from the recorded runs."""
    import json

    from heldout import report, report_seeds

    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    text = (results / "suite-test.md").read_text()
    records = list(json.loads((results / "suite-test.json").read_text()).values())
    assert report(records, 112, report_seeds(text)) == text


def test_the_readmes_held_out_summary_is_recomputed_from_suite_test_json():
    """The README's table is suite-test.md's summary at the same seeds (its main rows)."""
    import json

    from heldout import README_ROWS, readme_block, report_seeds

    root = Path(__file__).resolve().parents[1]
    results = root / "bench" / "results"
    records = list(json.loads((results / "suite-test.json").read_text()).values())
    block = readme_block(records, 112, report_seeds((results / "suite-test.md").read_text()))
    assert block in (root / "README.md").read_text()
    assert all(f"| {v} |" in block for v in README_ROWS if v != "loo-rule")  # that one needs 3 complete datasets


def test_each_race_is_listed_with_its_rungs_and_winner():
    runs = []
    for d in ("x", "y"):
        race = {"rungs": {"full": 0.6, "lp-ft-bn-eval": 0.7}, "winner": "lp-ft-bn-eval"}
        runs += [rec(d, "auto", 0, "11", race=race), rec(d, "a", 0, "10")]
    text = report(runs, 112)
    assert "- auto, seed 0: raced full 0.600, lp-ft-bn-eval 0.700 (val, after the rung) -> lp-ft-bn-eval" in text


def test_the_ceiling_takes_each_seeds_best_fixed_run():
    """Two seeds where a different fixed variant wins each: the ceiling beats the oracle, which
    must keep one variant for both; auto's own runs never enter it."""
    runs = [rec("x", "auto", s, "1111") for s in (0, 1)]
    runs += [rec("x", "a", 0, "1110"), rec("x", "a", 1, "1000"), rec("x", "b", 0, "1000"), rec("x", "b", 1, "1100")]
    data = complete(runs)
    rows = ceiling(data["x"])
    assert [(r["variant"], r["seed"]) for r in rows] == [("a", 0), ("b", 1)]
    assert oracle(data["x"]) == "a" and oracle(derived_rows(data)["x"]) == "a"  # never a derived row
    assert sum(r["test"] for r in rows) > sum(r["test"] for r in data["x"]["a"])


def test_the_ceiling_figures_in_the_docs_are_the_suites():
    """docs/strategies.md quotes the ceiling and the oracle on the suite's mean: recomputed
    from bench/results/suite-test.json as its report does."""
    import json
    import statistics

    from heldout import test_mean

    root = Path(__file__).resolve().parents[1]
    records = [r for r in json.loads((root / "bench/results/suite-test.json").read_text()).values() if r["img"] == 112]
    data = derived_rows(complete(records))
    ceil, orc = (statistics.fmean(test_mean(runs[v]) for runs in data.values()) for v in ("ceiling", "oracle"))
    docs = " ".join((root / "docs/strategies.md").read_text().split())
    quoted = f"scores {ceil:.3f} on the suite's mean, against {orc:.3f} for the oracle (the best fixed variant per dataset): {100 * (ceil - orc):.1f} points more"
    assert quoted in docs, quoted

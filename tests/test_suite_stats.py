"""The transfer suite's tables and the leave-one-dataset-out rule choice (bench/suite_stats.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from suite_stats import loo_threshold_rule, ranks, summary_tables, time_to  # noqa: E402


def test_ranks_share_ties():
    assert ranks({"a": 0.9, "b": 0.8, "c": 0.8, "d": 0.1}) == {"a": 1, "b": 2.5, "c": 2.5, "d": 4}


def test_time_to_target():
    assert time_to([[10, 0.3], [20, 0.6], [30, 0.7]], 0.6) == 20 and time_to([[10, 0.3]], 0.9) is None


def test_leave_one_out_picks_the_rule_from_the_other_datasets():
    # Far-from-ImageNet data (low skill) wants 'full', near data (high skill) wants 'lp-ft'.
    skill = {"a": 0.2, "b": 0.3, "c": 0.4, "d": 0.8, "e": 0.9, "f": 0.95}
    acc = {d: {"full": 0.8 if s < 0.5 else 0.6, "lp-ft": 0.6 if s < 0.5 else 0.85} for d, s in skill.items()}
    rows = loo_threshold_rule(acc, skill, ["full", "lp-ft"])
    assert [r["choice"] for r in rows] == ["full", "full", "full", "lp-ft", "lp-ft", "lp-ft"]
    assert all(r["regret"] == 0 for r in rows)
    # The held-out dataset never sets its own threshold: with it alone on its side, it is misplaced.
    acc["c"] = {"full": 0.5, "lp-ft": 0.9}  # c breaks the pattern; the others still say 'full' at 0.4
    c = next(r for r in loo_threshold_rule(acc, skill, ["full", "lp-ft"]) if r["dataset"] == "c")
    assert c["choice"] == "full" and c["regret"] == pytest.approx(0.4)


def test_summary_table_ranks_and_time_to_fastai():
    def rec(d, v, best, seed=0, **kw):
        return {"dataset": d, "variant": v, "seed": seed, "img": 96, "epochs": 4, "batch": 32, "best": best,
                "wall": 10.0, "curve": [[5.0, best - 0.1], [10.0, best]], **kw}

    records = [rec("x", "auto", 0.9, chosen="auto:lp-ft", skill=0.8, probe_acc=0.85), rec("x", "fastai", 0.8),
               rec("x", "head", 0.7), rec("y", "auto", 0.6, chosen="auto:full", skill=0.2, probe_acc=0.5),
               rec("y", "fastai", 0.65), rec("y", "head", 0.5)]
    text = summary_tables(records, 96)
    assert "| auto → lp-ft (skill 0.80, probe 0.850) | 0.900 ± 0.000 | 10 | 5 |" in text
    assert "| head | 0.700 ± 0.000 | 10 | never |" in text
    assert "| auto | 1.50 | 0.750 |" in text and "| fastai | 1.50 | 0.725 |" in text
    # the checks, counted: y's auto is below fastai and never reaches its final accuracy
    assert "- auto within 1 point of the best fixed strategy: 2 of 2" in text
    assert "- auto at or above fastai, reaching fastai's final accuracy within fastai's wall time: 1 of 2 (not: y)" in text
    assert "- auto at or above its own probe: 2 of 2" in text
    assert "- mean over these datasets: auto 0.750, the best fixed strategy (head) 0.600" in text


def test_a_dataset_still_running_is_named_and_left_out():
    def rec(d, v, best):
        return {"dataset": d, "variant": v, "seed": 0, "img": 112, "epochs": 4, "batch": 32, "best": best,
                "wall": 10.0, "curve": [[10.0, best]]}

    text = summary_tables([rec("x", "head", 0.7), rec("x", "full", 0.8), rec("z", "head", 0.9)], 112)
    assert "Still running, left out: z (1 runs)." in text and "## z" not in text and "## x" in text


RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
HEADERS = {"auto": "auto", "`discriminative --bn eval`": "discriminative+bn-eval", "`full`": "full",
           "plain loop": "plain", "`gradual --bn eval`": "gradual+bn-eval", "`lp-ft --bn eval`": "lp-ft+bn-eval",
           "`head`": "head", "fastai `fine_tune`": "fastai"}


def _suite_means(img: int) -> dict[str, float]:
    """Each variant's mean over datasets of its mean best val acc over seeds, from suite.json."""
    import json
    import statistics

    runs = [r for r in json.loads((RESULTS / "suite.json").read_text()).values() if r["img"] == img]
    per: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        per.setdefault(r["variant"], {}).setdefault(r["dataset"], []).append(r["best"])
    return {v: statistics.fmean(statistics.fmean(xs) for xs in d.values()) for v, d in per.items()}


def test_the_readme_suite_table_is_recomputed_from_suite_json():
    """Every mean the README's suite table quotes, recomputed from bench/results/suite.json."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| | auto |"))
    row = next(line for line in text.splitlines() if line.startswith("| mean best val acc |"))
    names = [c.strip() for c in header.strip("|").split("|")][1:]
    quoted = [float(c.strip().strip("*")) for c in row.strip("|").split("|")[1:]]
    means = _suite_means(112)
    assert len(names) == len(quoted) == len(HEADERS)
    for name, value in zip(names, quoted):
        assert round(means[HEADERS[name]], 3) == value, name


def test_rung_regret_on_made_up_curves():
    from suite_stats import rung_regret

    def rec(v, curve):
        return {"dataset": "x", "seed": 0, "img": 112, "variant": v, "curve": [[i, a] for i, a in enumerate(curve)]}

    records = [rec("a", [0.5, 0.9]), rec("b", [0.6, 0.7]), rec("c", [0.1, 0.2])]
    assert rung_regret(records, 1, candidates=("a", "b", "c")) == (0, 1, pytest.approx(0.2), pytest.approx(0.2))
    assert rung_regret(records, 2, candidates=("a", "b", "c")) == (1, 1, 0.0, 0.0)


def test_the_race_rung_figures_in_the_docs_are_the_suites():
    """docs/strategies.md and race.py quote how the epoch-1 (and 2, 3) leader fared on the
    suite's 112-px runs: recomputed here from bench/results/suite.json."""
    import json

    from suite_stats import rung_regret

    root = Path(__file__).resolve().parents[1]
    records = list(json.loads((root / "bench/results/suite.json").read_text()).values())
    (hits, n, mean1, max1), (_, _, mean2, _), (_, _, mean3, _) = (rung_regret(records, k) for k in (1, 2, 3))
    docs = (root / "docs/strategies.md").read_text()
    assert (hits, n) == (10, 16)
    quoted = (f"final best {hits} times in {n} and trailed the final best by {100 * mean1:.1f}", f"({100 * max1:.1f} at most",
              f"after epoch 2 by {100 * mean2:.1f}, after epoch 3 by {100 * mean3:.2f}")
    for text in quoted:
        assert text in " ".join(docs.split()), text


def test_the_held_out_rung_figures_in_the_docs_are_the_suites():
    """docs/strategies.md quotes how the epoch-1 (2, 3) val leader fared on the held-out splits'
    test accuracy: recomputed here from bench/results/suite-test.json."""
    import json

    from suite_stats import rung_regret

    root = Path(__file__).resolve().parents[1]
    records = list(json.loads((root / "bench/results/suite-test.json").read_text()).values())
    (hits, n, mean1, max1), (_, _, mean2, _), (_, _, mean3, _) = (rung_regret(records, k, on_test=True) for k in (1, 2, 3))
    docs = " ".join((root / "docs/strategies.md").read_text().split())
    quoted = (f"of the three {hits} times in {n} and trailed it by {100 * mean1:.1f} points on average ({100 * max1:.1f} at most)",
              f"the leader after epoch 2 trailed by {100 * mean2:.1f}, after epoch 3 by {100 * mean3:.1f}")
    for text in quoted:
        assert text in docs, text


def test_where_the_1000_image_races_repeat_the_fixed_run_is_what_the_docs_say():
    """docs/strategies.md names the seeds where gtsrb's and cifar10-mini's racing auto equals the
    fixed variant it chose image for image (the rest differ by their fixed runs' older streams)."""
    import json

    root = Path(__file__).resolve().parents[1]
    runs = json.loads((root / "bench/results/suite-test.json").read_text())
    same = {(d, s) for d, v in (("gtsrb", "full"), ("cifar10-mini", "discriminative+bn-eval")) for s in range(3)
            if runs[f"{d}|auto|112|{s}"]["test_correct"] == runs[f"{d}|{v}|112|{s}"]["test_correct"]}
    assert same == {("gtsrb", 2), ("cifar10-mini", 1), ("cifar10-mini", 2)}
    docs = " ".join((root / "docs/strategies.md").read_text().split())
    assert "(gtsrb's third seed, cifar10-mini's second and third)" in docs


def test_fashion_mnists_races_and_probe_guards_are_what_the_docs_say():
    """docs/strategies.md: on fashion-mnist the race kept full at every seed, and the probe guard
    kept the probe model at two of the three."""
    import json

    root = Path(__file__).resolve().parents[1]
    runs = json.loads((root / "bench/results/suite-test.json").read_text())
    races = [runs[f"fashion-mnist|auto|112|{s}"]["race"] for s in range(3)]
    assert [r["winner"] for r in races] == ["full"] * 3
    assert sum(r["probe_guard"]["kept"] for r in races) == 2
    docs = " ".join((root / "docs/strategies.md").read_text().split())
    assert ("the race kept `full`, the thresholds' choice, at every seed, and at two seeds the probe guard then kept "
            "the probe model") in docs

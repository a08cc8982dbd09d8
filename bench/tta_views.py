"""Which TTA views help: measured on finished suite runs, the evidence behind ``--tta auto``.

    .venv/bin/python bench/tta_views.py                 # every finished auto run under runs/suite
    .venv/bin/python bench/tta_views.py --report-only

Each run folder of ``bench/suite.py --test-split`` whose name starts ``auto-`` (any backbone, any
seed) that has a test.json: its best weights, with the run's own numerics, score the held-out
split's val half and test half with no views, ``hflip``, ``multi-scale`` and both; each image's
right/wrong is recorded. A run whose test outcomes equal another's on the same dataset (``--model
auto`` chose that backbone) counts once. The report gives each view set's test gain over no
views, as the mean over a dataset's runs and then over the datasets, with a 95 % bootstrap
interval over the datasets (runs of one dataset are not independent); and, for comparison, a
choice per run on val (the best val accuracy, ties to fewer views). The suite is the
development set: held-out datasets of other domains check it again.
Results: bench/results/tta-views.json (resumable) and tta-views.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

from competitor import ROOT, load_json, save_json

RESULTS = ROOT / "bench" / "results"
SETS = ("none", "hflip", "multi-scale", "hflip+multi-scale")  # fewer views first
REPLICATES = 4000


def view_probs(score, items: list) -> dict:
    """Each view set's class probabilities on ``items``. The views' probabilities are averaged
    (tta.predict_proba), so one pass per view group gives every set: hflip's own is twice
    (identity + hflip)'s mean less identity's."""
    p0 = score(items).probs
    flip = score(items, views=["hflip"]).probs * 2 - p0
    scales = score(items, views=["multi-scale"]).probs * 3 - p0  # the two zooms' sum
    return {"none": p0, "hflip": (p0 + flip) / 2, "multi-scale": (p0 + scales) / 3,
            "hflip+multi-scale": (p0 + flip + scales) / 4}


def measure(run: Path, split_root: Path) -> dict:
    """Right/wrong per image on val and test for each view set, as '0'/'1' strings."""
    import torch

    from layerwise.data import eval_items
    from layerwise.inference import validated_scorer

    score = validated_scorer(run)
    out: dict = {}
    for split in ("val", "test"):
        _, items = eval_items(str(split_root / run.parent.name / split), score.run.classes)
        labels = torch.tensor([y for _, y in items])
        out[split] = {k: "".join("1" if ok else "0" for ok in (p.argmax(-1) == labels).tolist())
                      for k, p in view_probs(score, items).items()}
    return out


def acc(bits: str) -> float:
    return bits.count("1") / len(bits)


def distinct(records: dict) -> dict:
    """The records less those whose test outcomes repeat another run's on the same dataset."""
    seen, out = set(), {}
    for key, rec in sorted(records.items()):
        sig = (rec["dataset"], rec["test"]["none"], rec["test"]["hflip+multi-scale"])
        if sig not in seen:
            seen.add(sig)
            out[key] = rec
    return out


def best_on_val(rec: dict) -> str:
    """The view set with the best val accuracy; a tie goes to fewer views."""
    return max(SETS, key=lambda s: (acc(rec["val"][s]), -SETS.index(s)))


RULES = {**{s: (lambda rec, s=s: s) for s in SETS[1:]}, "best on val, per run": best_on_val}


def gains(records: dict, rule) -> dict[str, float]:
    """dataset -> the mean over its runs of the test gain (points) of the set ``rule`` picks."""
    by: dict[str, list[float]] = {}
    for rec in records.values():
        pick = rule(rec)
        by.setdefault(rec["dataset"], []).append(100 * (acc(rec["test"][pick]) - acc(rec["test"]["none"])))
    return {d: statistics.mean(v) for d, v in sorted(by.items())}


def interval(per_dataset: dict[str, float], seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap of the mean over datasets, resampling datasets."""
    rng, vals = random.Random(seed), list(per_dataset.values())
    means = sorted(statistics.mean(rng.choice(vals) for _ in vals) for _ in range(REPLICATES))
    return means[int(0.025 * REPLICATES)], means[int(0.975 * REPLICATES) - 1]


def summary(records: dict) -> dict[str, dict]:
    """Per rule: per-dataset gains, their mean, interval and minimum."""
    out = {}
    for name, rule in RULES.items():
        g = gains(records, rule)
        out[name] = {"per_dataset": g, "mean": statistics.mean(g.values()), "interval": interval(g), "min": min(g.values())}
    return out


def report(records: dict) -> str:
    runs = distinct(records)
    s = summary(runs)
    datasets = sorted({r["dataset"] for r in runs.values()})
    lines = ["# TTA views on finished suite runs (held-out split, 112 px)", "",
             f"Written by `bench/tta_views.py` (its docstring has the method). {len(runs)} distinct auto runs "
             f"({len(records)} measured) on {len(datasets)} datasets. Test accuracy gain over no views, points: the "
             "mean over a dataset's runs, then over the datasets, with a 95 % bootstrap interval over the datasets.", "",
             "| views | " + " | ".join(datasets) + " | mean [95 %] | worst dataset |",
             "|---|" + "---:|" * len(datasets) + "---|---:|"]
    for name, r in s.items():
        lo, hi = r["interval"]
        lines.append(f"| {name} | " + " | ".join(f"{r['per_dataset'][d]:+.1f}" for d in datasets)
                     + f" | {r['mean']:+.1f} [{lo:+.1f}, {hi:+.1f}] | {r['min']:+.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="holds suite/ and suite-split/ (default runs/)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    path = RESULTS / "tta-views.json"
    records = load_json(path)
    if not args.report_only:
        import torch

        torch.set_num_threads(1)  # beside a suite run on the 2-core machine
        for run in sorted((args.runs / "suite").glob("*/auto-*")):
            key = f"{run.parent.name}/{run.name}"
            if key in records or not (run / "test.json").is_file():
                continue
            records[key] = {"dataset": run.parent.name, **measure(run, args.runs / "suite-split")}
            save_json(path, records)
            print(key, {k: round(acc(v), 4) for k, v in records[key]["test"].items()}, flush=True)
    (RESULTS / "tta-views.md").write_text(report(records))
    print(report(records))


if __name__ == "__main__":
    main()

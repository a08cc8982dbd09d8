"""Regularisers towards the pretrained model (--reg l2sp / lwf / cotune) against none, on a
held-out suite split: paired test accuracy over seeds, with 95 % bootstrap intervals.

    .venv/bin/python bench/regularisers.py --dataset flowers17 --seeds 0,1,2

Each run is ``layerwise fit`` with auto's budget for the dataset, at one strategy (default
``discriminative --bn eval``, what auto trains most often on the suite) and 112 px; the
regulariser and its strength are the only difference. Strengths are the papers' defaults, not
tuned here: L2-SP alpha 0.01 (Li et al. 2018), LwF lambda 1 (Li & Hoiem 2016), Co-Tuning
lambda 2.3 (Transfer-Learning-Library's default trade-off). Every finished run is recorded in
bench/results/regularisers.json at once; the report is bench/results/regularisers.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from competitor import ROOT, load_json, run_child, save_json
from heldout import paired_matrix, suite_diff
from suite import RESULTS, budget, datasets, fit_command, held_out, test_record

REGS = {"none": [], "l2sp:0.01": ["--reg", "l2sp:0.01"], "lwf:1": ["--reg", "lwf:1"], "cotune:2.3": ["--reg", "cotune:2.3"]}
PATH = RESULTS / "regularisers.json"


def run(data: Path, name: str, reg: str, seed: int, strategy: list[str], b: tuple) -> dict:
    """One fit: ``strategy`` is the strategy name and its flags (e.g. ``discriminative --bn eval``)."""
    out = ROOT / "runs" / "regularisers" / name / f"{reg.replace(':', '-')}-seed{seed}"
    cmd = fit_command(data, model="efficientnet_lite0", strategy=strategy[0], seed=seed, img=112, b=b, out=out,
                      extra=[*strategy[1:], *REGS[reg]])
    _, wall, _ = run_child(cmd)
    return test_record(json.loads((out / "test.json").read_text())) | {"wall": wall}


def report(records: dict, name: str) -> str:
    by = {reg: [r for r in records.values() if r["dataset"] == name and r["reg"] == reg] for reg in REGS}
    lines = [f"# Regularisers on {name}'s held-out split (112 px)", "",
             "Written by `bench/regularisers.py` (its docstring has the settings). Test accuracy per seed; "
             "each regulariser minus none, paired on seeds and test images, 95 % bootstrap interval.", "",
             "| --reg | test acc per seed | mean | it − none, points [95 %] |", "|---|---|---:|---|"]
    for reg, rs in by.items():
        if not rs:
            continue
        rs = sorted(rs, key=lambda r: r["seed"])
        cell = "" if reg == "none" or not by["none"] else suite_diff([paired_matrix(rs, by["none"])]).cell()
        mean = sum(r["test"] for r in rs) / len(rs)
        per_seed = " / ".join(format(r["test"], ".3f") for r in rs)
        lines.append(f"| {reg} | {per_seed} | {mean:.3f} | {cell} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="flowers17")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--strategy", default="discriminative --bn eval")
    args = ap.parse_args()
    data = held_out(args.dataset, datasets()[args.dataset], ROOT / "runs" / "suite-split")
    b = budget(data)
    records = load_json(PATH)
    strategy = args.strategy.split()
    for seed in (int(s) for s in args.seeds.split(",")):
        for reg in REGS:
            key = f"{args.dataset}|{reg}|{seed}"
            if key not in records:
                records[key] = run(data, args.dataset, reg, seed, strategy, b) | {
                    "dataset": args.dataset, "reg": reg, "seed": seed, "strategy": args.strategy, "epochs": b[0]}
                save_json(PATH, records)
                print(f"  {reg:<12} seed {seed}: test {records[key]['test']:.3f}  {records[key]['wall']:.0f}s", flush=True)
    (RESULTS / "regularisers.md").write_text(report(records, args.dataset))
    print(f"wrote {RESULTS / 'regularisers.md'}")


if __name__ == "__main__":
    main()

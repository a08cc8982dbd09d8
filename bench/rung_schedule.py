"""Which learning-rate schedule inside a race rung best predicts the candidates' final ranking.

    .venv/bin/python bench/rung_schedule.py [--datasets gtsrb,dtd] [--seed 0]

For each dataset's held-out split (bench/suite.py: train, val, and a test no choice sees) the
script runs auto's probe once, then trains each of the race's candidates (race.CANDIDATES: the
same run configs the race builds, lp-ft from the probe's head) for one rung under each schedule:

- ``own``: epoch 1 of the candidate's own cosine over auto's whole budget (what the race does);
- ``restart``: a cosine that restarts every epoch (``--scheduler cosine-restarts --t0 1
  --t-mult 1``), so the rung ends with its LR decayed;
- ``constant``: a constant LR (``--scheduler constant``), the decay left for the winner;
- ``half``: the first half of epoch 1 of the candidate's own schedule (a rung shorter than an
  epoch, paused mid-epoch and scored with the weights it paused with: racecost.RUNGS).
- ``quarter``: the first quarter of epoch 1, alike (not a rung the race takes: measured to see
  whether it could be).

Each rung is scored as the race scores it (race.rung_result: val, BatchNorm statistics
re-estimated for candidates on batch statistics). The yardstick is the final *test* accuracy of
each candidate's complete fixed run at the same seed in bench/results/suite-test.json (own
schedule, all epochs): a schedule predicts well when its rung leader is the candidate that ends
best. Writes bench/results/rung-schedule.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections.abc import Collection
from pathlib import Path

from competitor import load_json, save_json  # bench/ is on the path: these run as scripts
from suite import RESULTS, ROOT, budget, datasets, held_out

# schedule -> (config overrides, rung in epochs)
SCHEDULES: dict[str, tuple[dict, float]] = {
    "own": ({}, 1.0), "restart": ({"scheduler": "cosine-restarts", "t0": 1, "t_mult": 1}, 1.0),
    "constant": ({"scheduler": "constant"}, 1.0), "half": ({}, 0.5), "quarter": ({}, 0.25)}
# race candidate -> its complete fixed run's variant in suite-test.json
FINAL = {"discriminative-bn-eval": "discriminative+bn-eval", "full": "full", "lp-ft-bn-eval": "lp-ft+bn-eval"}
OUT = RESULTS / "rung-schedule.json"


def rungs(name: str, data: Path, seed: int, img: int, schedules: list[str]) -> dict[str, dict[str, dict]]:
    """schedule -> candidate -> its rung's val accuracy and per-image outcomes, for ``schedules``."""
    from layerwise import engine, race
    from layerwise.config import RunConfig
    from layerwise.data import check_images
    from layerwise.racecost import on_batch_statistics

    epochs, batch, patience, _ = budget(data)
    root = ROOT / "runs" / "rung-schedule" / f"{name}-seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig(data=str(data), model="efficientnet_lite0", strategy="auto", epochs=epochs, batch_size=batch,
                    patience=patience, img_size=img, seed=seed, workers=1, quiet=True, out=str(root))
    p = engine.prepare(cfg)
    engine.probe(cfg, p, root)  # the probe's head: lp-ft's start, as in the race
    splits, val = p.splits, check_images(p.splits.val)[0]
    settings = {"epochs": epochs, "batch_size": batch, "patience": patience, "img_size": img}
    out: dict[str, dict[str, dict]] = {}
    for sched in schedules:
        overrides, rung = SCHEDULES[sched]
        out[sched] = {}
        for cand in race.ordered("discriminative"):
            sub = race.candidate_config(dataclasses.replace(cfg, **overrides), settings, dataclasses.asdict(cand), root)
            sub = dataclasses.replace(sub, out=str(root / sched / cand.name))
            race.train_rung(sub, rung)
            res = race.rung_result(Path(sub.out), val, splits if on_batch_statistics(sub.bn) else None,
                                   paused=race.mid_epoch(rung))
            out[sched][cand.name] = {"val_acc": res["val_acc"], "correct": res["correct"]}
            print(f"{name} {sched:8s} {cand.name:24s} rung val {res['val_acc']:.4f}", flush=True)
    return out


def finals(suite: dict, name: str, seed: int, img: int) -> dict[str, float] | None:
    """candidate -> its complete fixed run's test accuracy, or None when one is missing."""
    keys = {c: f"{name}|{v}|{img}|{seed}" for c, v in FINAL.items()}
    if not all(k in suite for k in keys.values()):
        return None
    return {c: suite[k]["test"] for c, k in keys.items()}


def leader(accs: dict[str, float]) -> str:
    """The rung's leader; ties keep the earlier candidate (the race's order, favourite first)."""
    return max(accs, key=lambda c: (accs[c], -list(accs).index(c)))


def regret(final: dict[str, float], accs: dict[str, float]) -> float:
    """Points the rung's leader ends below the candidate that ends best."""
    return 100 * (max(final.values()) - final[leader(accs)])


def outcomes(results: dict, suite: dict) -> list[tuple[str, int, dict[str, float], dict[str, dict[str, float]]]]:
    """Per recorded dataset with complete fixed runs: (name, seed, final test per candidate,
    schedule -> rung val accuracy per candidate, for the schedules it has run)."""
    out = []
    for _key, rec in sorted(results.items()):
        final = finals(suite, rec["dataset"], rec["seed"], rec["img"])
        if final is not None:
            out.append((rec["dataset"], rec["seed"], final,
                        {s: {c: v["val_acc"] for c, v in rec["rungs"][s].items()} for s in SCHEDULES
                         if s in rec["rungs"]}))
    return out


def summary(results: dict, suite: dict, seeds: Collection[int] | None = None) -> dict[str, tuple[int, int, float, float]]:
    """schedule -> (times its rung leader ended best, datasets, mean and max regret in points),
    over the datasets where the schedule ran (at ``seeds``, default all)."""
    rows = [r for r in outcomes(results, suite) if seeds is None or r[1] in seeds]
    out = {}
    for s in SCHEDULES:
        regrets = [regret(final, accs[s]) for _, _, final, accs in rows if s in accs]
        hits = sum(r == 0 for r in regrets)
        out[s] = (hits, len(regrets), statistics.mean(regrets) if regrets else 0.0, max(regrets, default=0.0))
    return out


def report(results: dict, suite: dict) -> str:
    rows = []
    for name, seed, final, accs in outcomes(results, suite):
        cells = [f"{leader(accs[s])} ({' / '.join(f'{a:.3f}' for a in accs[s].values())}); regret "
                 f"{regret(final, accs[s]):.1f}" if s in accs else "not run" for s in SCHEDULES]
        rows.append(f"| {name} | {seed} | " + " / ".join(f"{final[c]:.3f}" for c in FINAL) + " | "
                    + " | ".join(cells) + " |")
    lines = ["# Which schedule inside a rung predicts the final ranking", "",
             "`.venv/bin/python bench/rung_schedule.py` (held-out splits, Lite0, 112 px, auto's budget). Rung val "
             "accuracies are in the race's order: " + ", ".join(FINAL) + ". The final column is each candidate's "
             "complete fixed run's test accuracy (bench/results/suite-test.json); regret is the best final minus "
             "the rung leader's final, in points.", "",
             "| dataset | seed | final test | " + " | ".join(f"rung: {s}" for s in SCHEDULES) + " |",
             "|---|---:|---|" + "---|" * len(SCHEDULES), *rows, ""]
    for seed in sorted({r[1] for r in outcomes(results, suite)}):
        lines.append(f"Seed {seed}:")
        lines.append("")
        for s, (hits, n, mean, worst) in summary(results, suite, {seed}).items():
            if n:
                lines.append(f"- `{s}`: the leader ended best on {hits} of {n}; regret mean {mean:.1f}, max {worst:.1f} "
                             "points")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="", help="comma-separated subset (default: all with complete fixed runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--schedules", default=",".join(SCHEDULES), help=f"comma-separated subset of {', '.join(SCHEDULES)}")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    wanted = args.schedules.split(",")
    unknown = [s for s in wanted if s not in SCHEDULES]
    if unknown:
        p.error(f"unknown schedule {unknown[0]!r}; choose from {', '.join(SCHEDULES)}")
    suite = json.loads((RESULTS / "suite-test.json").read_text())
    results = load_json(OUT)
    if not args.report_only:
        for name, data in datasets().items():
            key = f"{name}|{args.img_size}|{args.seed}"
            todo = [s for s in wanted if s not in results.get(key, {}).get("rungs", {})]
            if (args.datasets and name not in args.datasets.split(",")) or not todo:
                continue
            if finals(suite, name, args.seed, args.img_size) is None:
                print(f"{name}: no complete fixed runs at seed {args.seed} in suite-test.json; skipped")
                continue
            held = held_out(name, data, ROOT / "runs" / "suite-split")
            done = results.get(key, {}).get("rungs", {})
            results[key] = {"dataset": name, "seed": args.seed, "img": args.img_size,
                            "rungs": done | rungs(name, held, args.seed, args.img_size, todo)}
            save_json(OUT, results)
    text = report(results, suite)
    OUT.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""What auto's race costs against one ``discriminative --bn eval`` run at the same budget (issue
22: at most ``--race-cost`` runs, 1.5 by default, probe and averaging included), measured as
controlled pairs beside what racecost priced it at.

    .venv/bin/python bench/race_cost.py --sizes gtsrb:10:3,gtsrb:22:6,gtsrb:100:25 --rounds 2
    .venv/bin/python bench/race_cost.py --sizes gtsrb:22:6 --race-cost 1.6   # a race 1.5 refuses
    .venv/bin/python bench/race_cost.py --report-only

A size is DATASET:TRAIN:VAL, images per class: the suite's held-out split (bench/suite.py
``held_out``) cut to the first files of each class by name, as symlinks under runs/race-cost/.
Both runs get auto's budget for that many images (bench/suite.py ``budget``: epochs, batch,
patience) and the suite's settings (112 px, seed 0, one loader worker). Each round runs the pair
back to back, in alternating order, each started once the machine is quiet, with the load
average recorded; a ratio is auto's wall over the same round's ``discriminative --bn eval``.
racecost's price is the one auto wrote in race.json (none when it did not race). Results:
bench/results/race-cost-pairs.json (resumable) and race-cost-pairs.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial
from pathlib import Path

from competitor import LOADED, ROOT, load_json, run_child
from model_auto_cost import record_quiet
from suite import budget, datasets, fit_command, held_out, link

RESULTS = ROOT / "bench" / "results"
VARIANTS = {"discriminative": ["--bn", "eval"], "auto": []}  # the reference first: --race-cost counts in its runs


def parse_size(text: str) -> tuple[str, int, int]:
    """``DATASET:TRAIN:VAL`` -> (dataset, training images per class, val images per class)."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit() or int(parts[1]) < 1 or int(parts[2]) < 1:
        raise SystemExit(f"--sizes: {text!r} is not DATASET:TRAIN:VAL (images per class, 1 or more), e.g. gtsrb:22:6")
    return parts[0], int(parts[1]), int(parts[2])


def subset(data: Path, train: int, val: int, root: Path) -> Path:
    """``data``'s train/ and val/ cut to the first ``train`` and ``val`` files of each class, by
    name, as symlinks under ``root`` (written once; ``data`` is never modified)."""
    out = root / f"{data.name}-{train}-{val}"
    if (out / "val").is_dir():
        return out
    for part, n in (("train", train), ("val", val)):
        for cls in sorted(p for p in (data / part).iterdir() if p.is_dir()):
            link(sorted(f for f in cls.iterdir() if f.is_file())[:n], out / part / cls.name)
    return out


def order(round_: int) -> tuple[str, ...]:
    """The pair's order in a round: alternating, so neither always runs second."""
    names = tuple(VARIANTS)
    return names if round_ % 2 == 0 else names[::-1]


def run_one(data: Path, variant: str, race_cost: float | None, out: Path) -> dict:
    """One ``layerwise fit`` with auto's budget for ``data``: its wall time and, for auto, what
    its race planned (race.json: the candidates, the rung, the priced cost)."""
    extra = VARIANTS[variant] + (["--race-cost", str(race_cost)] if race_cost is not None and variant == "auto" else [])
    b = budget(data)
    _, wall, _ = run_child(fit_command(data, model="efficientnet_lite0", strategy=variant, seed=0, img=112, b=b,
                                       out=out, extra=extra))
    rec: dict = {"wall": wall, "epochs": b[0], "batch": b[1]}
    race = out / "race.json"
    if variant == "auto" and race.is_file():
        state = json.loads(race.read_text())
        rec |= {"raced": [c["name"] for c in state["candidates"]], "rung": state["rung_epochs"],
                "priced": state["cost"]["estimate"], "winner": state["winner"]}
    return rec


def loaded(rec: dict) -> bool:
    return rec["load"][0] > LOADED


def summary(results: dict) -> dict[str, dict]:
    """size -> its rounds' ratios (auto over the same round's reference), the geometric mean of
    those where neither run shared the CPU, and the price auto's race.json gave."""
    by: dict[str, dict[int, dict[str, dict]]] = {}
    for rec in results.values():
        by.setdefault(rec["size"], {}).setdefault(rec["round"], {})[rec["variant"]] = rec
    out = {}
    for size, rounds in sorted(by.items()):
        done = {r: v for r, v in sorted(rounds.items()) if all(k in v for k in VARIANTS)}
        ratios = {r: v["auto"]["wall"] / v["discriminative"]["wall"] for r, v in done.items()}
        shared_cpu = {r for r, v in done.items() if any(loaded(x) for x in v.values())}
        clean = [x for r, x in ratios.items() if r not in shared_cpu]
        first = next(iter(done.values()))["auto"] if done else {}
        out[size] = {"ratios": ratios, "shared": shared_cpu, "clean": len(clean),
                     "geomean": statistics.geometric_mean(clean) if clean else None,
                     **{k: first.get(k) for k in ("priced", "raced", "rung", "limit")},
                     "walls": {k: [v[k]["wall"] for v in done.values()] for k in VARIANTS}}
    return out


def report(results: dict) -> str:
    lines = ["# What auto's race costs, controlled pairs", "",
             "Written by `bench/race_cost.py` from `bench/results/race-cost-pairs.json`: per size, rounds of "
             "`layerwise fit --strategy auto` and `--strategy discriminative --bn eval` back to back in alternating "
             "order, auto's budget for both (the suite's held-out split cut to the first files of each class, "
             "112 px, seed 0), each run started once the 1-minute load average is low; the ratio is auto's wall "
             f"over the same round's. † marks a ratio with a run started above load {LOADED} (another job shared "
             "the CPU), left out of the mean.", "",
             "| size (per class) | epochs, batch | auto's plan | priced | `--race-cost` | auto s | reference s | "
             "ratio per round | geometric mean |",
             "|---|---|---|---:|---:|---|---|---|---:|"]
    for size, s in summary(results).items():
        recs = [r for r in results.values() if r["size"] == size]
        epochs, batch = recs[0]["epochs"], recs[0]["batch"]
        plan = (f"{', '.join(s['raced'])} for {s['rung']:g} epoch(s)" if s["raced"] else "no race")
        ratios = ", ".join(f"{x:.2f}{' †' * (r in s['shared'])}" for r, x in s["ratios"].items())
        walls = {k: ", ".join(f"{w:.0f}" for w in v) for k, v in s["walls"].items()}
        mean = f"{s['geomean']:.2f}" if s["geomean"] is not None else "—"
        lines.append(f"| {size} | {epochs}, {batch} | {plan} | {s['priced'] if s['priced'] is not None else '—'} | "
                     f"{s['limit'] if s['limit'] is not None else 'default'} | {walls['auto']} | "
                     f"{walls['discriminative']} | {ratios} | {mean} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="gtsrb:10:3,gtsrb:100:25", help="DATASET:TRAIN:VAL per class, comma-separated")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--race-cost", type=float, default=None, help="auto's --race-cost (default: its own, 1.5)")
    p.add_argument("--results", default=str(RESULTS / "race-cost-pairs.json"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    path = Path(args.results)
    results = load_json(path)
    if not args.report_only:
        found = datasets()
        for text in args.sizes.split(","):
            name, train, val = parse_size(text)
            size = f"{name}:{train}:{val}" + (f" @{args.race_cost:g}" if args.race_cost is not None else "")
            data = subset(held_out(name, found[name], ROOT / "runs" / "suite-split"), train, val,
                          ROOT / "runs" / "race-cost")
            for r in range(args.rounds):
                for variant in order(r):
                    key = f"{size}|{variant}|{r}"
                    if key in results:
                        continue
                    out = ROOT / "runs" / "race-cost" / "out" / variant
                    rec = record_quiet(path, results, key, partial(run_one, data, variant, args.race_cost, out),
                                       {"size": size, "variant": variant, "round": r, "limit": args.race_cost})
                    print(f"{size} round {r} {variant}: {rec['wall']:.0f}s, load {rec['load'][0]:.1f}", flush=True)
    (RESULTS / "race-cost-pairs.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()

"""Speed benchmark: layerwise against the plain PyTorch loop (and fastai when installed),
same data, model, weights, image size, epochs and (no) augmentation, in one run.

    .venv/bin/python bench/speed.py [--epochs 3] [--img-size 64] [--target 0.55]
    .venv/bin/python bench/speed.py --strategies full --same-optimizer --seeds 0,1,2,3,4

With ``--seeds``, each seed runs the plain loop and layerwise once and the table reports
accuracy as mean ± std and the paired difference (same seed) with its standard error, so
"within 1 point" is measured rather than read off one noisy run (500 val images: one run's
accuracy has a binomial s.e. of about 2 points).

Each competitor runs in its own process (peak memory is that process's max RSS). Prints a
Markdown table with ratios against the plain loop and writes it to bench/results/speed.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from competitor import run_child, with_load  # bench/ is on the path: these run as scripts

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10-mini"


# The competitors have no 'auto': against layerwise's auto they run their full fine-tuning
# (for fastai, fine_tune: one frozen epoch, then everything).
COMPETITOR_STRATEGY = {"auto": "full"}


def child(cmd: list[str]) -> tuple[str, dict]:
    """run_child, with the 1-minute load average before and after: the machine is shared."""
    (out, wall, rss), load = with_load(run_child, cmd)
    return out, {"wall": wall, "rss": rss, "load": load}


def plain(args: argparse.Namespace, strategy: str, seed: int = 0) -> dict:
    strategy = COMPETITOR_STRATEGY.get(strategy, strategy)
    out, info = child([sys.executable, "bench/plain_loop.py", args.data, "--strategy", strategy,
                       "--epochs", str(args.epochs), "--img-size", str(args.img_size), "--seed", str(seed)])
    return {"rows": [json.loads(line) for line in out.splitlines() if line.startswith("{")], **info}


def layerwise(args: argparse.Namespace, strategy: str, seed: int = 0) -> dict:
    run = ROOT / "runs" / "bench-speed" / f"{strategy}-seed{seed}"
    # Equal settings: the plain loop's optimizer (Adam, constant LR, no weight decay).
    same_optim = ["--optimizer", "adam", "--scheduler", "constant", "--weight-decay", "0"] if args.same_optimizer else []
    _, info = child([sys.executable, "-m", "layerwise", "fit", args.data, "--strategy", strategy,
                     "--epochs", str(args.epochs), "--img-size", str(args.img_size), "--augment", "none",
                     "--workers", "1", "--quiet", "--seed", str(seed), "--out", str(run), "--overwrite", *same_optim])
    return {"rows": [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()], **info}


def fastai(args: argparse.Namespace, strategy: str) -> dict | None:
    try:
        import fastai  # noqa: F401
    except ImportError:
        return None
    strategy = COMPETITOR_STRATEGY.get(strategy, strategy)
    out, info = child([sys.executable, "bench/fastai_loop.py", args.data, "--strategy", strategy,
                       "--epochs", str(args.epochs), "--img-size", str(args.img_size)])
    return {"rows": [json.loads(line) for line in out.splitlines() if line.startswith("{")], **info}


def summarise(r: dict, target: float) -> dict:
    rows = r["rows"]  # auto's first row may be its probe (epoch -1): a result, but no training throughput
    trained = [x for x in rows if x.get("images_per_second") is not None]
    later = [x["images_per_second"] for x in trained[1:]] or [trained[0]["images_per_second"]]
    hit = next((x["elapsed_seconds"] for x in rows if x["val_acc"] >= target), None)
    return {"ips1": trained[0]["images_per_second"], "ips2": sum(later) / len(later), "acc": rows[-1]["val_acc"],
            "best": max(x["val_acc"] for x in rows), "tta": hit, "wall": r["wall"], "rss": r["rss"],
            "load": "{:.1f}→{:.1f}".format(*r["load"])}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def parity(args: argparse.Namespace, seeds: list[int]) -> None:
    """Best val accuracy and epoch-2+ throughput of both tools over seeds, paired by seed."""
    settings = "the plain loop's Adam, constant LR, no weight decay" if args.same_optimizer else "layerwise defaults"
    lines = [f"cifar10-mini, efficientnet_lite0, {args.img_size} px, {args.epochs} epochs, no augmentation, "
             f"layerwise with {settings}; seeds {', '.join(map(str, seeds))}", "",
             "| strategy | tool | best val acc per seed | mean ± std | img/s epochs 2+ (mean) | x plain | load |",
             "|---|---|---|---:|---:|---:|---|"]
    for strategy in args.strategies.split(","):
        res = {"plain loop": [], "layerwise": []}
        for seed in seeds:
            res["plain loop"].append(summarise(plain(args, strategy, seed), args.target))
            res["layerwise"].append(summarise(layerwise(args, strategy, seed), args.target))
            print(f"seed {seed}: plain {res['plain loop'][-1]['best']:.3f}, layerwise {res['layerwise'][-1]['best']:.3f}",
                  flush=True)
        base = sum(r["ips2"] for r in res["plain loop"]) / len(seeds)
        for tool, rs in res.items():
            m, sd = _mean_std([r["best"] for r in rs])
            ips = sum(r["ips2"] for r in rs) / len(rs)
            per_seed = " ".join(f"{r['best']:.3f}" for r in rs)
            lines.append(f"| {strategy} | {tool} | {per_seed} | {m:.3f} ± {sd:.3f} | "
                         f"{ips:.0f} | {ips / base:.2f} | {', '.join(r['load'] for r in rs)} |")
        diffs = [a["best"] - b["best"] for a, b in zip(res["layerwise"], res["plain loop"])]
        dm, dsd = _mean_std(diffs)
        per_seed = " ".join(f"{d:+.3f}" for d in diffs)
        lines.append(f"| {strategy} | layerwise − plain (paired) | {per_seed} | "
                     f"{dm:+.3f} ± {dsd / len(diffs) ** 0.5:.3f} (s.e.) | | |")
    text = "\n".join(lines)
    print("\n" + text)
    (ROOT / "bench" / "results" / "parity.md").write_text(text + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--target", type=float, default=0.55, help="val accuracy for time-to-accuracy")
    p.add_argument("--strategies", default="head,partial,full")
    p.add_argument("--same-optimizer", action="store_true",
                   help="give layerwise the plain loop's Adam / constant LR / no weight decay instead of its defaults")
    p.add_argument("--out", default="speed.md", help="file name under bench/results/ (default: speed.md)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: accuracy parity over seeds (plain loop "
                   "and layerwise only) instead of the one-seed table")
    args = p.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"benchmark data {args.data} not found; it is read from ../shared/data/cifar10-mini")
    if args.seeds:
        return parity(args, [int(s) for s in args.seeds.split(",")])
    lines = [f"cifar10-mini, efficientnet_lite0 (offline ImageNet weights), {args.img_size} px, {args.epochs} epochs, "
             f"no augmentation, batch 64, 1 loader worker; time to val acc >= {args.target} counts set-up too; load is "
             "the 1-minute load average before → after the run", "",
             "| strategy | tool | img/s epoch 1 | img/s epochs 2+ | x plain (2+) | best val acc | time to target s "
             "| wall s | peak RSS MB | load |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for strategy in args.strategies.split(","):
        results = {"plain loop": plain(args, strategy), "layerwise": layerwise(args, strategy)}
        fa = fastai(args, strategy)
        if fa:
            results["fastai"] = fa
        base = summarise(results["plain loop"], args.target)["ips2"]
        for tool, r in results.items():
            s = summarise(r, args.target)
            tta = f"{s['tta']:.0f}" if s["tta"] is not None else "not reached"
            lines.append(f"| {strategy} | {tool} | {s['ips1']:.0f} | {s['ips2']:.0f} | {s['ips2'] / base:.2f} | "
                         f"{s['best']:.3f} | {tta} | {s['wall']:.0f} | {s['rss']:.0f} | {s['load']} |")
        print("\n".join(lines[-len(results):]), flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

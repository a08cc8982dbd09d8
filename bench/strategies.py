"""Strategy benchmark on ../shared/data/cifar10-mini: val accuracy and wall time per strategy.

Every strategy runs through `layerwise fit` with the same seed, split, augmentation, image
size and epochs, on the offline ImageNet EfficientNet-Lite0 weights.

    .venv/bin/python bench/strategies.py [--epochs 4] [--img-size 64] [--strategies head,full,...]

Prints a Markdown table and writes it to bench/results/strategies.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from competitor import with_load  # bench/ is on the path: this runs as a script

from layerwise.checkpoint import read_jsonl
from layerwise.config import RunConfig
from layerwise.engine import fit

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10-mini"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--strategies", default="head,full,lp-ft,gradual,discriminative,auto")
    p.add_argument("--augment", default="light")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--bn", default="frozen,eval", help="BatchNorm modes to cross with the strategies")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-strategies"))
    args = p.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"benchmark data {args.data} not found; it is read from ../shared/data/cifar10-mini")
    rows = []
    for bn in args.bn.split(","):
        for name in args.strategies.split(","):
            run = Path(args.out) / f"{name}-{bn}"
            cfg = RunConfig(data=args.data, strategy=name, epochs=args.epochs, img_size=args.img_size, bn=bn,
                            augment=args.augment, precision=args.precision, out=str(run), quiet=True, seed=0)
            tic = time.perf_counter()
            _, load = with_load(fit, cfg, overwrite=True)  # a benchmark re-measures: replace the last run
            wall = time.perf_counter() - tic
            m = read_jsonl(run / "metrics.jsonl")
            plan = json.loads((run / "plan.json").read_text())
            best = max(m, key=lambda r: r["val_acc"])
            rows.append({"strategy": plan["strategy"], "bn": bn, "best_val_acc": best["val_acc"],
                         "best_epoch": best["epoch"], "final_val_acc": m[-1]["val_acc"], "wall_s": wall,
                         "train_img_s": statistics.fmean(r["images_per_second"] for r in m if r["epoch"] >= 0),
                         "load": "{:.1f}→{:.1f}".format(*load)})
    head = (f"cifar10-mini (1,000 train / 500 val), efficientnet_lite0 (offline ImageNet weights), "
            f"{args.img_size} px, {args.epochs} epochs, augment {args.augment}, {args.precision}, seed 0; load: the "
            "1-minute load average before → after the run")
    lines = [head, "", "| strategy | --bn | best val acc (epoch) | final val acc | wall s | train img/s | load |",
             "|---|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['strategy']} | {r['bn']} | {r['best_val_acc']:.3f} ({r['best_epoch']}) | {r['final_val_acc']:.3f} | "
              f"{r['wall_s']:.0f} | {r['train_img_s']:.0f} | {r['load']} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "strategies.md").write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Speed at real image sizes: layerwise ``auto`` against the plain PyTorch loop and fastai
``fine_tune`` at 224 px, on real photos (../shared/data/suite/flowers17 and caltech101).

Every tool gets the same model (offline EfficientNet-Lite0), weights, image size, epochs,
batch size and seed, each in its own process. Reported per dataset: best and final val
accuracy, wall time (set-up included), seconds until the run first reaches fastai's best
accuracy, and training images per second over the whole run. ``auto+progressive`` is auto
with progressive resizing (half the side first, 224 px at the end); ``auto+fixres`` trains at
160 px and evaluates at 224 px (FixRes). The machine's 1-minute
load average is recorded before and after each run: on a shared machine, read the ratios,
which come from runs made minutes apart, with it.

    .venv/bin/python bench/realsize.py                                  # both datasets, 3 epochs
    .venv/bin/python bench/realsize.py --datasets flowers17 --seeds 0,1 --variants auto,auto+progressive

Each finished run is recorded in bench/results/realsize.json at once (an interrupted run
resumes), and bench/results/realsize.md is rewritten from every recorded run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from competitor import ROOT, load_json, run_child, save_json, with_load  # bench/ is on the path: these run as scripts
from suite_stats import time_to

from layerwise.resolution import snap

SUITE = ROOT.parent / "shared" / "data" / "suite"
RESULTS = ROOT / "bench" / "results"
VARIANTS = ("auto", "auto+progressive", "auto+fixres", "plain", "fastai")
FIXRES = 5 / 7  # auto+fixres trains at this fraction of the side (160 px for 224) and evaluates at the full side


def run_variant(variant: str, data: Path, args: argparse.Namespace, seed: int) -> dict:
    """One process: its accuracy curve [(seconds, val acc)], wall time and training img/s."""
    common = ["--epochs", str(args.epochs), "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
              "--seed", str(seed)]
    if variant in ("plain", "fastai"):
        script = "bench/plain_loop.py" if variant == "plain" else "bench/fastai_loop.py"
        out, wall, _ = run_child([sys.executable, script, str(data), "--strategy", "full", *common])
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    else:
        run = ROOT / "runs" / "realsize" / data.name / f"{variant}-seed{seed}"
        extra = {"auto+progressive": ["--progressive"],
                 "auto+fixres": ["--train-size", str(snap(args.img_size * FIXRES))]}.get(variant, [])
        _, wall, _ = run_child([sys.executable, "-m", "layerwise", "fit", str(data), "--model", "efficientnet_lite0",
                                "--strategy", "auto", *common, *extra, "--workers", "1", "--quiet", "--out", str(run),
                                "--overwrite"])
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r.get("images_per_second")]
    # equal images per epoch: the run's rate is the harmonic mean of the epochs' rates
    ips = len(trained) / sum(1 / r["images_per_second"] for r in trained) if trained else None
    return {"curve": [[r["elapsed_seconds"], r["val_acc"]] for r in rows], "wall": wall, "images_per_second": ips,
            "sizes": [r.get("train_size") for r in rows if r.get("train_size")]}


def report(results: dict, img: int) -> str:
    lines = [f"# Real image size: {img} px", "",
             "Written by `bench/realsize.py`. EfficientNet-Lite0 (offline TF weights), same epochs, batch, seed and "
             "size for every tool; wall time includes start-up and data set-up; *to fastai best* is the time until "
             "the run first reaches fastai `fine_tune`'s best val accuracy (mean over seeds; layerwise's probe row "
             "counts: best.safetensors holds that model from then on); img/s is training images per second over the "
             "whole run; load is the 1-minute load average before → after. `auto+progressive` ramps the training side "
             "from half to full; `auto+fixres` trains at 5/7 of the side and evaluates at the full side.", ""]
    by_data: dict[str, dict[str, list[dict]]] = {}
    for r in results.values():
        if r["img"] == img:
            by_data.setdefault(r["dataset"], {}).setdefault(r["variant"], []).append(r)
    for name, by_var in sorted(by_data.items()):
        fastai = by_var.get("fastai")
        target = statistics.fmean(max(a for _, a in r["curve"]) for r in fastai) if fastai else None
        fastai_wall = statistics.fmean(r["wall"] for r in fastai) if fastai else None
        r0 = next(iter(by_var.values()))[0]
        lines += [f"## {name}", "", f"{r0['epochs']} epochs at batch {r0['batch']}."
                  + (f" fastai's best: {target:.3f} in {fastai_wall:.0f} s." if target is not None else ""), "",
                  "| variant | seeds | best val acc | final | wall s | to fastai best s | × fastai wall | img/s | train px "
                  "| load |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for v in VARIANTS:
            rs = by_var.get(v)
            if not rs:
                continue
            best = statistics.fmean(max(a for _, a in r["curve"]) for r in rs)
            final = statistics.fmean(r["curve"][-1][1] for r in rs)
            hits = [time_to(r["curve"], target) for r in rs] if target is not None else []
            reach = statistics.fmean(hits) if hits and None not in hits else None
            ratio = f"{reach / fastai_wall:.2f}" if reach is not None and fastai_wall else "-"
            ips = [r["images_per_second"] for r in rs if r["images_per_second"]]
            ips_text = f"{statistics.fmean(ips):.1f}" if ips else "-"
            reach_text = "never" if hits and reach is None else (f"{reach:.0f}" if reach is not None else "-")
            sizes = rs[0]["sizes"]
            px = "→".join(str(s) for s in dict.fromkeys(sizes)) if sizes else str(img)
            load = ", ".join(f"{r['load'][0]:.1f}→{r['load'][1]:.1f}" for r in rs)
            lines.append(f"| {v} | {len(rs)} | {best:.3f} | {final:.3f} | {statistics.fmean(r['wall'] for r in rs):.0f} "
                         f"| {reach_text} | {ratio} | {ips_text} | {px} | {load} |")
        fixed, prog = by_var.get("auto"), by_var.get("auto+progressive")
        if fixed and prog:
            speedup = (statistics.fmean(r["images_per_second"] for r in prog)
                       / statistics.fmean(r["images_per_second"] for r in fixed))
            gap = (statistics.fmean(max(a for _, a in r["curve"]) for r in prog)
                   - statistics.fmean(max(a for _, a in r["curve"]) for r in fixed))
            lines += ["", f"Progressive resizing against a fixed {img} px: ×{speedup:.2f} training img/s, best val acc "
                      f"{gap:+.3f}."]
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="flowers17,caltech101")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--results", default=str(RESULTS / "realsize.json"))
    args = p.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    path = Path(args.results)
    results = load_json(path)
    for name in args.datasets.split(","):
        data = SUITE / name
        if not (data / "train").is_dir():
            raise SystemExit(f"{data} has no train/ folder: the transfer suite is expected in {SUITE}")
        for seed in (int(s) for s in args.seeds.split(",")):
            for v in args.variants.split(","):
                key = f"{name}|{v}|{args.img_size}|{args.epochs}|{seed}"
                if key in results:
                    continue
                rec, load = with_load(run_variant, v, data, args, seed)
                results[key] = rec | {"dataset": name, "variant": v, "img": args.img_size, "epochs": args.epochs,
                                      "batch": args.batch_size, "seed": seed, "load": load}
                best = max(a for _, a in rec["curve"])
                print(f"{name} {v:<18} seed {seed}: best {best:.3f}  {rec['wall']:.0f}s  "
                      f"{rec['images_per_second'] or 0:.1f} img/s", flush=True)
                save_json(path, results)
    (RESULTS / "realsize.md").write_text(report(results, args.img_size))
    print(f"wrote {RESULTS / 'realsize.md'}")


if __name__ == "__main__":
    main()

"""The transfer suite, layerwise's development set: how ``auto`` compares with every fixed strategy.

auto's thresholds were set on these datasets: its results here are in-sample.

Runs, on each dataset of ``../shared/data/suite/`` (six domains), cifar10-mini and the
embedded digits: ``auto``, every fixed strategy (at its default ``--bn`` and at ``--bn eval``),
the plain PyTorch loop and fastai ``fine_tune`` (when fastai is installed: ``pip install -e
'.[bench]'``), all at one image size and with one budget per dataset (the one auto chooses
from the data size; every tool gets the same epochs and batch size). Each run is its own
process, so wall time includes start-up, data set-up and auto's probe.

    .venv/bin/python bench/suite.py --quick               # one seed, 96 px, recommended --bn: < 1 h
    .venv/bin/python bench/suite.py --quick --seeds 0,1   # a second seed of the same, resumed
    .venv/bin/python bench/suite.py --seeds 0,1 --img-size 112   # the full suite, over several sittings
    .venv/bin/python bench/suite.py --test-split --model squeezenet1_1   # another backbone: auto and the fixed
                                                                         # strategies, in suite-test-squeezenet1_1.json

Every finished run is recorded in bench/results/suite.json at once, so an interrupted suite
resumes where it stopped. The report, bench/results/suite.md (suite-quick.md with --quick), is
rewritten from all recorded runs at the suite's image size (``--report-only`` rewrites it
without running anything).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from competitor import ROOT, load_json, run_child, save_json, with_load  # bench/ is on the path: these run as scripts

SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"
# While this file exists the suite starts no new run: other work on the machine (a test run)
# would slow the run in progress and distort its wall time against the competitors'.
PAUSE = RESULTS / "suite.pause"
FIXED = ("head", "lp-ft", "gradual", "discriminative", "full")
# The --bn each strategy does best with (docs/strategies.md): eval wherever groups train late
# or at a low LR on batch statistics, the default for the rest.
RECOMMENDED_BN = {"lp-ft": "eval", "gradual": "eval", "discriminative": "eval"}
DEFAULT_MODEL = "efficientnet_lite0"  # the competitors' scripts load its weights; other backbones run layerwise only
NO_BATCHNORM = {"squeezenet1_1"}  # --bn changes nothing there: its +bn-eval runs would repeat the default ones


def datasets() -> dict[str, Path]:
    """name -> folder with train/ and val/; the digits are written out as PNGs once."""
    out = {p.name: p for p in sorted((SHARED / "suite").iterdir()) if (p / "train").is_dir()}
    if (SHARED / "cifar10-mini" / "train").is_dir():
        out["cifar10-mini"] = SHARED / "cifar10-mini"
    out["digits"] = export_digits(Path(tempfile.gettempdir()) / "layerwise-suite-digits")
    return out


def held_out(name: str, data: Path, root: Path) -> Path:
    """DATA with a test split no choice sees, by a fixed rule: in each class folder of val/, the
    files sorted by the SHA-1 of their name; the first half stays val (every choice: auto's
    evidence, the probe's C, early stopping, the best epoch), the second half becomes test (only
    reported). train/ is unchanged. Written once as a tree of symlinks under ``root``; the
    shared data is never modified."""
    import hashlib

    out = root / name
    if (out / "test").is_dir():
        return out
    for cls in sorted(p for p in (data / "train").iterdir() if p.is_dir()):
        link(cls.iterdir(), out / "train" / cls.name)
    for cls in sorted(p for p in (data / "val").iterdir() if p.is_dir()):
        files = sorted((f for f in cls.iterdir() if f.is_file()), key=lambda f: hashlib.sha1(f.name.encode()).hexdigest())
        half = len(files) // 2
        for part, chunk in (("val", files[:half]), ("test", files[half:])):
            link(chunk, out / part / cls.name)
    return out


def link(files: Iterable[Path], dst: Path) -> None:
    """Symlinks to ``files`` in folder ``dst`` (created), under the same names: a split's class
    folder without copying or touching the shared data."""
    import os

    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        os.symlink(f.resolve(), dst / f.name)


def export_digits(root: Path) -> Path:
    """The embedded digits as class folders, so the competitors can read them too."""
    if (root / "val").is_dir():
        return root
    from PIL import Image

    from layerwise.data import digits

    s = digits()
    for part, items in (("train", s.train), ("val", s.val)):
        for i, (img, label) in enumerate(items):
            d = root / part / s.classes[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def variants(quick: bool, model: str = DEFAULT_MODEL) -> list[str]:
    have_fastai = True
    try:
        import fastai  # noqa: F401
    except ImportError:
        have_fastai = False
    if quick:
        fixed = [s + ("+bn-eval" if RECOMMENDED_BN.get(s) == "eval" else "") for s in FIXED]
    else:
        # head's only trainable group is the linear layer, which has no BatchNorm: its --bn eval
        # run would repeat its default run exactly, so it is not run twice.
        fixed = [v for s in FIXED for v in (s, f"{s}+bn-eval") if v != "head+bn-eval"]
    if model in NO_BATCHNORM:
        fixed = list(dict.fromkeys(v.removesuffix("+bn-eval") for v in fixed))
    competitors = ["plain", *(["fastai", "fastai-lrfind"] if have_fastai else [])] if model == DEFAULT_MODEL else []
    return [*AUTO_VARIANTS, *fixed, *competitors]


# auto as users run it (it races where the 1.5x cost bound affords it: racecost.affordable); the
# threshold rule alone; and a race the suite's small budgets (4-7 epochs) cannot afford at 1.5x,
# to measure what racing itself is worth on held-out data
# auto also scores test with its --tta auto views: training is the same, its record keeps the
# score without them (comparable with runs before the flag) and the views' own under "tta"
AUTO_VARIANTS = {"auto": ["--tta", "auto"], "auto+no-race": ["--no-race"], "auto+race-2.5": ["--race-cost", "2.5"]}


def budget(data: Path) -> tuple[int, int, int | None, str]:
    """epochs, batch size, patience and the reason: auto's rule for this dataset's size."""
    from layerwise.budget import resolve_budget
    from layerwise.config import RunConfig
    from layerwise.data import load_splits

    cfg, why = resolve_budget(RunConfig(strategy="auto"), len(load_splits(str(data)).train))
    return cfg.epochs, cfg.batch_size, cfg.patience, why


def fit_command(data: Path, *, model: str, strategy: str, seed: int, img: int, b: tuple, out: Path,
                extra: Sequence[str] = ()) -> list[str]:
    """The ``layerwise fit`` command of one suite run: the suite's budget ``b`` (from budget()),
    one loader worker, quiet, into ``out``. Every bench script that runs layerwise on the suite
    builds it here, so their runs stay comparable."""
    epochs, batch, patience, _ = b
    cmd = [sys.executable, "-m", "layerwise", "fit", str(data), "--model", model, "--strategy", strategy,
           "--epochs", str(epochs), "--batch-size", str(batch), "--img-size", str(img), "--seed", str(seed),
           "--workers", "1", "--quiet", "--out", str(out), "--overwrite", *extra]
    return cmd + (["--patience", str(patience)] if patience else [])


def run_layerwise(name: str, data: Path, variant: str, seed: int, img: int, b: tuple, model: str = DEFAULT_MODEL) -> dict:
    strategy, _, bn = ("auto", "", "") if variant in AUTO_VARIANTS else variant.partition("+bn-")
    tag = "" if model == DEFAULT_MODEL else f"-{model}"
    run = ROOT / "runs" / "suite" / name / f"{variant}-{img}px-seed{seed}{tag}"
    extra = (["--bn", bn] if bn else []) + AUTO_VARIANTS.get(variant, [])
    _, wall, _ = run_child(fit_command(data, model=model, strategy=strategy, seed=seed, img=img, b=b, out=run, extra=extra))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rec = {"curve": [[r["elapsed_seconds"], r["val_acc"]] for r in rows], "wall": wall}
    if (run / "test.json").is_file():  # the best-on-val weights, scored once on the held-out split
        rec |= test_record(json.loads((run / "test.json").read_text()))
    if (run / "race.json").is_file():  # auto's race: what it ordered, what won
        race = json.loads((run / "race.json").read_text())
        rec["race"] = {k: race[k] for k in ("favourite", "winner", "reason")} | {
            "rungs": {k: v["val_acc"] for k, v in race["rungs"].items()}} | (
            {"probe_guard": race["probe_guard"]} if "probe_guard" in race else {})
    if (run / "soup.json").is_file():  # the soup of the racers: what it kept, its own test score before WiSE-FT
        soup = json.loads((run / "soup.json").read_text())
        rec["soup"] = {"members": soup["members"], "val_acc": soup["val_acc"]}
        if "test" in soup:
            rec["race"]["soup_test"] = test_record(soup["test"])
    if (run / "wise.json").is_file():  # WiSE-FT after the race: the mix kept
        wise = json.loads((run / "wise.json").read_text())
        rec["wise"] = {"alpha": wise["alpha"], "val_acc": wise["val_acc"]}
    winner = run / "race" / rec.get("race", {}).get("winner", "") / "test.json"
    if "race" in rec and winner.is_file():  # the fine-tuned winner alone, for the averaging's own gains
        rec["race"]["winner_test"] = test_record(json.loads(winner.read_text()))
    if (run / "backbone.json").is_file():  # --model auto: each backbone's frozen probe, and the one chosen
        bb = json.loads((run / "backbone.json").read_text())
        rec["backbone"] = {"chosen": bb["chosen"], "probe_val": {c["name"]: c["val_acc"] for c in bb["candidates"]},
                           "gflops": {c["name"]: c["gflops"] for c in bb["candidates"]}, "n_val": bb.get("n_val")}
    probe = run / "probe.json"
    if probe.is_file():
        p = json.loads(probe.read_text())
        rec |= {"probe_acc": next((r["val_acc"] for r in rows if r["epoch"] < 0), p["val_acc"]),
                "chosen": p["strategy"], "skill": p["skill"], "c": p.get("c"), "knn_acc": p.get("knn_acc"),
                "hscore": p.get("hscore"), "bn_shift": p.get("bn_shift")}
    return rec


def run_variant(name: str, data: Path, variant: str, seed: int, img: int, b: tuple, model: str = DEFAULT_MODEL) -> dict:
    """One run of the suite: a competitor's script or a layerwise variant."""
    if variant == "plain":
        return run_competitor("plain_loop.py", data, seed, img, b)
    if variant.startswith("fastai"):  # fastai-lrfind: fine_tune at lr_find()'s valley, as its docs also teach
        return run_competitor("fastai_loop.py", data, seed, img, b, *(["--lr-find"] if variant == "fastai-lrfind" else []))
    return run_layerwise(name, data, variant, seed, img, b, model)


def run_competitor(script: str, data: Path, seed: int, img: int, b: tuple, *extra: str) -> dict:
    epochs, batch, _, _ = b
    out, wall, _ = run_child([sys.executable, f"bench/{script}", str(data), "--strategy", "full", "--epochs",
                              str(epochs), "--img-size", str(img), "--batch-size", str(batch), "--seed", str(seed),
                              *extra])
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    rec = {"curve": [[r["elapsed_seconds"], r["val_acc"]] for r in rows if "epoch" in r], "wall": wall}
    tests = [r for r in rows if "test_acc" in r]
    return rec | (test_record(tests[-1]) if tests else {})


def test_record(result: dict) -> dict:
    """A run's test accuracy and its per-image outcomes as one string of 0/1, in the sorted order
    of the images' class/file names, so runs of any tool pair image for image."""
    plain = result.get("without_views")  # TTA views were used: the record is the score without them
    if plain:
        return _outcome(plain) | {"tta": {"views": result["views"]} | _outcome(result)}
    return _outcome(result)


def _outcome(result: dict) -> dict:
    correct = result.get("correct", {})
    return {"test": result["test_acc"]} | ({"test_correct": "".join(str(correct[k]) for k in sorted(correct))}
                                           if correct else {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed (unless --seeds), 96 px, each strategy at its recommended --bn")
    p.add_argument("--seeds", default=None, help="comma-separated (default: 0 with --quick, else 0,1)")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--datasets", default="", help="comma-separated subset (default: all)")
    p.add_argument("--variants", default="", help="comma-separated subset (default: all of the mode)")
    p.add_argument("--results", default=str(RESULTS / "suite.json"))
    p.add_argument("--model", default=DEFAULT_MODEL, help="the backbone (default efficientnet_lite0, with the competitors; "
                   "another, or auto, runs layerwise's variants only, into their own results file)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the recorded runs; run nothing")
    p.add_argument("--test-split", action="store_true",
                   help="half of each val class held out as test (held_out()); results go to suite-test.json")
    args = p.parse_args()
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    img = min(args.img_size, 96) if args.quick else args.img_size
    tag = "" if args.model == DEFAULT_MODEL else f"-{args.model}"
    if args.test_split and args.results == str(RESULTS / "suite.json"):
        args.results = str(RESULTS / f"suite-test{tag}.json")  # never mixed with the runs that chose on their score
    results_path = Path(args.results)
    results = load_json(results_path)
    chosen = [v for v in variants(args.quick, args.model) if not args.variants or v in args.variants.split(",")]
    for name, data in ({} if args.report_only else datasets()).items():
        if args.datasets and name not in args.datasets.split(","):
            continue
        if args.test_split:
            data = held_out(name, data, ROOT / "runs" / "suite-split")
        b = budget(data)
        print(f"{name}: {b[3]}", flush=True)
        for seed in seeds:
            for v in chosen:
                key = f"{name}|{v}|{img}|{seed}"
                if key in results:
                    continue
                wait_while_paused()
                rec, load = with_load(run_variant, name, data, v, seed, img, b, args.model)
                results[key] = rec | {"dataset": name, "variant": v, "img": img, "seed": seed, "model": args.model,
                                      "epochs": b[0],
                                      "batch": b[1], "best": max(a for _, a in rec["curve"]),
                                      "load": load}
                print(f"  {v:<22} seed {seed}: best {results[key]['best']:.3f}  {rec['wall']:.0f}s", flush=True)
                save_json(results_path, results)
    out = RESULTS / ("suite-quick.md" if args.quick else f"suite-test{tag}.md" if args.test_split else "suite.md")
    if args.test_split:
        from heldout import report as held_out_report

        # --seeds restricts the report to seeds every dataset has finished (the default: all recorded)
        out.write_text(held_out_report(list(results.values()), img, seeds if args.seeds else None, tag[1:] or None))
    else:
        out.write_text(report(results, img))
    print(f"wrote {out}")


def wait_while_paused() -> None:
    if PAUSE.exists():
        print(f"  paused: remove {PAUSE} to go on", flush=True)
    while PAUSE.exists():
        time.sleep(5)


def report(results: dict, img: int) -> str:
    """Per dataset: each variant's best val acc (mean ± std over seeds), wall time, time to
    reach fastai's final accuracy; then mean rank and mean accuracy over the suite."""
    from suite_stats import summary_tables

    path = RESULTS / "evidence.json"
    evidence = json.loads(path.read_text()).get(str(img), {}) if path.is_file() else {}
    return summary_tables([r for r in results.values() if r["img"] == img], img, evidence)


if __name__ == "__main__":
    main()

"""What an epoch of each race candidate costs against one of ``discriminative --bn eval``, the
run ``--race-cost`` is counted in (racecost.EPOCH_COST).

    .venv/bin/python bench/epoch_cost.py --dataset gtsrb --repeats 3

Each candidate is built once by layerwise's own engine (auto's budget for the dataset's held-out
split, 112 px), then their epochs alternate, candidate after candidate, ``--repeats`` rounds: load
on this shared machine then falls on all of them alike, and the ratio of median epoch times holds
where absolute times would not. An epoch is the real one (loader, augmentation, steps, no val
pass); lp-ft is timed in its fine-tuning epochs, the ones its race rung trains. The result is
written to bench/results/epoch-cost.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from competitor import save_json, with_load  # bench/ is on the path: these run as scripts
from suite import RESULTS, budget, datasets, held_out

# the candidates of race.CANDIDATES as RunConfig fields, the reference first
CANDIDATES = {"discriminative-bn-eval": {"strategy": "discriminative", "bn": "eval"}, "full": {"strategy": "full"},
              "lp-ft-bn-eval": {"strategy": "lp-ft", "bn": "eval"}}


def trainers(data: Path, epochs: int, batch: int, root: Path, specs: dict[str, dict]) -> dict:
    """name -> a layerwise Trainer built from RunConfig fields ``specs[name]`` (112 px, seed 0)."""
    from layerwise.config import RunConfig
    from layerwise.engine import build_trainer

    out = {}
    for name, spec in specs.items():
        cfg = RunConfig(**{"data": str(data), "model": "efficientnet_lite0", "epochs": epochs, "batch_size": batch,
                           "img_size": 112, "seed": 0, "workers": 1, "quiet": True, "out": str(root / name)} | spec)
        (root / name).mkdir(parents=True)
        out[name] = build_trainer(cfg, root / name)
    return out


def alternate(ts: dict, repeats: int, *, val: bool = False) -> dict[str, dict[str, list[float]]]:
    """Seconds of each trainer's training epochs (and, with ``val``, its val passes), taken in
    turn, trainer after trainer, ``repeats`` counted rounds after one warm-up round."""
    from layerwise.evaluation import evaluate
    from layerwise.trainer import StopRequested

    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "val": []} for k in ts}
    for r in range(repeats + 1):  # round 0 warms every trainer up and is not counted
        for name, t in ts.items():
            t.apply_plan(1)  # lp-ft's fine-tuning epochs; every group trains in each candidate
            start = time.perf_counter()
            with StopRequested(install=False) as stop:
                t.train_epoch(1, stop)
            lap = time.perf_counter()
            if val:
                evaluate(t.kit.eval_model(), t.kit.loaders.val, t.kit.amp, t.kit.device, channels_last=t.cfg.channels_last)
            if r:
                times[name]["train"].append(lap - start)
                times[name]["val"].append(time.perf_counter() - lap)
    return times


def command_line(doc: str) -> tuple[argparse.Namespace, Path, int, int]:
    """--dataset and --repeats, the dataset's held-out split, and auto's epochs and batch for it."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="gtsrb")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    data = held_out(args.dataset, datasets()[args.dataset], Path(tempfile.gettempdir()) / "layerwise-heldout")
    epochs, batch, _, _ = budget(data)
    return args, data, epochs, batch


def main() -> None:
    args, data, epochs, batch = command_line(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        laps, load = with_load(lambda: alternate(trainers(data, epochs, batch, Path(tmp), CANDIDATES), args.repeats))
    times = {k: v["train"] for k, v in laps.items()}
    ref = statistics.median(times["discriminative-bn-eval"])
    result = {"dataset": args.dataset, "epochs": epochs, "batch": batch, "img": 112, "load": load,
              "seconds": times, "ratio": {k: statistics.median(v) / ref for k, v in times.items()}}
    save_json(RESULTS / "epoch-cost.json", result)
    lines = ["# An epoch of each race candidate", "",
             f"`bench/epoch_cost.py --dataset {args.dataset} --repeats {args.repeats}`: {args.dataset}'s held-out split, "
             f"Lite0, 112 px, batch {batch}, epochs alternating candidate after candidate (load average "
             f"{load[0]:.1f} to {load[1]:.1f}). Median epoch time against `discriminative --bn eval`'s.", "",
             "| candidate | epoch seconds | median | against discriminative --bn eval |", "|---|---|---:|---:|"]
    for k, v in times.items():
        lines.append(f"| {k} | {' / '.join(f'{s:.1f}' for s in v)} | {statistics.median(v):.1f} | "
                     f"{result['ratio'][k]:.2f}x |")
    (RESULTS / "epoch-cost.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(result["ratio"], indent=1))


if __name__ == "__main__":
    main()

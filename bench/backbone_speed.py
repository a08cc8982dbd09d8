"""Training and inference images per second of each offline backbone, in one process.

    .venv/bin/python bench/backbone_speed.py --dataset gtsrb --repeats 3

Each backbone is built by layerwise's own engine as a ``full`` fine-tune (every group trains) on
the dataset's held-out split at 112 px, the suite's size, with auto's batch for it; then the
backbones take turns, one training epoch (loader, augmentation, steps) and one val pass each,
``--repeats`` counted rounds after a warm-up round. Load on this shared machine falls on all of
them alike, so the ratios against Lite0 hold where the absolute rates would not (with four
models and their loaders in one process the rates come out lower than a ``fit``'s own: Lite0's
epochs on gtsrb's split took 10-12 s in a fit, 20 s here). Writes
bench/results/backbone-speed.json and .md; the README's backbone table reads them.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from competitor import save_json, with_load  # bench/ is on the path: these run as scripts
from epoch_cost import alternate, command_line, trainers
from suite import RESULTS

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "squeezenet1_1")
PATH = RESULTS / "backbone-speed.json"


def rates(laps: dict[str, dict[str, list[float]]], n_train: int, n_val: int) -> dict[str, dict[str, float]]:
    """Median images per second, training and inference, per backbone."""
    return {k: {"train": n_train / statistics.median(v["train"]), "infer": n_val / statistics.median(v["val"])}
            for k, v in laps.items()}


def table(result: dict) -> str:
    ref = result["rates"][BACKBONES[0]]
    lines = [f"# Backbones' speed ({result['dataset']}'s held-out split, 112 px)", "",
             f"`bench/backbone_speed.py --dataset {result['dataset']} --repeats {result['repeats']}`: each backbone as a "
             f"`full` fine-tune, batch {result['batch']}, one loader worker, epochs and val passes taken in turn "
             f"(load average {result['load'][0]:.1f} to {result['load'][1]:.1f}). Median images per second; read the "
             f"ratios: with four models in one process the absolute rates are below a fit's own.", "",
             "| backbone | GFLOPs / image | train img/s | × Lite0 | inference img/s | × Lite0 |",
             "|---|---:|---:|---:|---:|---:|"]
    for k, r in result["rates"].items():
        lines.append(f"| {k} | {result['gflops'][k]:.3f} | {r['train']:.0f} | {r['train'] / ref['train']:.2f} | "
                     f"{r['infer']:.0f} | {r['infer'] / ref['infer']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from layerwise.backbones import forward_gflops

    args, data, epochs, batch = command_line(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        ts = trainers(data, epochs, batch, Path(tmp), {k: {"model": k, "strategy": "full"} for k in BACKBONES})
        laps, load = with_load(alternate, ts, args.repeats, val=True)
        some = next(iter(ts.values()))
        n_train, n_val = len(some.kit.loaders.train.dataset), len(some.kit.loaders.val.dataset)
        gflops = {k: forward_gflops(t.kit.model, 112) for k, t in ts.items()}
    result = {"dataset": args.dataset, "repeats": args.repeats, "batch": batch, "img": 112, "load": load,
              "n_train": n_train, "n_val": n_val, "seconds": laps, "gflops": gflops, "rates": rates(laps, n_train, n_val)}
    save_json(PATH, result)
    (RESULTS / "backbone-speed.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()

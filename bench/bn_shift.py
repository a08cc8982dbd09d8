"""The BatchNorm shift of every transfer-suite dataset at several image sizes: the evidence
behind auto's far-data threshold (layerwise.strategies.AUTO_FAR), measured the way the probe
measures it (the training images, at most 2,000, through the eval transform, frozen model).

    .venv/bin/python bench/bn_shift.py --sizes 96,112,128,224 --suite-size 112

Writes bench/results/bn_shift.md: per dataset and size, the shift, the side of the threshold
it falls on, and which of full and discriminative+bn-eval won that dataset in the suite run at
--suite-size (bench/results/suite.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from competitor import ROOT
from suite import datasets

RESULTS = ROOT / "bench" / "results"


def shift_of(data: Path, img_size: int) -> float | None:
    from layerwise.config import RunConfig
    from layerwise.engine import prepare
    from layerwise.loaders import with_eval_transform
    from layerwise.probe import PROBE_MAX_IMAGES, probe_loaders
    from layerwise.shift import measure_bn_shift

    cfg = RunConfig(data=str(data), model="efficientnet_lite0", strategy="full", img_size=img_size, epochs=4,
                    batch_size=32, workers=1, quiet=True, precision="fp32", channels_last=False)
    p = prepare(cfg)
    model, loaded = p.model.loaded.model, p.model.loaded
    ds = with_eval_transform(p.loaders.train.dataset, img_size, loaded.mean, loaded.std)
    train, _ = probe_loaders(ds, ds, batch_size=32, workers=1, seed=0, max_images=PROBE_MAX_IMAGES)
    model.eval()
    with torch.no_grad(), measure_bn_shift(model) as meter:
        for x, _ in train:
            model(x)
    return meter.value()


def winners(img: int) -> dict[str, str]:
    """From the suite's records at ``img`` px: full or discriminative+bn-eval, whichever scored
    higher (mean over seeds)."""
    path = RESULTS / "suite.json"
    if not path.is_file():
        return {}
    acc: dict[tuple[str, str], list[float]] = {}
    for r in json.loads(path.read_text()).values():
        if r["img"] != img:
            continue  # suite.json holds every size the suite ran at
        acc.setdefault((r["dataset"], r["variant"]), []).append(r["best"])
    out = {}
    for d in {d for d, _ in acc}:
        f, e = acc.get((d, "full")), acc.get((d, "discriminative+bn-eval"))
        if f and e:
            mf, me = sum(f) / len(f), sum(e) / len(e)
            out[d] = f"full {mf:.3f} vs {me:.3f}" if mf >= me else f"disc+bn-eval {me:.3f} vs {mf:.3f}"
    return out


def main() -> None:
    from layerwise.strategies import AUTO_FAR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="96,112,128,224")
    p.add_argument("--suite-size", type=int, default=112, help="the suite run whose winners are shown")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    table = {}
    for name, data in datasets().items():
        table[name] = {s: shift_of(data, s) for s in sizes}
        print(name, {s: round(v, 3) for s, v in table[name].items() if v is not None}, flush=True)
    won = winners(args.suite_size)
    lines = ["# BatchNorm shift of the transfer suite", "",
             "Written by `bench/bn_shift.py`: EfficientNet-Lite0 (offline TF weights), the training images (at most "
             "2,000) through the eval transform. The shift is the mean over BatchNorm layers of the mean over channels "
             "of |batch mean − running mean| in running standard deviations (`layerwise/shift.py`). auto trains every "
             f"group on batch statistics (`full`) at a shift ≥ {AUTO_FAR}. *Winner* is the better of `full` and "
             f"`discriminative+bn-eval` in the suite at {args.suite_size} px (`bench/results/suite.json`).", "",
             "| dataset | " + " | ".join(f"{s} px" for s in sizes) + f" | winner at {args.suite_size} px |",
             "|---|" + "---:|" * len(sizes) + "---|"]
    for name in sorted(table, key=lambda n: table[n][sizes[0]] or 0):
        cells = [f"{v:.3f}{' (far)' if v is not None and v >= AUTO_FAR else ''}" if v is not None else "-"
                 for v in table[name].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {won.get(name, '-')} |")
    (RESULTS / "bn_shift.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'bn_shift.md'}")


if __name__ == "__main__":
    sys.exit(main())

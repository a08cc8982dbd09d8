"""auto's evidence for every transfer-suite dataset, measured as auto's probe measures it:
the linear probe's skill on the head's input, the same probe on the stage before the last
(Head2Toe-style), the BatchNorm shift, 10-NN accuracy and the H-score.

    .venv/bin/python bench/evidence.py --img-size 96     # then bench/suite.py --report-only --quick rewrites suite-quick.md with it

Writes bench/results/evidence.json ({img size: {dataset: evidence}}); bench/suite.py's report
runs the leave-one-dataset-out threshold choice on each piece of evidence, including
``depth_gain`` (the earlier depth's skill minus the last's: does the last stage fit the data
worse than the one before it?).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from competitor import ROOT, load_json
from suite import datasets

RESULTS = ROOT / "bench" / "results"


def evidence_of(data: Path, img_size: int) -> dict:
    from layerwise.config import RunConfig
    from layerwise.engine import prepare
    from layerwise.evidence import ProbeInputs, run_probe
    from layerwise.loaders import with_eval_transform

    cfg = RunConfig(data=str(data), model="efficientnet_lite0", strategy="auto", img_size=img_size, epochs=4,
                    batch_size=32, workers=1, quiet=True, precision="fp32", channels_last=False)
    p = prepare(cfg)
    c, loaded = p.resolved.config, p.model.loaded
    data = ProbeInputs(with_eval_transform(p.loaders.train.dataset, c.img_size, loaded.mean, loaded.std),
                       p.loaders.val.dataset, c.batch_size, p.loaders.train.num_workers, c.seed)
    res, earlier = run_probe(loaded.model, p.model.groups, data, p.device, p.amp, channels_last=c.channels_last,
                             quiet=True, earlier_depth_too=True)
    return {"skill": res.skill, "earlier_skill": res.earlier_skill, "earlier_group": earlier and earlier[0],
            "depth_gain": None if res.earlier_skill is None else res.earlier_skill - res.skill,
            "bn_shift": res.bn_shift, "knn_acc": res.knn_acc, "hscore": res.hscore, "seconds": res.seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--datasets", default="", help="comma-separated subset (default: all)")
    args = p.parse_args()
    path = RESULTS / "evidence.json"
    table = load_json(path)
    at = table.setdefault(str(args.img_size), {})
    for name, data in datasets().items():
        if args.datasets and name not in args.datasets.split(","):
            continue
        at[name] = evidence_of(data, args.img_size)
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in at[name].items()}, flush=True)
        path.write_text(json.dumps(table, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

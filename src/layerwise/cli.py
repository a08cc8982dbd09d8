"""``layerwise`` command line: fit | plan | evaluate | predict | export | models.

Every flag defaults to "unset", so a ``--config`` file supplies what the flags do not.
User errors exit with code 2 and a one-paragraph message, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from layerwise.cli_args import (
    S,
    add_model_args,
    add_size_args,
    add_strategy_args,
    add_training_args,
    budget,
    csv_list,
    int_in,
    positive_float,
    strategy_list,
)
from layerwise.errors import LayerwiseError

if TYPE_CHECKING:
    from pathlib import Path

    from layerwise.config import RunConfig

def _config_from(args: argparse.Namespace, skip: Sequence[str] = ()) -> "RunConfig":
    from layerwise.choices import config_from
    from layerwise.config import RunConfig

    values = vars(args).copy()
    for k in ("command", "func", "config", "json", "num_classes", "images_per_class", "argv", "nproc", *skip):
        values.pop(k, None)
    base = _config_file(args.config) if getattr(args, "config", None) else RunConfig()
    return config_from(values, base)


def _config_file(path: str) -> "RunConfig":
    """A ``--config`` file's settings, without another run's own state: its probe head and
    resumes, and what came with that head: the evidence (the probe runs again on this data)
    and lp-ft's zero head-only epochs (the head was its probing stage: without it, lp-ft probes
    for its own epochs again)."""
    from layerwise.choices import config_from
    from layerwise.config import load_yaml

    values = load_yaml(path)
    dropped = [k for k in ("probe_head", "resumed") if values.get(k)]
    if values.get("probe_head"):
        dropped += [k for k in ("probe_skill", "bn_shift") if values.get(k) is not None]
        dropped += ["probe_epochs"] * (values.get("probe_epochs") == 0)
    if dropped:
        print(f"--config {path}: not carried over from that run: {', '.join(dropped)} (measured again here)")
    return config_from({k: v for k, v in values.items() if k not in dropped})


# --- commands -----------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    from layerwise.setup import plan_only

    r = plan_only(_config_from(args), args.num_classes, images_per_class=args.images_per_class)
    if r.budget and not args.json:
        print(r.budget)
    print(json.dumps(r.plan.to_dict(), indent=2) if args.json else r.plan.table())
    return 0


def _without_nproc(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cmd_fit(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc < 1:
        raise LayerwiseError(f"--nproc must be >= 1, got {nproc}")
    if nproc and nproc > 1 and "WORLD_SIZE" not in os.environ:
        from layerwise.distributed import launch

        return launch(nproc, _without_nproc(args.argv))

    from layerwise.engine import Interrupted
    from layerwise.race import fit

    resume = getattr(args, "resume", None)
    if resume and args.overwrite:
        raise LayerwiseError("--resume continues a run and --overwrite replaces it; give one of them")
    cfg = _resume_config(args, Path(resume)) if resume else _config_from(args, skip=("resume", "overwrite"))
    try:
        fit(cfg, resume=bool(resume), overwrite=args.overwrite)
    except Interrupted:
        return 130
    return 0


def _resume_config(args: argparse.Namespace, run: Path) -> "RunConfig":
    """The run's saved config with the flags a resume may change; any other flag that
    would change the run is refused rather than silently ignored."""
    from pathlib import Path

    from layerwise import rundir
    from layerwise.choices import config_from as from_mapping
    from layerwise.config import KEYS, load_yaml
    from layerwise.engine import RESUME_OVERRIDABLE

    config = rundir.RunDir(run).config
    if not config.is_file():
        raise LayerwiseError(f"{str(run)!r} is not a run folder (no {config.name}); pass the --out of a started fit")
    saved = from_mapping(load_yaml(config))
    if getattr(args, "config", None):
        raise LayerwiseError(f"--resume {run} continues with the run's own config.yaml; --config cannot change it. "
                             "Start a new run with --config and another --out")
    out = getattr(args, "out", None)
    if out is not None and Path(out).resolve() != run.resolve():
        raise LayerwiseError(f"--resume {run} continues the run in its own folder; --out {out} cannot move it. "
                             "Copy the folder first, then resume the copy")
    given = {k: v for k, v in vars(args).items() if k in KEYS and k != "out"}
    fixed = {k: v for k, v in given.items() if k not in RESUME_OVERRIDABLE and getattr(saved, k) != v}
    if fixed:
        raise LayerwiseError(
            f"--resume {run}: cannot change {', '.join(f'{k} ({getattr(saved, k)!r} -> {v!r})' for k, v in fixed.items())} "
            f"of a started run; a resume may change only {', '.join(RESUME_OVERRIDABLE)}. Start a new run with "
            "another --out (or --overwrite) to change the rest")
    if given.get("lr") == "auto":
        raise LayerwiseError("--lr auto runs the LR range test before training; on --resume give a number")
    return from_mapping({k: v for k, v in given.items() if k in RESUME_OVERRIDABLE} | {"out": str(run)}, saved)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from layerwise.inference import evaluate_run

    r = evaluate_run(args.run, args.data, views=args.tta, batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    tta = f" with TTA {', '.join(r['tta'])}" if r["tta"] else ""
    print(f"scored {r['scored']}: {r['images']} images{tta}: accuracy {r['accuracy']:.4f} · loss {r['loss']:.4f}")
    if r["skipped"]:
        print(f"skipped {len(r['skipped'])} unreadable image(s): "
              + "; ".join(f"{s['path']} ({s['reason']})" for s in r["skipped"][:10]))
    width = max(len(c) for c in r["classes"])
    for c, a in r["per_class_accuracy"].items():
        print(f"  {c:<{width}}  {a:.4f}  ({r['class_counts'][c]} images)")
    print("confusion (rows: true, columns: predicted):")
    for c, row in zip(r["classes"], r["confusion"]):
        print(f"  {c:<{width}}  " + " ".join(f"{v:>4}" for v in row))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Each prediction printed as it is made; unreadable files listed after, on stderr.
    Exit 0 when some image was read, 2 when none could be."""
    from layerwise.inference import iter_predictions

    done, skipped = [], []
    for r in iter_predictions(args.run, args.images, views=args.tta, topk=args.topk):
        if "error" in r:
            skipped.append(r)
            continue
        done.append(r)
        if not args.json:
            print(r["image"] + ": " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"]), flush=True)
    if args.json:
        print(json.dumps(done + skipped, indent=2))
    for r in skipped:
        print(f"skipped {r['image']}: {r['error']}", file=sys.stderr)
    if not done:
        raise LayerwiseError(f"no image could be read ({len(skipped)} skipped); pass image files (jpg, png, ...)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from layerwise.inference import export_run

    e = export_run(args.run, args.format, args.output)
    print(f"wrote {e.path} ({e.exporter})")
    if e.max_abs_diff is None:
        print("parity not checked: pip install onnxruntime to run the file against PyTorch")
    else:
        print(f"parity: max |logit difference| against PyTorch {e.max_abs_diff:.2e} on {e.images} random images "
              "(batch sizes 1 and 3)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from layerwise.compare import best_acc_text, compare
    from layerwise.rundir import CompareDir

    cfg = _config_from(args, skip=("strategies", "repeats", "budget", "resume", "overwrite", "soup"))
    if not cfg.out:
        raise LayerwiseError("compare needs --out CMP, the folder that holds one run per strategy")
    if args.budget:
        cfg = dataclasses.replace(cfg, time_budget=args.budget)
    summary = compare(cfg, args.strategies, Path(cfg.out), repeats=args.repeats, overwrite=args.overwrite,
                      soup=args.soup)
    rec = summary["recommendation"]
    for r in summary["strategies"]:
        print(f"  {r['strategy']:<15} best val acc {best_acc_text(r)}  {r['wall_seconds']:.0f}s")
    if "soup" in summary:
        s = summary["soup"]
        print(f"  soup of {len(s['members'])} run(s): val acc {s['val_acc']:.3f} (fp32), in "
              f"{CompareDir(Path(cfg.out)).soup}")
    print(f"recommendation: {rec['strategy']} — {rec['reason']}\nsummary: {CompareDir(Path(cfg.out)).summary_md}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from pathlib import Path

    from layerwise.engine import find_lr

    cfg = _config_from(args, skip=("start", "end", "steps"))
    out = Path(cfg.out or "runs/lr-find")
    res, mults = find_lr(cfg, out, start=args.start, end=args.end, steps=args.steps)
    print(f"suggested base lr {res.suggestion:.2e}: {res.reason}")
    print("per-group LRs at that base: " + ", ".join(f"{g} {res.suggestion * m:.1e}" for g, m in mults.items()))
    print(f"plot: {out / 'lr_find.png'}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from layerwise.catalog import KNOWN_MODELS, describe

    names = args.names or KNOWN_MODELS
    for name in names:
        print(describe(name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from layerwise.config import MAX_BATCH_SIZE, MAX_CLASSES
    from layerwise.strategies import STRATEGIES

    p = argparse.ArgumentParser(
        prog="layerwise",
        description="Fine-tune pretrained image classifiers with per-layer control. "
        f"Strategies: {', '.join(STRATEGIES)}.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    pl = sub.add_parser("plan", help="print which groups train, when, at which LR and weight decay")
    add_model_args(pl)
    add_strategy_args(pl)
    add_size_args(pl)
    pl.add_argument("--num-classes", dest="num_classes", type=int_in(1, MAX_CLASSES), default=10)
    pl.add_argument("--images-per-class", dest="images_per_class", type=positive_float, default=None,
                    help="dataset size, for --strategy auto")
    pl.add_argument("--config", default=None, help="YAML config; flags override it")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (the documented contract)")
    pl.set_defaults(func=cmd_plan)

    fi = sub.add_parser("fit", help="fine-tune on a folder of images (no DATA: the embedded digits demo)")
    fi.add_argument("data", nargs="?", default=S, help="folder with train/ and val/, folder of class folders, "
                    "or CSV of path,label")
    add_model_args(fi)
    add_strategy_args(fi)
    add_training_args(fi)
    fi.add_argument("--config", default=None, help="YAML config (e.g. a run's config.yaml); flags override it")
    fi.add_argument("--resume", default=None, metavar="RUN", help="continue RUN from its last checkpoint (may "
                    "change --epochs --lr --clip-grad --precision --nan --patience --checkpoint-every)")
    fi.add_argument("--overwrite", action="store_true", help="replace the run already in --out (else refused)")
    fi.add_argument("--nproc", type=int, default=None, help="processes on this node: starts torchrun for you "
                    "(DDP; --batch-size is per process). For several nodes run torchrun -m layerwise fit ...")
    fi.set_defaults(func=cmd_fit)

    from layerwise.inference import EXPORT_FORMATS
    from layerwise.tta import VIEWS

    tta_help = (f"comma-separated TTA views: {', '.join(VIEWS)} (default: the run's own, as its fit's --tta "
                "resolved them; identity: none)")
    ev = sub.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix of a run on DATA")
    ev.add_argument("run", help="run folder")
    ev.add_argument("data", help="folder of class folders (as is), dataset root (its test/, else val/), or CSV")
    ev.add_argument("--tta", type=csv_list, default=None, help=tta_help)
    ev.add_argument("--batch-size", dest="batch_size", type=int_in(1, MAX_BATCH_SIZE), default=None,
                    help="images per batch (default: 64, fewer at large image sizes)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="top-k classes with probabilities for image files")
    pr.add_argument("run", help="run folder")
    pr.add_argument("images", nargs="+", help="image files")
    pr.add_argument("--tta", type=csv_list, default=None, help=tta_help)
    pr.add_argument("--topk", type=int_in(1, MAX_CLASSES), default=3, help="classes to list per image (3)")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="write the run's best model as ONNX or TorchScript")
    ex.add_argument("run", help="run folder")
    ex.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    ex.add_argument("--output", default=None, help="file to write (default: inside the run folder)")
    ex.set_defaults(func=cmd_export)

    from layerwise.compare import DEFAULT_STRATEGIES

    co = sub.add_parser("compare", help="run several strategies on the same data and budget; recommend one")
    co.add_argument("data", nargs="?", default=S, help="as for fit (no DATA: the embedded digits)")
    co.add_argument("--strategies", type=strategy_list, default=list(DEFAULT_STRATEGIES),
                    help=f"comma-separated, from: {', '.join(STRATEGIES)} (default {','.join(DEFAULT_STRATEGIES)})")
    co.add_argument("--repeats", type=int, default=1, help="seeds per strategy, for mean ± std")
    co.add_argument("--soup", action="store_true", help="also average the runs' weights into a greedy soup "
                    "(kept only where it helps on val), written to CMP/soup/ as a run folder")
    co.add_argument("--budget", type=budget, default=None, help="time:SECONDS per run instead of equal epochs "
                    "(--epochs is then the maximum)")
    add_model_args(co)
    add_strategy_args(co, name=False)
    add_training_args(co)
    co.add_argument("--config", default=None, help="YAML config; flags override it")
    co.add_argument("--overwrite", action="store_true", help="redo runs in --out that were made with other data or "
                    "settings (else refused)")
    co.set_defaults(func=cmd_compare)

    lf = sub.add_parser("lr-find", help="LR range test with the strategy's per-group multipliers fixed")
    lf.add_argument("data", nargs="?", default=S, help="as for fit (no DATA: the embedded digits)")
    add_model_args(lf)
    add_strategy_args(lf)
    add_training_args(lf)
    lf.add_argument("--start", type=float, default=1e-7)
    lf.add_argument("--end", type=float, default=1.0)
    lf.add_argument("--steps", type=int, default=100)
    lf.add_argument("--config", default=None)
    lf.set_defaults(func=cmd_lr_find)

    mo = sub.add_parser("models", help="known architectures, their layer groups and offline weights")
    mo.add_argument("names", nargs="*", help="model names (default: a representative list)")
    mo.set_defaults(func=cmd_models)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except LayerwiseError as e:
        print(f"layerwise {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"layerwise {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `layerwise models | head`: the reader left, nothing is wrong
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The command line's flags: their groups, parsers and help, shared by fit, plan, compare and
lr-find. Every flag defaults to "unset" (``SUPPRESS``), so a ``--config`` file supplies what
the flags do not, and a resume can tell which flags were given."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

S = argparse.SUPPRESS


def kv_map(cast: Callable[[str], Any]) -> Callable[[str], dict]:
    def parse(text: str) -> dict:
        out = {}
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"expected key=value pairs separated by commas, got {item!r}")
            try:
                out[key.strip()] = cast(value.strip())
            except ValueError as e:
                raise argparse.ArgumentTypeError(f"bad value in {item!r}: {e}") from e
        return out

    return parse


def schedule(text: str) -> dict[int, str]:
    """``0:fc,2:layer4`` -> {0: 'fc', 2: 'layer4'} (the tutorial's gradual schedule)."""
    out = {}
    for item in filter(None, text.split(",")):
        epoch, sep, group = item.partition(":")
        if not sep or not epoch.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected epoch:group pairs like 0:head,2:layer4, got {item!r}")
        out[int(epoch)] = group.strip()
    return out


def lr_value(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from e


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type for an integer flag that must lie in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from e
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer from {lo} to {hi}, got {v}")
        return v

    return parse


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_model_args(p: argparse.ArgumentParser) -> None:
    from layerwise.models import HEADS

    g = p.add_argument_group("model")
    g.add_argument("--model", default=S, help="torchvision or timm name; timm/NAME or torchvision/NAME forces one "
                   "(default efficientnet_lite0, offline ImageNet weights)")
    g.add_argument("--weights", default=S, help="default | none | torchvision weights name (IMAGENET1K_V2) | "
                   "timm tag | path to .pth/.safetensors")
    g.add_argument("--head", choices=HEADS, default=S, help="new classifier: linear, or the tutorial's dropout MLP")
    g.add_argument("--hidden", type=int, default=S, help="MLP head width (512)")
    g.add_argument("--groups", type=kv_map(str), default=S, metavar="NAME=PATTERN,...",
                   help="your own grouping: group name -> module path or regex, stem first")


PARSERS: dict[str, Callable[[str], Any]] = {"schedule": schedule, "group_floats": kv_map(float)}


def add_knob_args(g: Any) -> None:
    """A flag per strategy knob, made from its declaration in RunConfig (config.knob), with
    the strategy's default in the help."""
    import typing

    from layerwise.config import RunConfig, knobs
    from layerwise.strategies import StrategyOptions

    hints = typing.get_type_hints(RunConfig)
    for f in knobs():
        parse = f.metadata["parse"]
        kind = PARSERS[parse] if parse else next(a for a in typing.get_args(hints[f.name]) if a is not type(None))
        default = getattr(StrategyOptions, f.name, None)
        g.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=S, metavar=f.metadata["metavar"],
                       help=f.metadata["knob"] + (f" ({default})" if default is not None else ""))


def add_strategy_args(p: argparse.ArgumentParser, *, name: bool = True) -> None:
    from layerwise.freeze import BN_MODES
    from layerwise.strategies import STRATEGIES

    g = p.add_argument_group("strategy")
    if name:
        g.add_argument("--strategy", choices=list(STRATEGIES), default=S, help="default auto")
    g.add_argument("--epochs", type=int, default=S, help="default 4")
    g.add_argument("--lr", type=lr_value, default=S, help="base LR: the head's (default 1e-3); auto: LR range test")
    add_knob_args(g)
    g.add_argument("--layer-decay", dest="layer_decay", type=float, default=S,
                   help="timm-style layer-wise LR decay over blocks (e.g. 0.75)")
    g.add_argument("--reg", default=S, metavar="NAME:STRENGTH",
                   help="a pull towards the pretrained model added to the loss: l2sp:ALPHA (L2-SP, Li et al. 2018: "
                   "towards its weights), lwf:LAMBDA (LwF, Li & Hoiem 2016: towards its ImageNet outputs) or "
                   "cotune:LAMBDA (Co-Tuning, You et al. 2020: its ImageNet classifier also learns your classes' "
                   "ImageNet relationship)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=S, help="default 1e-4; norms/biases exempt")
    g.add_argument("--bn", choices=BN_MODES, default=S,
                   help="BatchNorm statistics: frozen (frozen groups keep them; default, auto: eval), adapt "
                   "(re-estimate on your data first), eval (every group keeps them), train (frozen groups update them)")
    g.add_argument("--no-probe", dest="probe", action="store_false", default=S,
                   help="auto: choose from the images per class alone, without the linear probe")
    g.add_argument("--no-race", dest="race", action="store_false", default=S,
                   help="auto: train the strategy the probe's thresholds pick, without racing the candidates")
    g.add_argument("--race-cost", dest="race_cost", type=float, default=S, metavar="X",
                   help="auto: the most its whole run may cost, probe and averaging included, in runs of one fixed "
                   "strategy at the same budget (default 1.5); more lets more candidates race, then WiSE-FT and the soup")
    g.add_argument("--no-wise", dest="wise", action="store_false", default=S,
                   help="auto's race: keep the winner as trained, without WiSE-FT's weight-space mix with the probe")
    g.add_argument("--no-soup", dest="soup", action="store_false", default=S,
                   help="auto's race: keep the winner as trained, without averaging the losers' rung weights into it")
    g.add_argument("--probe-skill", dest="probe_skill", type=float, default=S,
                   help="auto: the linear probe's skill (0 = majority guess, 1 = perfect) if already known; "
                   "skips the probe")
    g.add_argument("--bn-shift", dest="bn_shift", type=float, default=S,
                   help="auto, with --probe-skill: the data's BatchNorm statistics shift if already known "
                   "(probe.json's bn_shift; above 0.3 auto trains every group on batch statistics)")


def add_size_args(p: argparse.ArgumentParser) -> None:
    """Image sides: evaluation, training, and progressive resizing (plan shows them too)."""
    g = p.add_argument_group("image size")
    g.add_argument("--img-size", dest="img_size", type=int, default=S,
                   help="the side images are evaluated at (default: the model's pretrained size)")
    g.add_argument("--train-size", dest="train_size", type=int, default=S,
                   help="the side training crops end at (default: --img-size); lower trains faster and, with "
                   "random-resized crops, often tests better at --img-size (FixRes)")
    g.add_argument("--progressive", action="store_true", default=S,
                   help="progressive resizing: early epochs train at lower sides, ramping up to --train-size")
    g.add_argument("--progressive-from", dest="progressive_from", type=int, default=S,
                   help="the first epoch's side with --progressive (default: half the final one)")


def add_training_args(p: argparse.ArgumentParser) -> None:
    from layerwise.augment import PRESETS
    from layerwise.cache import CACHE_MODES
    from layerwise.config import CHECK_DATA, DEVICES, NAN_POLICIES, PRECISIONS
    from layerwise.features import FEATURE_CACHE_MODES
    from layerwise.optim import OPTIMIZERS, SCHEDULES
    from layerwise.tta import VIEWS

    add_size_args(p)
    g = p.add_argument_group("training")
    g.add_argument("--out", default=S, help="run folder (default runs/<timestamp>)")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=S, help="per process (default 64)")
    g.add_argument("--augment", choices=list(PRESETS), default=S, help="default light")
    g.add_argument("--precision", choices=PRECISIONS, default=S, help="auto (default): bf16 where the CPU/GPU has fast bf16 units, else fp32")
    g.add_argument("--device", default=S, help=f"{' | '.join(DEVICES)} | cuda:N (default auto)")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--val-split", dest="val_split", type=float, default=S, help="when DATA has no val/ (0.2)")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS), default=S, help="default adamw")
    g.add_argument("--scheduler", choices=list(SCHEDULES), default=S, help="default cosine (per step)")
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, default=S)
    g.add_argument("--t0", type=int, default=S, help="cosine-restarts: first period in epochs (5)")
    g.add_argument("--t-mult", dest="t_mult", type=int, default=S, help="cosine-restarts: period growth (2)")
    g.add_argument("--label-smoothing", dest="label_smoothing", type=float, default=S)
    g.add_argument("--clip-grad", dest="clip_grad", type=float, default=S, help="max gradient norm")
    g.add_argument("--ema", type=float, default=S, help="EMA decay of weights, e.g. 0.999 (off by default)")
    g.add_argument("--mixup", type=float, default=S, help="MixUp alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=S, help="CutMix alpha (0: off)")
    g.add_argument("--patience", type=int, default=S, help="early stopping: epochs without val-acc gain")
    g.add_argument("--workers", type=int, default=S, help="DataLoader workers (default: cores - 1, at most 4, for decoding; none during "
                   "the epochs when a CPU run trains from images decoded in RAM)")
    g.add_argument("--channels-last", dest="channels_last", action="store_true", default=S,
                   help="NHWC memory format (default: measured against NCHW when --precision is auto)")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=S)
    g.add_argument("--tta", type=csv_list, default=S, help=f"views for the final evaluation (val, test): {', '.join(VIEWS)}; or auto: the views "
                   "the --augment preset trains for (hflip,multi-scale; none with --augment none)")
    g.add_argument("--check-data", dest="check_data", choices=CHECK_DATA, default=S,
                   help="decode every image once before training and skip unreadable ones (auto: under 50k images)")
    g.add_argument("--cache", choices=CACHE_MODES, default=S,
                   help="decode and resize every image once: into RAM (auto: when it fits in a quarter of it) or "
                   "a memory-mapped file reused by later runs over the same files")
    g.add_argument("--cache-dir", dest="cache_dir", default=S, help="where --cache disk keeps its files "
                   "(default ~/.cache/layerwise)")
    g.add_argument("--feature-cache", dest="feature_cache", choices=FEATURE_CACHE_MODES, default=S,
                   help="while only the head trains, run the frozen rest once and train on its output (auto)")
    g.add_argument("--feature-cache-views", dest="feature_cache_views", type=int, default=S,
                   help="with random augmentation: K augmented views cached per image (0: no cache)")
    g.add_argument("--nan", choices=NAN_POLICIES, default=S, help="on a non-finite loss: stop (default) or skip "
                   "the batch (a run of skipped batches still stops)")
    g.add_argument("--checkpoint-every", dest="checkpoint_every", default=S, metavar="TIME|STEPS",
                   help="also checkpoint inside an epoch, so a kill loses at most this much: 30s, 10m, 1h, a "
                   "number of steps, or off (default 10m)")
    g.add_argument("--quiet", action="store_true", default=S, help="no progress bars (logs, CI)")


def budget(text: str) -> float:
    kind, _, value = text.partition(":")
    if kind != "time" or not value.replace(".", "", 1).isdigit() or not float(value) > 0:
        raise argparse.ArgumentTypeError(f"expected time:SECONDS with SECONDS > 0, e.g. time:600, got {text!r}")
    return float(value)


def positive_float(text: str) -> float:
    """A finite number above 0 (not nan, not inf)."""
    try:
        v = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from e
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return v


def strategy_list(text: str) -> list[str]:
    """``head,lp-ft,...``: at least one name, none twice (a repeat would be counted as a seed)."""
    names = csv_list(text)
    if not names:
        raise argparse.ArgumentTypeError("expected one or more strategies separated by commas, got none")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} listed more than once; use --repeats for more seeds")
    return names

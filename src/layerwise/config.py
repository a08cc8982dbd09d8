"""Run configuration: one flat dataclass, YAML in and out, validated with clear errors."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from layerwise.errors import LayerwiseError, MissingPathError, UnknownNameError, read_user_text

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECK_DATA = ("auto", "on", "off")
NAN_POLICIES = ("stop", "skip")
CHECK_DATA_AUTO_LIMIT = 50_000  # images: below this, 'auto' decodes every file once before training
DEVICES = ("auto", "cpu", "cuda", "mps")
# The library's defaults of settings a strategy may imply (resolve.apply_overrides); None in
# RunConfig means "not set by the user".
DEFAULTS: dict[str, Any] = {
    "head": "linear",
    "augment": "light",
    "optimizer": "adamw",
    "weight_decay": 1e-4,
    "scheduler": "cosine",
    "label_smoothing": 0.0,
    "t0": 5,
    "t_mult": 2,
    "bn": "frozen",
}


def knob(help: str, *, metavar: str | None = None, parse: str | None = None) -> Any:
    """A strategy knob: a RunConfig field, unset by default, that is also a ``fit`` flag
    (``--name-with-dashes``; ``parse`` names one of cli_args' parsers, else the type's)."""
    return field(default=None, metadata={"knob": help, "metavar": metavar, "parse": parse})


def knobs() -> list[dataclasses.Field]:
    """The strategy knobs, in declaration order."""
    return [f for f in fields(RunConfig) if "knob" in f.metadata]


AUTO_MODEL = "auto"  # --model auto: the backbone is chosen on the user's images when fit starts

@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; ``config.yaml`` is this, resolved."""

    data: str | None = None
    model: str = "efficientnet_lite0"  # AUTO_MODEL: chosen on the data (backbones.py)
    weights: str = "default"
    strategy: str = "auto"
    epochs: int | None = None  # None: 4, or for auto a budget from the data size (layerwise.budget)
    lr: float | str = 1e-3  # the head's LR; "auto": run the LR range test first
    batch_size: int | None = None  # None: 64, or for auto a batch that gives enough steps per epoch
    img_size: int | None = None  # None: the model's pretrained resolution
    train_size: int | None = None  # the side training crops end at (None: img_size); lower: train low, test high
    progressive: bool = False  # early epochs train at lower sides, ramping up to train_size (resolution.py)
    progressive_from: int | None = None  # the first epoch's side (None: half of train_size)
    augment: str | None = None  # None: light, or none for the embedded digits
    precision: str = "auto"  # bf16 where the device has fast bf16 (AMX/AVX512-BF16 CPUs, Ampere+ GPUs)
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    val_split: float = 0.2
    # Strategy knobs: each is declared here once, and cli_args makes its flag from the
    # declaration. None: the strategy's own default (StrategyOptions), written back by resolve.
    from_group: str | None = knob("partial: first trainable group")
    decay: float | None = knob("discriminative: LR divisor per group")
    every: int | None = knob("gradual: epochs between unfreezes")
    schedule: dict[int, str] | None = knob("gradual: the tutorial's {epoch: group} schedule, e.g. 0:head,2:layer4,4:layer3",
                                           metavar="E:GROUP,...", parse="schedule")
    probe_epochs: int | None = knob("lp-ft: head-only epochs")
    ft_lr_mult: float | None = knob("lp-ft: LR multiplier after the probe")
    lr_map: dict[str, float] | None = knob("differential: LR multiplier per group (missing groups stay frozen)",
                                           metavar="GROUP=MULT,...", parse="group_floats")
    wd_map: dict[str, float] | None = knob("weight decay per group, e.g. head=1e-2", metavar="GROUP=WD,...",
                                           parse="group_floats")
    layer_decay: float | None = None
    groups: dict[str, Any] | None = None  # user grouping: name -> path/regex
    bn: str | None = None  # None: frozen, or what the strategy implies (auto: eval)
    probe: bool = True  # auto: run the linear probe before training
    race: bool = True  # auto: race the candidate strategies for an epoch and keep the winner (race.py)
    # the most auto's whole run may cost, probe and averaging included, in runs of one fixed strategy at the
    # same budget: it decides whether and how many candidates race, then what averaging fits (racecost.plan)
    race_cost: float = 1.5
    soup: bool = True  # auto's race: then a greedy soup of the winner and the losers' rung weights (averaging.py)
    wise: bool = True  # auto's race: then WiSE-FT between the probe model and the winner (wise.py)
    reg: str | None = None  # NAME:STRENGTH, a pull towards the pretrained weights (regularise.py), e.g. l2sp:0.01
    probe_skill: float | None = None  # auto: the probe's measured skill (set by the probe, or by you to skip it)
    bn_shift: float | None = None  # auto: the data's BatchNorm statistics shift (shift.py), measured with the skill
    probe_head: str | None = None  # auto: the probe's fitted head (safetensors, in the run folder), the fine-tune's start
    # training (None: the strategy's or the library's default)
    head: str | None = None
    hidden: int = 512
    optimizer: str | None = None
    weight_decay: float | None = None
    scheduler: str | None = None
    warmup_epochs: float = 0.0
    t0: int | None = None
    t_mult: int | None = None
    label_smoothing: float | None = None
    momentum: float = 0.9
    clip_grad: float | None = None
    ema: float | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    patience: int | None = None
    time_budget: float | None = None  # seconds: stop after the epoch that spends it (compare --budget)
    workers: int | None = None
    channels_last: bool | None = None  # None: measured with the precision (numerics.py), or on when it is given
    tta: list[str] = field(default_factory=list)
    check_data: str = "auto"
    cache: str = "auto"  # decoded-image cache: auto (RAM when it fits), ram, disk, off
    cache_dir: str | None = None  # disk cache location (default ~/.cache/layerwise)
    feature_cache: str = "auto"  # frozen-prefix features while only the head trains: auto, off
    feature_cache_views: int = 0  # with random augmentation: K augmented views precomputed
    nan: str = "stop"
    checkpoint_every: str | int = "10m"  # mid-epoch checkpoints: a time (30s, 10m, 1h) or a number of steps
    quiet: bool = False
    # What each --resume changed, and from which epoch/step (written by fit, not by you).
    resumed: list[dict[str, Any]] = field(default_factory=list)

    def final_train_size(self) -> int | None:
        """The side training crops end at: ``train_size``, else ``img_size``."""
        return self.train_size or self.img_size

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


KEYS = [f.name for f in fields(RunConfig)]


def from_mapping(values: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """A config from a dict; unknown keys (likely typos) are errors with suggestions."""
    unknown = [k for k in values if k not in KEYS]
    if unknown:
        hints = {k: difflib.get_close_matches(str(k), KEYS, n=1) for k in unknown}  # YAML allows non-string keys
        msg = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise LayerwiseError(f"unknown config key(s) {msg}; valid keys: {', '.join(KEYS)}")
    hints = typing.get_type_hints(RunConfig)
    for k, v in values.items():
        if not _type_ok(v, hints[k]):
            raise LayerwiseError(f"config key {k!r} must be {_type_name(hints[k])}, got {v!r}")
    cfg = dataclasses.replace(base or RunConfig(), **values)
    validate(cfg)
    return cfg


def _type_ok(value: Any, hint: Any) -> bool:
    """Does ``value`` fit the annotation (int, float, str, bool, X | None, list[str], dict[K, V])?"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_type_ok(k, args[0]) and (args[1] is Any or _type_ok(v, args[1]))
                                               for k, v in value.items())
    return hint is Any


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping, parsed with the safe loader."""
    p = Path(path)
    if not p.is_file():
        raise MissingPathError(f"config file {str(p)!r} does not exist")
    try:
        values = yaml.safe_load(read_user_text(p, "config file")) or {}
    except yaml.YAMLError as e:
        raise LayerwiseError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise LayerwiseError(f"config file {str(p)!r} must hold a mapping of settings, got {type(values).__name__}")
    return values


MAX_IMG_SIZE = 2048  # pixels: one 2048 px batch of 64 is already 3 GB of fp32 input
MAX_BATCH_SIZE = 65_536
MAX_CLASSES = 100_000


@dataclass(frozen=True)
class Bound:
    """A closed or half-open interval; ``note`` says what the knob means."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def __contains__(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def __str__(self) -> str:
        if self.hi == math.inf:
            text = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            text = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        return text + (f" ({self.note})" if self.note else "")


RANGES: dict[str, Bound] = {
    "epochs": Bound(1, 100_000),
    "batch_size": Bound(1, MAX_BATCH_SIZE),
    "lr": Bound(0, lo_open=True, note="or 'auto'"),
    "img_size": Bound(16, MAX_IMG_SIZE, note="pixels"),
    "train_size": Bound(16, MAX_IMG_SIZE, note="pixels"),
    "progressive_from": Bound(16, MAX_IMG_SIZE, note="pixels"),
    "seed": Bound(0, 2**63, hi_open=True),
    "val_split": Bound(0, 1, lo_open=True, hi_open=True),
    "decay": Bound(1, 1000, note="the head gets the base LR, each earlier group decay times less"),
    "every": Bound(1, note="epochs between unfreezes"),
    "probe_epochs": Bound(0, note="head-only epochs"),
    "race_cost": Bound(1, 100, note="runs of one fixed strategy"),
    "ft_lr_mult": Bound(0, 100, lo_open=True, note="the LR multiplier after the probe"),
    "layer_decay": Bound(0, 1, lo_open=True, note="timm uses 0.65-0.9"),
    "probe_skill": Bound(-1, 1),
    "bn_shift": Bound(0, 1000, note="mean |batch mean - running mean| in running std units"),
    "hidden": Bound(1, 65_536, note="the MLP head's width"),
    "weight_decay": Bound(0, 10),
    "warmup_epochs": Bound(0),
    "t0": Bound(1, 100_000, note="epochs in the first cosine period"),
    "t_mult": Bound(1, 100, note="growth of each cosine period"),
    "label_smoothing": Bound(0, 1, hi_open=True),
    "momentum": Bound(0, 1, hi_open=True),
    "clip_grad": Bound(0, lo_open=True, note="max gradient norm; leave it unset for no clipping"),
    "ema": Bound(0, 1, lo_open=True, hi_open=True, note="e.g. 0.999"),
    "mixup": Bound(0, 100, note="MixUp's alpha; 0 is off"),
    "cutmix": Bound(0, 100, note="CutMix's alpha; 0 is off"),
    "patience": Bound(0, note="epochs without a val-acc gain; 0 is off"),
    "time_budget": Bound(0, lo_open=True, note="seconds"),
    "workers": Bound(0, 256),
    "feature_cache_views": Bound(0, 100),
}


_UNITS = {"s": 1, "m": 60, "h": 3600}


def checkpoint_interval(text: str) -> tuple[float | None, int | None]:
    """``"10m"`` -> (600.0, None) seconds; ``"500"`` -> (None, 500) steps; ``"off"`` -> (None, None)."""
    text = str(text).strip().lower()
    if text == "off":
        return None, None
    num, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "")
    try:
        value = float(num) if unit else int(num)
    except ValueError:
        value = -1
    if not value > 0 or not math.isfinite(value):
        raise LayerwiseError(f"checkpoint_every must be a time such as 30s, 10m or 1h, a number of steps such as "
                             f"500, or off; got {text!r}")
    return (value * _UNITS[unit], None) if unit else (None, int(value))


def _validate_relations(cfg: RunConfig) -> None:
    """Knobs whose valid range depends on another knob."""
    final = cfg.final_train_size()
    if cfg.progressive_from is not None and final is not None and cfg.progressive_from > final:
        raise LayerwiseError(f"progressive_from must be at most the final training side ({final} px), "
                             f"got {cfg.progressive_from!r}")
    if cfg.epochs is None:  # checked again once the budget is chosen from the data
        return
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:
        raise LayerwiseError(f"warmup_epochs must be shorter than the run ({cfg.epochs} epochs), "
                             f"got {cfg.warmup_epochs!r}")
    if cfg.probe_epochs is not None and cfg.probe_epochs >= cfg.epochs:
        raise LayerwiseError(f"probe_epochs must leave an epoch to fine-tune: below --epochs {cfg.epochs}, "
                             f"got {cfg.probe_epochs!r}")


def validate(cfg: RunConfig) -> None:
    """Reject values no run could use, naming the field and the valid range. Names that must
    be in a registry (strategy, preset, view...) are checked by :mod:`layerwise.choices`."""
    if cfg.device not in DEVICES and not str(cfg.device).startswith("cuda:"):
        raise UnknownNameError("device", cfg.device, DEVICES)
    if isinstance(cfg.lr, str) and cfg.lr != "auto":
        raise LayerwiseError(f"lr must be a number or 'auto', got {cfg.lr!r}")
    for name, bound in RANGES.items():
        v = getattr(cfg, name)
        if v is not None and v != "auto" and v not in bound:
            raise LayerwiseError(f"{name} must be {bound}, got {v!r}")
    _validate_relations(cfg)
    checkpoint_interval(cfg.checkpoint_every)
    for what, mapping, lo_ok in (("lr_map", cfg.lr_map, "an LR multiplier >= 0"),
                                 ("wd_map", cfg.wd_map, "a weight decay >= 0")):
        bad = {k: v for k, v in (mapping or {}).items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise LayerwiseError(f"{what} values must each be {lo_ok}, got {bad}")
    bad_epochs = [e for e in (cfg.schedule or {}) if e < 0 or (cfg.epochs is not None and e >= cfg.epochs)]
    if bad_epochs:
        raise LayerwiseError(f"schedule epochs must lie in the run, 0..{cfg.epochs - 1}, got {bad_epochs}; "
                             "raise --epochs or move the unfreeze earlier")

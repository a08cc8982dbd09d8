"""The one place a run's settings are decided.

``resolve(cfg, facts, evidence)`` is a pure function: the user's config, what set-up learned
(:class:`Facts`) and what was measured on the data (:class:`Evidence`) in; a frozen config and
a complete :class:`~layerwise.plan.Plan` out. Calling it again with more facts or evidence
gives the next, fuller answer; nothing downstream re-derives a setting. The order inside is
the order of precedence: the user's value, then the embedded data's, the budget's, the
evidence's, the strategy's overrides, and last the library defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from layerwise.budget import resolve_budget
from layerwise.choices import check_choices
from layerwise.config import DEFAULTS, KEYS, RunConfig, from_mapping
from layerwise.data import DEFAULT_IMG_SIZE
from layerwise.errors import LayerwiseError
from layerwise.groups import LayerGroup
from layerwise.plan import NOMINAL_STEPS_PER_EPOCH, Plan, make_plan
from layerwise.strategies import Strategy, StrategyOptions, make_strategy
from layerwise.tta import AUTO as TTA_AUTO
from layerwise.tta import views_for

LR_TO_FIND = 1e-3  # --lr auto before the range test: the base the test's multipliers are taken at


@dataclass(frozen=True)
class Facts:
    """What set-up learned before any setting is decided: the data, the model, the machine."""

    num_classes: int
    groups: tuple[LayerGroup, ...]
    sizes: Mapping[str, int]  # parameters per group, with the model's head as built
    model_img_size: int | None = None  # the model's pretrained resolution
    n_train: int | None = None  # training images (None: planning without data)
    images_per_class: float | None = None
    embedded: bool = False  # the embedded digits: upscaled, never flipped or cropped
    precision: str | None = None  # measured (numerics.py); None: not measured yet
    channels_last: bool | None = None
    train_batches: int | None = None  # batches per epoch of the training loader as built


@dataclass(frozen=True)
class Evidence:
    """What was measured on the user's data before training (auto's probe, the LR range test)."""

    probe_skill: float | None = None
    bn_shift: float | None = None
    probe_head: str | None = None  # the probe's fitted head (safetensors)
    lr: float | None = None  # the LR range test's suggestion, for --lr auto


@dataclass(frozen=True)
class Resolved:
    """A run's frozen settings and its complete plan; ``budget`` says why the budget is what it is."""

    config: RunConfig
    plan: Plan
    budget: str = ""

    @property
    def strategy(self) -> Strategy:
        return self.plan.strategy


def resolve(cfg: RunConfig, facts: Facts, evidence: Evidence | None = None) -> Resolved:
    """``cfg`` with every setting decided, and the plan over ``facts.groups``."""
    check_choices(cfg)
    ev = evidence or Evidence()
    c = cfg
    if facts.embedded:
        c = dataclasses.replace(c, img_size=c.img_size or DEFAULT_IMG_SIZE, augment=c.augment or "none")
    c = _with_evidence(c, ev)
    # What the strategy implies comes before the budget, which fills only what is still unset
    # (a strategy's batch size must not lose to the default); the strategy is then made again
    # with the budget's epochs, which its states may depend on.
    implied = _strategy(resolve_budget(c, facts.n_train)[0], facts)
    c = apply_overrides(c, implied.name, implied.overrides, defaults=False)
    c, why = resolve_budget(c, facts.n_train)
    strategy = _strategy(c, facts)
    if ev.probe_head and cfg.probe_epochs is None:
        # The probe *is* LP-FT's linear-probing stage, fitted to convergence; only lp-ft reads it.
        probed = dataclasses.replace(c, probe_epochs=0)
        strategy = _strategy(probed, facts)
        c = probed if strategy.trains_from_probe else c
    c = apply_overrides(c, strategy.name, strategy.overrides)
    if c.tta == [TTA_AUTO]:  # the views follow the augmentation, now decided
        c = dataclasses.replace(c, tta=views_for(c.augment or DEFAULTS["augment"]))
    if c.img_size is None:
        c = dataclasses.replace(c, img_size=facts.model_img_size)
    if facts.precision is not None:
        c = dataclasses.replace(c, precision=facts.precision, channels_last=facts.channels_last)
    c = _with_knob_defaults(c)
    if c.lr == "auto":  # until the range test has run: its multipliers are taken at this base
        c = dataclasses.replace(c, lr=LR_TO_FIND)
    plan = make_plan(facts.groups, facts.sizes, strategy, c,
                     steps_per_epoch=facts.train_batches or NOMINAL_STEPS_PER_EPOCH)
    return Resolved(c, plan, why)


def _with_evidence(c: RunConfig, ev: Evidence) -> RunConfig:
    """The measured values, where the user gave none (config.yaml records them, so a resume
    or a re-run keeps the same choice without measuring again)."""
    given = {"probe_skill": ev.probe_skill, "bn_shift": ev.bn_shift, "probe_head": ev.probe_head}
    c = dataclasses.replace(c, **{k: v for k, v in given.items() if v is not None and getattr(c, k) is None})
    return dataclasses.replace(c, lr=ev.lr) if ev.lr is not None and c.lr == "auto" else c


def strategy_options(cfg: RunConfig, facts: Facts) -> StrategyOptions:
    """The strategy's knobs, read from the config by field name (an unset knob keeps the
    strategy's own default: each default is written once, in StrategyOptions), plus the
    data's size."""
    from_cfg = {f.name: getattr(cfg, f.name) for f in fields(StrategyOptions)
                if f.name in KEYS and getattr(cfg, f.name) is not None}
    return StrategyOptions(**from_cfg, images_per_class=facts.images_per_class, num_classes=facts.num_classes)


_KNOB_DEFAULTS = {f.name: f.default for f in fields(StrategyOptions)
                  if f.name in KEYS and f.name != "epochs" and f.default is not None}


def _with_knob_defaults(c: RunConfig) -> RunConfig:
    """config.yaml records the knob values the strategies used, not None."""
    return dataclasses.replace(c, **{k: v for k, v in _KNOB_DEFAULTS.items() if getattr(c, k) is None})


def _strategy(c: RunConfig, facts: Facts) -> Strategy:
    return make_strategy(c.strategy, [g.name for g in facts.groups], strategy_options(c, facts))


# Each field's declared default; a list field's is its factory's value ([]), so an override of
# --tta applies where the user left it empty.
_DECLARED = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
             for f in fields(RunConfig)}


def unset(cfg: RunConfig, key: str) -> bool:
    """Did the user leave ``key`` alone (None, or the field's declared default)?"""
    return getattr(cfg, key) is None or getattr(cfg, key) == _DECLARED[key]


def apply_overrides(cfg: RunConfig, strategy: str, overrides: Mapping[str, Any], *, defaults: bool = True) -> RunConfig:
    """Settings the strategy implies, wherever the user left them unset; then (``defaults``)
    the library's defaults for what is still unset. A key that names no setting is an error."""
    unknown = sorted(k for k in overrides if k not in KEYS)
    if unknown:
        raise LayerwiseError(f"strategy {strategy!r} overrides unknown setting(s) {', '.join(map(repr, unknown))}; "
                             f"a strategy may set any of: {', '.join(KEYS)}")
    values = {k: v for k, v in overrides.items() if unset(cfg, k)}
    if defaults:
        values |= {k: v for k, v in DEFAULTS.items() if getattr(cfg, k) is None and k not in values}
    try:
        return from_mapping(values, cfg) if values else cfg
    except LayerwiseError as e:
        raise LayerwiseError(f"strategy {strategy!r} implies a setting no run can use: {e}") from e

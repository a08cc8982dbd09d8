"""Fine-tuning strategies: pure functions ``epoch -> {group: GroupState}``.

Epochs count from 0, as in the tutorial's ``{0: 'fc', 2: 'layer4'}`` schedule. Every
strategy works on group *names*, so it applies unchanged to any architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from layerwise.errors import LayerwiseError, UnknownNameError


@dataclass(frozen=True)
class GroupState:
    """What one group does in one epoch. ``weight_decay=None`` means the run's default."""

    trainable: bool
    lr_mult: float = 1.0
    weight_decay: float | None = None


States = dict[str, GroupState]


@dataclass(frozen=True)
class StrategyOptions:
    """Knobs of the strategies; each strategy reads only its own."""

    epochs: int = 10
    from_group: str | None = None  # partial: first trainable group
    lr_map: Mapping[str, float] | None = None  # differential: group -> LR multiplier
    decay: float = 2.6  # discriminative: ULMFiT's factor, >= 1
    every: int | None = None  # gradual: epochs between unfreezes
    schedule: Mapping[int, str] | None = None  # gradual: {epoch: group}, cumulative
    probe_epochs: int | None = None  # lp-ft: head-only epochs
    ft_lr_mult: float = 0.1  # lp-ft: LR multiplier once everything trains
    wd_map: Mapping[str, float] | None = None  # any strategy: group -> weight decay
    images_per_class: float | None = None  # auto
    num_classes: int | None = None  # auto
    probe_skill: float | None = None  # auto: linear-probe skill, 0 = majority guess, 1 = perfect
    bn_shift: float | None = None  # auto: the data's BatchNorm statistics shift (shift.py)


@dataclass(frozen=True)
class Strategy:
    """A resolved strategy: its per-epoch states, why it was chosen, and the training
    settings it implies (the recipe's head, scheduler, label smoothing...)."""

    name: str
    states: Callable[[int], States]
    reason: str = ""
    overrides: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    # auto: does the fine-tune start from the probe's head, or only its first metrics row?
    trains_from_probe: bool = True


# --- LR policies (pure) ------------------------------------------------------------------


def geometric_mults(names: Sequence[str], decay: float) -> dict[str, float]:
    """``lr_g = base_lr / decay**(G-1-g)``: the head at the base LR, each group below it
    ``decay`` times smaller (ULMFiT's 2.6; the tutorial's ``factor=0.1`` is ``decay=10``)."""
    if not decay >= 1:
        raise LayerwiseError(f"decay must be >= 1 (the head gets the base LR, earlier groups less), got {decay!r}")
    last = len(names) - 1
    return {n: 1.0 / decay ** (last - i) for i, n in enumerate(names)}


def tutorial_differential_mults(names: Sequence[str]) -> dict[str, float]:
    """The tutorial's differential dict generalised: the head x1, the last body group x0.5,
    the earlier half of the rest x0.01 and the later half x0.1 (ResNet: stem, layer1 ->
    1e-5; layer2, layer3 -> 1e-4; layer4 -> 5e-4; fc -> 1e-3 with base 1e-3)."""
    *body, head = names
    out = {head: 1.0}
    if body:
        *rest, last = body
        out[last] = 0.5
        half = len(rest) // 2
        out.update({n: 0.01 for n in rest[:half]})
        out.update({n: 0.1 for n in rest[half:]})
    return out


def _check_names(names: Sequence[str], given: Iterable[str], what: str) -> None:
    for n in given:
        if n not in names:
            raise UnknownNameError(f"group in {what}", n, names)


def _states(names: Sequence[str], trainable: Container[str], mults: Mapping[str, float] | None = None) -> States:
    return {n: GroupState(n in trainable, (mults or {}).get(n, 1.0)) for n in names}


def _last_two_boundary(names: Sequence[str]) -> str:
    """The first of the last two body groups (ResNet: ``layer3``), or the first group."""
    return names[max(0, len(names) - 3)]


# --- strategies --------------------------------------------------------------------------


def head_only(names: Sequence[str], opts: StrategyOptions) -> Strategy:
    s = _states(names, {names[-1]})
    return Strategy("head", lambda epoch: s)


def partial(names: Sequence[str], opts: StrategyOptions) -> Strategy:
    start = opts.from_group or _last_two_boundary(names)
    if start not in names:
        raise UnknownNameError("group", start, names)
    s = _states(names, set(names[names.index(start):]))
    return Strategy("partial", lambda epoch: s, f"trains {start} and every group after it")


def full(names: Sequence[str], opts: StrategyOptions) -> Strategy:
    s = _states(names, set(names))
    return Strategy("full", lambda epoch: s)


def differential(names: Sequence[str], opts: StrategyOptions) -> Strategy:
    mults = dict(opts.lr_map) if opts.lr_map else tutorial_differential_mults(names)
    _check_names(names, mults, "lr_map")
    bad = {k: v for k, v in mults.items() if not v >= 0}
    if bad:
        raise LayerwiseError(f"LR multipliers must be >= 0, got {bad}")
    # Groups missing from the map (or at x0) stay frozen, as in an explicit param-group list.
    s = _states(names, {n for n, m in mults.items() if m > 0}, mults)
    return Strategy("differential", lambda epoch: s)


def discriminative(names: Sequence[str], opts: StrategyOptions) -> Strategy:
    s = _states(names, set(names), geometric_mults(names, opts.decay))
    return Strategy("discriminative", lambda epoch: s, f"decay {opts.decay} per group from the head")


def unfreeze_epochs(names: Sequence[str], opts: StrategyOptions) -> dict[str, int]:
    """Group -> first trainable epoch for ``gradual``; groups never unfrozen are absent."""
    if opts.schedule:
        sched = {int(e): g for e, g in opts.schedule.items()}
        _check_names(names, sched.values(), "gradual schedule")
        groups = list(sched.values())
        twice = sorted({g for g in groups if groups.count(g) > 1})
        if twice:
            raise LayerwiseError(f"gradual schedule names {', '.join(twice)} more than once")
        order = [g for _, g in sorted(sched.items())]
        idx = [names.index(g) for g in order]
        if idx != sorted(idx, reverse=True):
            raise LayerwiseError(
                f"gradual schedule must unfreeze from the head down; got {' -> '.join(order)}, "
                f"expected the order of {' <- '.join(names)}"
            )
        first = {g: e for e, g in sched.items()}
        first.setdefault(names[-1], 0)  # the new head always trains
        return first
    every = opts.every or max(1, opts.epochs // len(names))
    if every < 1:
        raise LayerwiseError(f"gradual 'every' must be >= 1 epoch, got {every}")
    return {n: every * k for k, n in enumerate(reversed(names))}


def gradual(names: Sequence[str], opts: StrategyOptions) -> Strategy:
    first = unfreeze_epochs(names, opts)
    return Strategy("gradual", lambda epoch: _states(names, {n for n, e in first.items() if e <= epoch}))


def lp_ft(names: Sequence[str], opts: StrategyOptions) -> Strategy:
    k = opts.probe_epochs if opts.probe_epochs is not None else max(1, opts.epochs // 4)
    probe = _states(names, {names[-1]})
    tune = _states(names, set(names), {n: opts.ft_lr_mult for n in names})
    first = f"linear probe for {k} epoch(s)" if k else "the head starts as the fitted linear probe"
    return Strategy("lp-ft", lambda epoch: probe if epoch < k else tune, f"{first}, then all groups at x{opts.ft_lr_mult}")


RECIPE_SETTINGS = MappingProxyType({
    "head": "mlp",
    "optimizer": "adamw",
    "weight_decay": 1e-4,
    "scheduler": "cosine-restarts",
    "t0": 5,
    "t_mult": 2,
    "label_smoothing": 0.1,
})


def recipe(names: Sequence[str], opts: StrategyOptions) -> Strategy:
    """The tutorial's complete recipe, on the last-two-stages boundary of any model."""
    start = names.index(_last_two_boundary(names))
    mults = dict(zip(names[start:], (0.1, 0.5, 1.0)[-(len(names) - start):]))
    s = _states(names, set(mults), mults)
    return Strategy("recipe", lambda epoch: s, f"trains {', '.join(mults)} at x{', x'.join(map(str, mults.values()))}",
                    RECIPE_SETTINGS)


# Where each threshold came from. The suite (bench/results/suite.md: caltech101, dtd, flowers17,
# cifar10-mini, gtsrb, fashion-mnist, pbc-blood, digits, all on Lite0) is the development set:
# results on it are in-sample for these numbers.
AUTO_VERY_SMALL = 30  # without a probe: at or below, train the head only (the tutorial's table; not measured)
AUTO_SMALL = 300  # without a probe: below, gradual unfreezing; above, discriminative LRs (the tutorial's table)
# Probe skill at or above which the pretrained features already fit the task: set on cifar10-mini
# subsets and the digits, kept on the suite (caltech101 0.99 -> lp-ft; flowers17 sits on it, 0.90).
AUTO_CLOSE = 0.9
# auto picks a strategy that keeps early layers at a low LR (or frozen), and those need the
# pretrained BatchNorm statistics: measured on cifar10-mini, --bn eval lifts lp-ft from 0.46
# to 0.64 and discriminative from 0.44 to 0.68 (bench/results/strategies.md).
AUTO_SETTINGS = MappingProxyType({"bn": "eval"})
# BatchNorm shift (shift.py) at or above which the images are far from the pretraining data.
# Chosen on the 96-px quick suite (bench/results/suite-quick.md) and confirmed on the full
# suite at 112 px (bench/results/suite.md): the four datasets where full fine-tuning on batch
# statistics won or tied (traffic signs, blood cells, grayscale clothing, digits) measured
# 0.31-0.44, the four where the pretrained statistics won (objects, flowers, textures, CIFAR
# photos) 0.16-0.29. Leaving each dataset out, the threshold from the other seven misses only
# traffic signs (0.31 at 112 px), docs/strategies.md.
AUTO_FAR = 0.3
# Within this of AUTO_FAR the shift decides on a few hundredths (the suite's datasets sit
# 0.01-0.05 from it, and one dataset's shift moves by ~0.05 with the image size): say so.
AUTO_NEAR = 0.03


def auto_choice(images_per_class: float | None, num_classes: int | None,
                probe_skill: float | None = None, bn_shift: float | None = None) -> tuple[str, str]:
    """``(strategy, reason)`` from the data's size and, when measured, the linear probe's
    skill (how well frozen pretrained features separate the classes: 0 = majority guess,
    1 = perfect) and the BatchNorm shift (how far the images sit from the pretraining data).
    docs/strategies.md gives the measurements behind each threshold."""
    choice, reason = _auto_rule(images_per_class, num_classes, probe_skill, bn_shift)
    if probe_skill is not None and bn_shift is not None and abs(bn_shift - AUTO_FAR) < AUTO_NEAR:
        other = "--strategy discriminative --bn eval" if choice == "full" else "--strategy full"
        reason += (f" (a near call: the shift is within {AUTO_NEAR} of {AUTO_FAR}; `{other}` is the other side, "
                   "worth a run)")
    return choice, reason


def _auto_rule(images_per_class: float | None, num_classes: int | None,
               probe_skill: float | None, bn_shift: float | None) -> tuple[str, str]:
    k = f" ({num_classes} classes)" if num_classes else ""
    size = f"{images_per_class:.0f} images per class{k}" if images_per_class is not None else "dataset size unknown"
    few = images_per_class is not None and images_per_class <= AUTO_VERY_SMALL
    if probe_skill is None:
        if images_per_class is None:
            return "discriminative", f"{size}: assuming a medium dataset -> discriminative LRs"
        if few:
            return "head", f"{size} <= {AUTO_VERY_SMALL}, no probe: very small dataset -> train the head only"
        if images_per_class < AUTO_SMALL:
            return "gradual", (f"{size} < {AUTO_SMALL}, no probe: small dataset -> gradual unfreezing "
                               "to avoid early overfitting")
        return "discriminative", f"{size} >= {AUTO_SMALL}, no probe: medium/large dataset -> discriminative LRs"
    # With a probe, size stops mattering: on cifar10-mini subsets (20, 50, 100 per class) and
    # the digits (20, 144 per class), discriminative was the best or within 1.4 points of it
    # whenever the skill was below AUTO_CLOSE, and head-only trailed by 10+ points.
    probe = f"linear-probe skill {probe_skill:.2f}"
    if bn_shift is not None and bn_shift >= AUTO_FAR:
        # Far data: the stored statistics normalise it wrongly and the features must move;
        # a skill as high as 0.94 (digits) still lost 1.7 points to full fine-tuning.
        return "full", (f"{size}, {probe}, BatchNorm shift {bn_shift:.2f} >= {AUTO_FAR}: the images are far from "
                        "the pretraining data -> every group trains at the full LR on batch statistics")
    if probe_skill >= AUTO_CLOSE:
        return "lp-ft", (f"{size}, {probe} >= {AUTO_CLOSE}: the frozen features already fit -> probe the head, "
                         "then fine-tune everything gently (lp-ft keeps the features)")
    return "discriminative", (f"{size}, {probe} < {AUTO_CLOSE}: the features need adapting -> every group "
                              "trains from the start, earlier ones at smaller LRs")


def auto(names: Sequence[str], opts: StrategyOptions) -> Strategy:
    choice, reason = auto_choice(opts.images_per_class, opts.num_classes, opts.probe_skill, opts.bn_shift)
    inner = STRATEGIES[choice](names, opts)
    far = choice == "full"
    # Every group training at full LR from the start needs no stored statistics: it keeps the
    # default --bn. Only lp-ft, whose every group moves at x0.1, fine-tunes from the probe's
    # head (Kumar et al.); where the head trains at the full LR from the first step, the
    # probe's large-norm head sends large early gradients into the body and the run ends lower
    # than from a fresh head: full on grayscale clothing 0.844 against 0.872 (first-epoch loss
    # 5.3 against 1.4), discriminative 0.860 against 0.874, and 0.9 points lower on textures.
    # Either way the probe is the run's first metrics row, so auto never ends below it.
    return replace(inner, name=f"auto:{choice}", reason=f"{reason}; {inner.reason}".rstrip("; "),
                   overrides=inner.overrides if far else {**inner.overrides, **AUTO_SETTINGS},
                   trains_from_probe=choice == "lp-ft")


StrategyFn = Callable[[Sequence[str], StrategyOptions], Strategy]

STRATEGIES: dict[str, StrategyFn] = {
    "head": head_only,
    "partial": partial,
    "full": full,
    "differential": differential,
    "discriminative": discriminative,
    "gradual": gradual,
    "lp-ft": lp_ft,
    "recipe": recipe,
    "auto": auto,
}


def register_strategy(name: str, fn: StrategyFn, *, replace_existing: bool = False) -> StrategyFn:
    """Add a strategy from user code: ``fn(group_names, options) -> Strategy``. ``fit``,
    ``plan``, ``compare`` and ``--help`` list it from then on, and its ``overrides`` may set any
    RunConfig field the user leaves unset (label smoothing, LR, batch size...)."""
    if not name or not isinstance(name, str) or name.strip() != name or "," in name:
        raise LayerwiseError(f"a strategy name must be a non-empty word without commas or spaces around it, got {name!r}")
    if name in STRATEGIES and not replace_existing:
        raise LayerwiseError(f"strategy {name!r} is already registered; pass replace_existing=True to replace it "
                             f"(registered: {', '.join(STRATEGIES)})")
    if not callable(fn):
        raise LayerwiseError(f"strategy {name!r} must be a function (group names, options) -> Strategy, got {fn!r}")
    STRATEGIES[name] = fn
    return fn


def _with_wd(strategy: Strategy, names: Sequence[str], wd_map: Mapping[str, float]) -> Strategy:
    _check_names(names, wd_map, "weight-decay map")
    inner = strategy.states

    def states(epoch: int) -> States:
        return {n: replace(s, weight_decay=wd_map.get(n, s.weight_decay)) for n, s in inner(epoch).items()}

    return replace(strategy, states=states)


def make_strategy(name: str, names: Sequence[str], opts: StrategyOptions | None = None) -> Strategy:
    """Resolve strategy ``name`` for groups ``names`` (stem first, head last)."""
    if name not in STRATEGIES:
        raise UnknownNameError("strategy", name, STRATEGIES)
    if not names:
        raise LayerwiseError("a strategy needs at least one layer group")
    opts = opts or StrategyOptions()
    if opts.epochs < 1:
        raise LayerwiseError(f"epochs must be >= 1, got {opts.epochs}")
    strategy = STRATEGIES[name](list(names), opts)
    return _with_wd(strategy, names, opts.wd_map) if opts.wd_map else strategy

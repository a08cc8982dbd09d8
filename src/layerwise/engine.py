"""A whole ``fit``, in the order it runs:

1. set-up: data, model, device, numerics and loaders (:func:`prepare`);
2. evidence: auto's probe, the probe's row, ``--lr auto``'s range test (:func:`decide`);
3. :func:`~layerwise.resolve.resolve`, once more with the evidence: the frozen config and plan;
4. the build: optimizer, EMA, the :class:`~layerwise.trainer.Trainer` (:func:`build`);
5. the epochs (:mod:`layerwise.loop`).

Nothing is decided after step 3; the loop reads what resolve returned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerwise import rundir
from layerwise.checkpoint import atomic_write_text, read_jsonl, write_json
from layerwise.choices import config_from
from layerwise.config import RunConfig, load_yaml
from layerwise.data import Splits, spread, write_skipped
from layerwise.distributed import DistInfo, from_env, shutdown
from layerwise.errors import LayerwiseError
from layerwise.evidence import ProbeInputs, begin_at_probe, probe_evidence, record_probe, run_probe
from layerwise.freeze import has_norms, recalibrate_norms, set_trainable
from layerwise.groups import head_module
from layerwise.hardware import Amp, pick_device, to_device
from layerwise.loaders import Loaders, make_loaders, ordered_loader, set_train_side, unsharded, with_eval_transform
from layerwise.loop import run_epochs
from layerwise.lrfind import LRFind, lr_find
from layerwise.models import LoadedModel
from layerwise.numerics import fastest_numerics
from layerwise.optim import apply_states, build_optimizer
from layerwise.plan import Plan
from layerwise.probe import ProbeResult
from layerwise.progress import say
from layerwise.regularise import Start, make_penalty
from layerwise.resolution import describe as describe_sizes
from layerwise.resolve import Evidence, Resolved, resolve
from layerwise.rundir import RunDir
from layerwise.setup import ModelSetup, load_data, set_up_model
from layerwise.step import train_step
from layerwise.trainer import Interrupted, Kit, Trainer
from layerwise.tta import AUTO as TTA_AUTO

# What --resume may change: how far and how fast to go, and what to do about divergence.
# Anything else would make the checkpoint and the config disagree.
RESUME_OVERRIDABLE = ("epochs", "lr", "clip_grad", "precision", "nan", "patience", "checkpoint_every",
                      "quiet", "workers", "device")
_RESUME_IGNORED = ("quiet", "workers", "device")  # where the run executes, not what it computes

__all__ = ["RESUME_OVERRIDABLE", "Interrupted", "Prepared", "build", "build_trainer", "decide", "find_lr", "fit",
           "prepare", "probe", "probe_inputs", "range_test"]


@dataclass(frozen=True)
class Prepared:
    """What set-up built before any evidence: the data, the model on its device with the
    measured numerics, the loaders, and the resolution those facts give."""

    splits: Splits
    model: ModelSetup
    device: torch.device
    loaders: Loaders
    amp: Amp

    @property
    def resolved(self) -> Resolved:
        """The resolution of these facts, without evidence yet."""
        return self.model.resolved


def prepare(cfg: RunConfig, info: DistInfo = DistInfo()) -> Prepared:
    """Data, model, device, numerics and loaders, and the settings they resolve to."""
    splits = load_data(cfg)
    ms = set_up_model(cfg, len(splits.classes), n_train=len(splits.train), images_per_class=splits.images_per_class,
                      embedded=cfg.data is None)
    c, model = ms.resolved.config, ms.loaded.model
    if ms.resolved.budget:
        say(ms.resolved.budget)
    if cfg.tta == [TTA_AUTO]:  # say what auto made of it: with --augment none it is no views at all
        say(f"tta auto: {', '.join(c.tta)}, the views --augment {c.augment} trains for, in the final evaluation" if c.tta
            else f"tta auto: no views: --augment {c.augment} trains on no flipped or rescaled images")
    if c.batch_size == 1 and c.bn != "eval" and has_norms(model):
        raise LayerwiseError(f"--batch-size 1 cannot train {ms.loaded.name}'s BatchNorm layers on batch statistics "
                             "(one value per channel); use --batch-size 2 or more, or --bn eval")
    device = pick_device(c.device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    model.to(device)
    fast = fastest_numerics(c.precision, c.channels_last, model, device, model_name=c.model,
                            img_size=c.final_train_size(), batch=c.batch_size, num_classes=len(splits.classes),
                            cache_dir=Path(c.cache_dir) if c.cache_dir else None, distributed=info.enabled)
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
    loaders = make_loaders(splits, c, ms.loaded.mean, ms.loaded.std, info)
    facts = dataclasses.replace(ms.facts, precision=fast.precision, channels_last=fast.channels_last,
                                train_batches=len(loaders.train))
    r = resolve(cfg, facts)
    return Prepared(splits, dataclasses.replace(ms, facts=facts, resolved=r), device, loaders,
                    Amp(r.config.precision, device, model))


def wants_probe(c: RunConfig, head: torch.nn.Module | None) -> bool:
    """``auto``, with the probe on and its skill not known yet (a resume knows it)."""
    return c.strategy == "auto" and c.probe and c.probe_skill is None and head is not None


def decide(cfg: RunConfig, p: Prepared, run: Path, info: DistInfo, *, started: float,
           restored: bool) -> tuple[Resolved, dict | None]:
    """The evidence the settings need (auto's probe, --lr auto's range test), each piece
    resolved as it arrives, and the probe's metrics row when the run starts from it."""
    r, ev, row = p.resolved, Evidence(), None
    loaded, groups, c = p.model.loaded, p.model.groups, p.resolved.config
    head = head_module(loaded.model, groups)
    if wants_probe(c, head):
        r, ev = probe(cfg, p, run, info)
    if r.config.probe_head and not restored:
        row = begin_at_probe(loaded.model, head, run / r.config.probe_head, p.loaders.val, amp=p.amp, device=p.device,
                             channels_last=r.config.channels_last, dist=info,
                             best=RunDir(run).best if info.is_main else None,
                             keep_probe_head=r.strategy.trains_from_probe, head_params=r.plan.sizes[groups[-1].name],
                             head_group=groups[-1].name)
        row["elapsed_seconds"] = time.perf_counter() - started
    if cfg.lr == "auto":
        found = range_test(p, r)
        if info.is_main:
            from layerwise.report import plot_lr_find

            plot_lr_find(found, RunDir(run).lr_find_png)
        say(f"lr auto: {found.reason}; base lr {found.suggestion:.2e} (plot: {RunDir(run).lr_find_png})")
        r = resolve(cfg, p.model.facts, dataclasses.replace(ev, lr=found.suggestion))
    return r, row


def probe(cfg: RunConfig, p: Prepared, run: Path, info: DistInfo = DistInfo()) -> tuple[Resolved, Evidence]:
    """auto's linear probe on the frozen model: its evidence (probe.json, the probe's head in
    ``run``) and the resolution it gives."""
    loaded, groups = p.model.loaded, p.model.groups
    head = head_module(loaded.model, groups)
    if head is None:
        raise LayerwiseError(f"auto's probe needs a linear head; {loaded.name} has none")
    res, earlier = probe_result(p)
    ev = probe_evidence(res, head, run, info)
    r = resolve(cfg, p.model.facts, ev)
    record_probe(run, res, earlier, r, info)
    return r, ev


# Probes already run in this process, by everything they read. --model auto probes each
# backbone, then auto probes the chosen one again on the same inputs: the second is the first.
PROBES_KEPT = 8
_probed: OrderedDict[tuple, tuple[ProbeResult, tuple[str, str] | None]] = OrderedDict()


def probe_result(p: Prepared) -> tuple[ProbeResult, tuple[str, str] | None]:
    """The linear probe on ``p``'s freshly built model (run_probe), once per inputs per process."""
    from layerwise.cache import cache_key

    c, loaded = p.resolved.config, p.model.loaded
    key = (loaded.name, loaded.weights, loaded.arch, c.img_size, c.seed, c.batch_size, c.precision, c.channels_last,
           str(p.device), cache_key(p.splits.train, 0), cache_key(p.splits.val, 0))
    if key not in _probed:
        _probed[key] = run_probe(loaded.model, p.model.groups, probe_inputs(p), p.device, p.amp,
                                 channels_last=c.channels_last, quiet=c.quiet)
        while len(_probed) > PROBES_KEPT:
            _probed.popitem(last=False)
    else:
        say(f"auto: {loaded.name}'s probe was already run on these images in this process; its result is reused")
    return _probed[key]


def probe_inputs(p: Prepared) -> ProbeInputs:
    """The probe's data: the training images through the eval transform, and val."""
    c, loaded = p.resolved.config, p.model.loaded
    return ProbeInputs(with_eval_transform(p.loaders.train.dataset, c.img_size, loaded.mean, loaded.std),
                       unsharded(p.loaders.val.dataset), c.batch_size, p.loaders.train.num_workers, c.seed)


def _optimizer(p: Prepared, r: Resolved) -> torch.optim.Optimizer:
    c = r.config
    return build_optimizer(p.model.loaded.model, p.model.groups, r.plan.states(0), name=c.optimizer, lr=c.lr,
                           weight_decay=c.weight_decay, momentum=c.momentum, layer_decay=c.layer_decay)


def build(p: Prepared, r: Resolved, run: Path, info: DistInfo = DistInfo()) -> Trainer:
    """The optimizer, the EMA and the trainer over the final resolution."""
    model = p.model.loaded.model
    ema = None
    if r.config.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(r.config.ema), use_buffers=True)
    # before a resume loads its checkpoint: the penalty's starting point is the model as built
    # every rank's whole training set: a regulariser's statistics must agree across ranks
    start = Start(p.model.loaded.pretrained_head, lambda n: _eval_train_batches(
        unsharded(p.loaders.train.dataset), r.config, p.model.loaded, p.device, p.loaders.train.num_workers, n))
    penalty = make_penalty(r.config.reg, model, p.model.groups, start)
    kit = Kit(p.model.loaded, p.model.groups, _optimizer(p, r), p.amp, p.device, p.loaders, ema, info, penalty)
    return Trainer(r.config, r.plan, kit, p.splits, RunDir(run), budget=r.budget)


def build_trainer(cfg: RunConfig, run: Path, info: DistInfo = DistInfo()) -> Trainer:
    """A trainer without evidence (no probe, no range test): for lr-find, tools and tests."""
    p = prepare(cfg, info)
    return build(p, p.resolved, run, info)


def fit(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, until: float | None = None,
        prepared: Prepared | None = None) -> Path:
    """Train ``cfg`` into its run folder (``cfg.out``); returns the folder.

    A folder that already holds a run is refused unless ``resume`` (continue it) or
    ``overwrite`` (replace it); one process writes a run folder at a time. ``until``: stop
    after that many epochs (a fraction: mid-epoch), checkpointed, as an interruption would
    (auto's race pauses its candidates this way; a resume continues them exactly). ``prepared``: :func:`prepare`'s
    result for ``cfg``, untouched since, when the caller already set up (auto deciding
    against a race)."""
    started = time.perf_counter()
    info = from_env()
    if info.enabled and not cfg.out:
        raise LayerwiseError("distributed runs need --out, so every rank writes to the same run folder")
    run = Path(cfg.out or rundir.default_run_dir())
    cfg = dataclasses.replace(cfg, out=str(run), quiet=cfg.quiet or not info.is_main)
    try:
        with rundir.writer_lock(run) if info.is_main else contextlib.nullcontext():
            if info.is_main and not resume and not overwrite:
                rundir.refuse_existing(run)
            if resume:
                rundir.check_same_data(run, cfg.data)
            if info.is_main:  # the lock is held and the folder is ours to write: a dead writer's temp files go
                rundir.remove_own_temp_files(run)
                if not rundir.holds_run(run):
                    rundir.clear_unstarted(run)
            # Taken before set-up resolves defaults, so compare can predict it from its inputs.
            fingerprint = None if resume else rundir.run_fingerprint(cfg)
            t = _start(cfg, run, info, started, resume=resume, overwrite=overwrite, fingerprint=fingerprint,
                       prepared=prepared)
            return run_epochs(t, info, until=until)
    finally:
        shutdown(info)


def _start(cfg: RunConfig, run: Path, info: DistInfo, started: float, *, resume: bool, overwrite: bool,
           fingerprint: dict | None, prepared: Prepared | None) -> Trainer:
    """Set up, gather the evidence, resolve, build, restore a checkpoint, write the header files."""
    p = prepared or prepare(cfg, info)
    if overwrite and info.is_main:  # only now: a config or data error must not cost the old run
        rundir.clear(run)
    restored = resume and rundir.has_checkpoint(run)
    r, probe_row = decide(cfg, p, run, info, started=started, restored=restored)
    t = build(p, r, run, info)
    t.started = started  # elapsed_seconds counts data and model set-up too
    if probe_row is not None:
        t.state.record(probe_row)
    if restored:
        _check_resumable(run, t)
        t.start_epoch, t.progress = t.load_last()
        if t.state.history:  # elapsed_seconds keeps counting across sittings
            t.started -= t.state.history[-1]["elapsed_seconds"]
    elif resume:
        say(f"resume: {run} has no checkpoint yet (stopped before the first one was written); starting it from step 0")
    recorded = dataclasses.replace(t.cfg, resumed=_resumes(t, run)) if resume else t.cfg
    if info.is_main:
        _sync_logs(t)
        t.run.write_header(config_text=(f"# {t.budget}\n" if t.budget else "") + recorded.to_yaml(),
                           plan=t.plan.to_dict(), fingerprint=fingerprint,
                           model=rundir.model_info(t.kit.loaded, t.cfg, t.splits.classes, len(t.splits.val)))
        with rundir.explain_write_errors(run):
            write_skipped(t.run.skipped, t.splits.skipped)
    _say_start(cfg, t, info)
    if t.cfg.bn == "adapt" and t.state.step == 0:
        n = recalibrate_norms(t.kit.model, _adapt_batches(t))
        say(f"bn adapt: re-estimated BatchNorm statistics on {n} training images")
    return t


def _say_start(cfg: RunConfig, t: Trainer, info: DistInfo) -> None:
    say(_banner(t))
    if cfg.bn is None and t.cfg.bn == "frozen" and _has_slow_groups(t.plan):
        say(f"hint: {t.plan.strategy.name} trains some groups late or at a low LR; with batch statistics in their "
            "BatchNorm layers (--bn frozen, the default) that lost 5-26 points on cifar10-mini. "
            "Try --bn eval (docs/strategies.md).")
    if info.enabled:
        say(f"distributed: {info.world} processes x batch {t.cfg.batch_size} = global batch "
            f"{info.world * t.cfg.batch_size}; the LR is not scaled (set --lr for the global batch)")


def _sync_logs(t: Trainer) -> None:
    """Make the logs say exactly what ``last/`` holds: metrics.jsonl is rewritten from the
    checkpoint's rows (a kill may have come between the checkpoint and its log row), and
    steps of epochs the checkpoint does not cover are dropped (they will be redone)."""
    with rundir.explain_write_errors(t.run.root):
        atomic_write_text(t.run.metrics, "".join(json.dumps(r) + "\n" for r in t.state.history))
        rows = [r for r in read_jsonl(t.run.steps) if r["epoch"] < t.start_epoch]
        atomic_write_text(t.run.steps, "".join(json.dumps(r) + "\n" for r in rows))


def _has_slow_groups(plan: Plan) -> bool:
    """Does some group train at under half the head's LR, or start after epoch 0?"""
    states = [plan.states(e) for e in range(plan.epochs)]
    late = any(not states[0][g].trainable and any(s[g].trainable for s in states) for g in states[0])
    return late or any(st.trainable and st.lr_mult < 0.5 for s in states for st in s.values())


def range_test(p: Prepared, r: Resolved, **kw: Any) -> LRFind:
    """The LR range test in the run's epoch-0 plan, through the run's own training step, on a
    scratch optimizer; the model and the RNG are restored after it (lrfind.py)."""
    c, model, groups = r.config, p.model.loaded.model, p.model.groups
    optimizer = _optimizer(p, r)
    states = r.plan.states(0)
    set_trainable(model, groups, {n: st.trainable for n, st in states.items()}, bn=c.bn)
    apply_states(optimizer, states, lr=r.plan.lr, weight_decay=r.plan.weight_decay)
    set_train_side(p.loaders, c, r.plan.train_size(0), p.model.loaded.mean, p.model.loaded.std)
    return lr_find(model, optimizer, p.loaders.train,
                   lambda batch: train_step(model, batch, optimizer, p.amp, p.device, channels_last=c.channels_last,
                                            clip_grad=c.clip_grad),
                   quiet=c.quiet, **kw)


def find_lr(cfg: RunConfig, out: Path, **kw: Any) -> tuple[LRFind, dict[str, float]]:
    """``layerwise lr-find``: the range test, its plot and JSON in ``out``, and each group's
    LR multiplier (the ratios the test held fixed)."""
    from layerwise.report import plot_lr_find

    p = prepare(cfg)
    res = range_test(p, p.resolved, **kw)
    out.mkdir(parents=True, exist_ok=True)
    write_json(RunDir(out).lr_find_json, res.to_dict())
    plot_lr_find(res, RunDir(out).lr_find_png)
    states = p.resolved.plan.states(0)
    return res, {g: states[g].lr_mult for g in states}


def _adapt_batches(t: Trainer, max_images: int = 2048) -> Iterator[torch.Tensor]:
    """Training images through the deterministic eval transform, for BN re-estimation (this rank's shard)."""
    for x, _ in _eval_train_batches(t.kit.loaders.train.dataset, t.cfg, t.kit.loaded, t.kit.device,
                                    t.kit.loaders.train.num_workers, max_images):
        yield x


def _eval_train_batches(ds: torch.utils.data.Dataset, cfg: RunConfig, loaded: LoadedModel, device: torch.device,
                        workers: int, max_images: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``max_images`` of ``ds``'s training images spread over the classes (the list is in
    class order), through the eval transform, with their labels, on ``device``."""
    ds = with_eval_transform(ds, cfg.img_size, loaded.mean, loaded.std)
    ds = torch.utils.data.Subset(ds, spread(len(ds), max_images))
    for x, y in ordered_loader(ds, cfg.batch_size, workers):
        yield to_device(x, device, cfg.channels_last), y.to(device)


def _check_resumable(run: Path, t: Trainer) -> None:
    saved = RunDir(run).model_info()
    now = rundir.model_info(t.kit.loaded, t.cfg, t.splits.classes, len(t.splits.val))
    for key in ("arch", "num_classes", "classes", "head"):
        if saved[key] != now[key]:
            raise LayerwiseError(f"cannot resume {run}: it was trained with {key} {saved[key]!r}, "
                                 f"this data/config gives {now[key]!r}; start a new run with --out")


def _resumes(t: Trainer, run: Path) -> list[dict[str, Any]]:
    """config.yaml keeps each resume's changed settings and the epoch/step they took effect."""
    saved = config_from(load_yaml(RunDir(run).config))
    changed = {k: getattr(t.cfg, k) for k in RESUME_OVERRIDABLE
               if k not in _RESUME_IGNORED and getattr(t.cfg, k) != getattr(saved, k)}
    if not changed:
        return saved.resumed
    say(f"resume: from epoch {t.start_epoch} (step {t.state.step}) with "
        + ", ".join(f"{k} {getattr(saved, k)!r} -> {v!r}" for k, v in changed.items()))
    return [*saved.resumed, {"epoch": t.start_epoch, "step": t.state.step, "changed": changed}]


def _banner(t: Trainer) -> str:
    sp, loaded = t.splits, t.kit.loaded
    lines = [f"data: {sp.name} · {len(sp.train)} train / {len(sp.val)} val images · {len(sp.classes)} classes",
             f"model: {loaded.name} ({loaded.source} {loaded.arch}) · weights {loaded.weights} · "
             f"{describe_sizes(t.plan.train_sizes, t.cfg.img_size)} · {t.kit.device} · {t.kit.amp.precision} · "
             f"bn {t.cfg.bn}"]
    lines += loaded.notes
    return "\n".join(lines + [t.plan.table(), ""])

"""A whole ``fit``: data and model set-up, the run folder, auto's probe, ``--lr auto``, the
epochs (each trained by :mod:`layerwise.trainer`), the final evaluation and the report.

This is the one module that knows the :class:`~layerwise.trainer.Trainer`; the probe, the LR
range test and the training step take explicit inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from layerwise import rundir
from layerwise.autostart import begin_at_probe, probe_for_auto, wants_probe
from layerwise.budget import epochs_without_gain, resolve_budget
from layerwise.checkpoint import append_jsonl, atomic_write_text, load_weights, read_jsonl, save_weights, write_json
from layerwise.config import CHECK_DATA_AUTO_LIMIT, RunConfig, from_mapping, load_yaml
from layerwise.data import DEFAULT_IMG_SIZE, Splits, drop_unreadable, load_splits, write_skipped
from layerwise.distributed import DistInfo, from_env, params_in_sync, shutdown
from layerwise.errors import LayerwiseError
from layerwise.evaluation import EvalResult, evaluate, evaluate_features, gather_eval
from layerwise.freeze import recalibrate_norms
from layerwise.hardware import Amp, pick_device, to_device
from layerwise.loaders import make_loaders, ordered_loader, with_eval_transform
from layerwise.lrfind import LRFind, lr_find, plot_lr_find
from layerwise.numerics import fastest_numerics
from layerwise.optim import build_optimizer
from layerwise.plan import Plan, Setup, setup
from layerwise.progress import bar, say
from layerwise.resolution import describe as describe_sizes
from layerwise.rng import epoch_seed, seed_everything
from layerwise.step import train_step
from layerwise.trainer import EpochProgress, Interrupted, StopRequested, Trainer, check_finite

# What --resume may change: how far and how fast to go, and what to do about divergence.
# Anything else would make the checkpoint and the config disagree.
RESUME_OVERRIDABLE = ("epochs", "lr", "clip_grad", "precision", "nan", "patience", "checkpoint_every",
                      "quiet", "workers", "device")
_RESUME_IGNORED = ("quiet", "workers", "device")  # where the run executes, not what it computes

__all__ = ["RESUME_OVERRIDABLE", "Interrupted", "build_trainer", "find_lr", "fit", "prepare"]


def prepare(cfg: RunConfig) -> tuple[Setup, Splits]:
    """The data (unreadable files dropped) and the model, groups and plan over it."""
    splits = load_splits(cfg.data, val_split=cfg.val_split, seed=cfg.seed)
    drop_unreadable(splits, check=cfg.check_data, limit=CHECK_DATA_AUTO_LIMIT, progress=not cfg.quiet)
    if splits.skipped:
        say(f"warning: skipped {len(splits.skipped)} unreadable image(s); the run folder's {rundir.SKIPPED} lists them")
    if cfg.data is None:  # 8x8 digits: upscale a little, and never flip or crop them
        cfg = dataclasses.replace(cfg, img_size=cfg.img_size or DEFAULT_IMG_SIZE, augment=cfg.augment or "none")
    cfg, why = resolve_budget(cfg, len(splits.train))
    if why:
        say(why)
    seed_everything(cfg.seed)  # the new head's initial weights depend on it
    s = setup(cfg, len(splits.classes), images_per_class=splits.images_per_class)
    s.budget = why
    return s, splits


def build_trainer(cfg: RunConfig, run: Path, info: DistInfo = DistInfo()) -> Trainer:
    s, splits = prepare(cfg)
    cfg = s.config
    if cfg.batch_size == 1 and cfg.bn != "eval" and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in s.loaded.model.modules()):
        raise LayerwiseError(f"--batch-size 1 cannot train {s.loaded.name}'s BatchNorm layers on batch statistics "
                             "(one value per channel); use --batch-size 2 or more, or --bn eval")
    device = pick_device(cfg.device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    model = s.loaded.model.to(device)
    fast = fastest_numerics(cfg.precision, cfg.channels_last, model, device, model_name=cfg.model,
                            img_size=cfg.final_train_size(), batch=cfg.batch_size,
                            num_classes=len(splits.classes), cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
                            distributed=info.enabled)
    cfg = dataclasses.replace(cfg, precision=fast.precision, channels_last=fast.channels_last)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, s.groups, s.plan.states(0), name=cfg.optimizer, lr=cfg.lr,
                                weight_decay=cfg.weight_decay, momentum=cfg.momentum, layer_decay=cfg.layer_decay)
    loaders = make_loaders(splits, cfg, s.loaded.mean, s.loaded.std, info)
    s.plan = dataclasses.replace(s.plan, steps_per_epoch=len(loaders.train))
    ema = None
    if cfg.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    amp = Amp(cfg.precision, device, model)
    cfg = dataclasses.replace(cfg, precision=amp.precision)  # config.yaml records what ran
    return Trainer(cfg, s, splits, run, device, amp, optimizer, loaders, ema, dist=info)


def fit(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train ``cfg`` into its run folder (``cfg.out``); returns the folder.

    A folder that already holds a run is refused unless ``resume`` (continue it) or
    ``overwrite`` (replace it); one process writes a run folder at a time."""
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
            # Taken before set-up resolves defaults, so compare can predict it from its inputs.
            fingerprint = None if resume else rundir.run_fingerprint(cfg)
            t = _start(cfg, run, info, started, resume=resume, overwrite=overwrite, fingerprint=fingerprint)
            return _train(t, run, info)
    finally:
        shutdown(info)


def _start(cfg: RunConfig, run: Path, info: DistInfo, started: float, *, resume: bool, overwrite: bool,
           fingerprint: dict | None) -> Trainer:
    """Build, probe, find the LR, restore a checkpoint and write the run's header files."""
    auto_lr = cfg.lr == "auto"
    t = build_trainer(dataclasses.replace(cfg, lr=1e-3) if auto_lr else cfg, run, info)
    t.started = started  # elapsed_seconds counts data and model set-up too
    if overwrite and info.is_main:  # only now: a config or data error must not cost the old run
        rundir.clear(run)
    restored = resume and rundir.has_checkpoint(run)
    if wants_probe(t):
        probe_for_auto(t, run, user_bn=cfg.bn)
    if t.cfg.probe_head and not restored:
        begin_at_probe(t)
    if auto_lr:
        _use_found_lr(t, run)
    t.start_epoch, t.progress = 0, None
    if restored:
        _check_resumable(run, t)
        t.start_epoch, t.progress = t.load_last()
        if t.history:  # elapsed_seconds keeps counting across sittings
            t.started -= t.history[-1]["elapsed_seconds"]
    elif resume:
        say(f"resume: {run} has no checkpoint yet (stopped before the first one was written); starting it from step 0")
    if resume:
        _record_resume(t, run)
    if info.is_main:
        _sync_logs(t)
        with rundir.explain_write_errors(run):
            atomic_write_text(run / rundir.CONFIG, (f"# {t.s.budget}\n" if t.s.budget else "") + t.cfg.to_yaml())
            write_json(run / rundir.PLAN, t.s.plan.to_dict())
            write_json(run / rundir.MODEL, rundir.model_info(t.s.loaded, t.cfg, t.splits.classes, len(t.splits.val)))
            write_skipped(run / rundir.SKIPPED, t.splits.skipped)
            if fingerprint is not None:
                write_json(run / rundir.FINGERPRINT, fingerprint)
    say(_banner(t))
    if cfg.bn is None and t.cfg.bn == "frozen" and _has_slow_groups(t.s.plan):
        say(f"hint: {t.s.plan.strategy.name} trains some groups late or at a low LR; with batch statistics in their "
            "BatchNorm layers (--bn frozen, the default) that lost 5-26 points on cifar10-mini. "
            "Try --bn eval (docs/strategies.md).")
    if info.enabled:
        say(f"distributed: {info.world} processes x batch {t.cfg.batch_size} = global batch "
            f"{info.world * t.cfg.batch_size}; the LR is not scaled (set --lr for the global batch)")
    if t.cfg.bn == "adapt" and t.step == 0:
        n = recalibrate_norms(t.model, _adapt_batches(t))
        say(f"bn adapt: re-estimated BatchNorm statistics on {n} training images")
    return t


def _train(t: Trainer, run: Path, info: DistInfo) -> Path:
    """The epochs, then the best weights evaluated and the report written."""
    writer = _tensorboard(run) if info.is_main else None
    with StopRequested(install=not info.enabled) as stop:
        try:
            for epoch in range(t.start_epoch, t.cfg.epochs):
                if _train_and_log(t, epoch, stop, writer, t.progress if epoch == t.start_epoch else None):
                    say(f"early stopping: val accuracy has not improved for {t.cfg.patience} epochs")
                    break
                if t.cfg.time_budget and time.perf_counter() - t.started >= t.cfg.time_budget:
                    say(f"time budget of {t.cfg.time_budget:.0f}s spent after epoch {epoch + 1}")
                    break
        except Interrupted:
            say(f"\ninterrupted: last/ holds the run up to the last step. Resume with: layerwise fit --resume {run}")
            raise
    from layerwise.report import write_run_report

    if not params_in_sync(t.model, info):
        raise LayerwiseError("ranks ended with different weights; this is a bug in the distributed set-up")
    if info.enabled:
        say(f"ranks in sync: all {info.world} processes hold identical weights")
    best = _final_eval(t)
    if info.is_main:
        with rundir.explain_write_errors(run):
            write_run_report(run, t.splits.classes, best)
    say(f"best val accuracy {t.best_acc:.4f} (epoch {t.best_epoch})\nrun folder: {run}\nreport: {run / rundir.REPORT}")
    return run


def _sync_logs(t: Trainer) -> None:
    """Make the logs say exactly what ``last/`` holds: metrics.jsonl is rewritten from the
    checkpoint's rows (a kill may have come between the checkpoint and its log row), and
    steps of epochs the checkpoint does not cover are dropped (they will be redone)."""
    with rundir.explain_write_errors(t.run):
        atomic_write_text(t.run / rundir.METRICS, "".join(json.dumps(r) + "\n" for r in t.history))
        rows = [r for r in read_jsonl(t.run / rundir.STEPS) if r["epoch"] < t.start_epoch]
        atomic_write_text(t.run / rundir.STEPS, "".join(json.dumps(r) + "\n" for r in rows))


def _has_slow_groups(plan: Plan) -> bool:
    """Does some group train at under half the head's LR, or start after epoch 0?"""
    states = [plan.states(e) for e in range(plan.epochs)]
    late = any(not states[0][g].trainable and any(s[g].trainable for s in states) for g in states[0])
    return late or any(st.trainable and st.lr_mult < 0.5 for s in states for st in s.values())


def range_test(t: Trainer, **kw: float) -> LRFind:
    """The LR range test in the run's epoch-0 plan, through the run's own training step."""
    t.apply_plan(0)
    net = t.net or t.model
    return lr_find(t.model, t.optimizer, t.loaders.train,
                   lambda batch: train_step(net, batch, t.optimizer, t.amp, t.device, channels_last=t.cfg.channels_last,
                                            clip_grad=t.cfg.clip_grad),
                   quiet=t.cfg.quiet, **kw)


def find_lr(cfg: RunConfig, out: Path, **kw: float) -> tuple[LRFind, dict[str, float]]:
    """``layerwise lr-find``: the range test, its plot and JSON in ``out``, and each group's
    LR multiplier (the ratios the test held fixed)."""
    t = build_trainer(cfg if cfg.lr != "auto" else dataclasses.replace(cfg, lr=1e-3), out)
    res = range_test(t, **kw)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / rundir.LR_FIND_JSON, res.to_dict())
    plot_lr_find(res, out / rundir.LR_FIND_PNG)
    return res, {g: t.s.plan.states(0)[g].lr_mult for g in t.s.plan.states(0)}


def _use_found_lr(t: Trainer, run: Path) -> None:
    """``--lr auto``: the LR range test picks the base LR; config.yaml records the value."""
    res = range_test(t)
    t.cfg = dataclasses.replace(t.cfg, lr=res.suggestion)
    t.s.plan = dataclasses.replace(t.s.plan, lr=res.suggestion)
    if t.dist.is_main:
        plot_lr_find(res, run / rundir.LR_FIND_PNG)
    say(f"lr auto: {res.reason}; base lr {res.suggestion:.2e} (plot: {run / rundir.LR_FIND_PNG})")


def _adapt_batches(t: Trainer, max_images: int = 2048) -> Iterator[torch.Tensor]:
    """Training images through the deterministic eval transform, for BN re-estimation."""
    ds = with_eval_transform(t.loaders.train.dataset, t.cfg.img_size, t.s.loaded.mean, t.s.loaded.std)
    seen = 0
    for x, _ in ordered_loader(ds, t.cfg.batch_size, t.loaders.train.num_workers):
        if seen >= max_images:
            break
        seen += x.shape[0]
        yield to_device(x, t.device, t.cfg.channels_last)


def _check_resumable(run: Path, t: Trainer) -> None:
    saved = rundir.read_model_info(run)
    now = rundir.model_info(t.s.loaded, t.cfg, t.splits.classes, len(t.splits.val))
    for key in ("arch", "num_classes", "classes", "head"):
        if saved[key] != now[key]:
            raise LayerwiseError(f"cannot resume {run}: it was trained with {key} {saved[key]!r}, "
                                 f"this data/config gives {now[key]!r}; start a new run with --out")


def _record_resume(t: Trainer, run: Path) -> None:
    """config.yaml keeps each resume's changed settings and the epoch/step they took effect."""
    saved = from_mapping(load_yaml(run / rundir.CONFIG))
    changed = {k: getattr(t.cfg, k) for k in RESUME_OVERRIDABLE
               if k not in _RESUME_IGNORED and getattr(t.cfg, k) != getattr(saved, k)}
    resumed = saved.resumed
    if changed:
        resumed = [*resumed, {"epoch": t.start_epoch, "step": t.step, "changed": changed}]
        say(f"resume: from epoch {t.start_epoch} (step {t.step}) with "
            + ", ".join(f"{k} {getattr(saved, k)!r} -> {v!r}" for k, v in changed.items()))
    t.cfg = dataclasses.replace(t.cfg, resumed=resumed)


def _train_and_log(t: Trainer, epoch: int, stop: StopRequested, writer: Any,
                   progress: EpochProgress | None = None) -> bool:
    """One epoch: plan, train, validate, log, checkpoint. Returns True to stop early."""
    cfg = t.cfg
    seed_everything(epoch_seed(cfg.seed, epoch))
    t.loaders.reseed(epoch_seed(cfg.seed, epoch))
    t.apply_plan(epoch)
    first = progress.start_step if progress else t.step
    lr_start = t.s.plan.lrs_at(epoch, first)
    tic = time.perf_counter()
    cut = t.cut(epoch)
    if cut is not None:
        store = t.store_for(cut)  # built in the first epoch of this cut, and counted in its time
        batches = _progress(store.batches(epoch, cfg.batch_size, t.loaders.generator, t.loaders.train.drop_last),
                            epoch, cfg.epochs, cfg.quiet, len(t.loaders.train))
        tr = t.train_epoch(epoch, stop, batches, progress, forward=cut.suffix)
    else:
        t.features = None  # the trainable set reaches the cut: cached inputs are stale
        tr = t.train_epoch(epoch, stop, _progress(t.loaders.train, epoch, cfg.epochs, cfg.quiet), progress)
    train_s = time.perf_counter() - tic
    if cut is not None and t.features is not None and t.ema is None:
        ev = evaluate_features(cut.suffix, t.features.val, t.features.val_labels, t.amp, t.device,
                               batch_size=1024 if cut.key == "head" else cfg.batch_size)
    else:
        ev = gather_eval(evaluate(t.eval_model(), t.loaders.val, t.amp, t.device, channels_last=cfg.channels_last),
                         t.dist)
    row = {
        "epoch": epoch, "train_loss": tr["train_loss"], "train_acc": tr["train_acc"], "val_loss": ev.loss,
        "val_acc": ev.acc, "lr": lr_start, "train_size": t.train_side,
        "cached_inputs": cut.key if cut is not None else None, "trainable_params": t.s.plan.trainable_params(epoch),
        "trainable_groups": t.s.plan.trainable_groups(epoch), "epoch_seconds": time.perf_counter() - tic,
        "images_per_second": tr["images"] / max(train_s, 1e-9), "elapsed_seconds": time.perf_counter() - t.started,
    }
    improved = ev.acc > t.best_acc
    if improved:
        t.best_acc, t.best_epoch = ev.acc, epoch
        check_finite(t.eval_model(), t.step, t.run)
        if t.dist.is_main:
            with rundir.explain_write_errors(t.run):
                save_weights(t.run / rundir.BEST, t.eval_model())
    t.history.append(row)
    t.save_last(epoch)  # the checkpoint first: the log never names an epoch the checkpoint lacks
    if t.dist.is_main:
        with rundir.explain_write_errors(t.run):
            append_jsonl(t.run / rundir.METRICS, row)
    if writer is not None:
        for k in ("train_loss", "train_acc", "val_loss", "val_acc", "images_per_second"):
            writer.add_scalar(k, row[k], epoch)
    say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {tr['train_loss']:.4f} acc {tr['train_acc']:.4f} · "
        f"val loss {ev.loss:.4f} acc {ev.acc:.4f} · {row['images_per_second']:.0f} img/s" + (" · best" if improved else ""))
    return bool(cfg.patience) and epochs_without_gain(t.history) >= cfg.patience


def _final_eval(t: Trainer) -> EvalResult:
    """Reload the best weights and evaluate them, with ``--tta`` views if given (for the
    report's confusion matrix)."""
    model = t.eval_model()
    if t.dist.enabled:
        torch.distributed.barrier()  # rank 0 has written best.safetensors
    load_weights(t.run / rundir.BEST, model)
    ev = gather_eval(evaluate(model, t.loaders.val, t.amp, t.device, views=t.cfg.tta,
                              channels_last=t.cfg.channels_last), t.dist)
    if t.cfg.tta:
        say(f"best weights with TTA {', '.join(t.cfg.tta)}: val accuracy {ev.acc:.4f}")
        if t.dist.is_main:
            write_json(t.run / rundir.TTA, {"views": t.cfg.tta, "val_acc": ev.acc, "val_loss": ev.loss})
    return ev


def _progress(batches: Iterator, epoch: int, epochs: int, quiet: bool, total: int | None = None) -> Iterator:
    return bar(batches, f"epoch {epoch + 1}/{epochs}", enabled=not quiet, total=total, unit="batch", leave=True)


def _banner(t: Trainer) -> str:
    sp, s = t.splits, t.s
    lines = [f"data: {sp.name} · {len(sp.train)} train / {len(sp.val)} val images · {len(sp.classes)} classes",
             f"model: {s.loaded.name} ({s.loaded.source} {s.loaded.arch}) · weights {s.loaded.weights} · "
             f"{describe_sizes(s.plan.train_sizes, t.cfg.img_size)} · {t.device} · {t.amp.precision} · bn {t.cfg.bn}"]
    lines += s.loaded.notes
    return "\n".join(lines + [s.plan.table(), ""])


def _tensorboard(run: Path) -> Any:  # a SummaryWriter, or None without the optional tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run / "tb"))

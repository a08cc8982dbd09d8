"""The epochs of a built run: each one planned, trained, validated, logged and checkpointed;
then the best weights evaluated and the report written. Reads the run's fixed plan and config."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from layerwise import rundir
from layerwise.budget import epochs_without_gain
from layerwise.checkpoint import load_weights, save_weights, write_json
from layerwise.distributed import DistInfo, params_in_sync
from layerwise.errors import LayerwiseError
from layerwise.evaluation import EvalResult, evaluate, evaluate_features, gather_eval
from layerwise.progress import bar, say
from layerwise.rng import epoch_seed, seed_everything
from layerwise.trainer import EpochProgress, Interrupted, Paused, StopRequested, Trainer, check_finite


def run_epochs(t: Trainer, info: DistInfo, until: float | None = None) -> Path:
    """The epochs, then the best weights evaluated and the report written. ``until``: pause
    after that many epochs instead, a fraction of one mid-epoch (the checkpoint holds the run;
    a resume continues it exactly)."""
    run = t.run
    writer = _tensorboard(run.root) if info.is_main else None
    with contextlib.closing(writer) if writer is not None else contextlib.nullcontext(), \
            StopRequested(install=not info.enabled) as stop:  # closed: its events flushed however the loop ends
        try:
            for epoch in range(t.start_epoch, t.cfg.epochs):
                if until is not None and epoch >= until:
                    return run.root
                progress = t.progress if epoch == t.start_epoch else None
                pause_at = pause_batch(until, epoch, len(t.kit.loaders.train))
                if pause_at is not None and progress is not None and progress.batches >= pause_at:
                    return run.root  # paused there already: a resume to the same point trains nothing
                row = epoch_row(t, epoch, stop, progress, pause_at)
                if _record(t, row, writer):
                    say(f"early stopping: val accuracy has not improved for {t.cfg.patience} epochs")
                    break
                if t.cfg.time_budget and time.perf_counter() - t.started >= t.cfg.time_budget:
                    say(f"time budget of {t.cfg.time_budget:.0f}s spent after epoch {epoch + 1}")
                    break
        except Paused:
            return run.root
        except Interrupted:
            say(f"\ninterrupted: last/ holds the run up to the last step. Resume with: layerwise fit --resume {run}")
            raise
    from layerwise.report import write_run_report

    if not params_in_sync(t.kit.model, info):
        raise LayerwiseError("ranks ended with different weights; this is a bug in the distributed set-up")
    if info.enabled:
        say(f"ranks in sync: all {info.world} processes hold identical weights")
    best = _final_eval(t)
    test = _test_eval(t) if t.splits.test else None
    if info.is_main:
        with rundir.explain_write_errors(run.root):
            write_run_report(run.root, t.splits.classes, best, test=test)
    say(f"best val accuracy {t.state.best_acc:.4f} (epoch {t.state.best_epoch})\nrun folder: {run}\nreport: {run.report}")
    return run.root


def pause_batch(until: float | None, epoch: int, batches: int) -> int | None:
    """The batch of ``epoch`` after which to pause, when ``until`` ends inside it (0.5: after
    half of epoch 0's batches, rounded up, at least one); None when it does not."""
    if until is None or not epoch < until < epoch + 1:
        return None
    return max(1, math.ceil((until - epoch) * batches))


def epoch_row(t: Trainer, epoch: int, stop: StopRequested, progress: EpochProgress | None = None,
              pause_at: int | None = None) -> dict:
    """One epoch planned, trained and validated: its metrics row (``progress`` resumes it;
    ``pause_at``: :func:`pause_batch`, which raises Paused there)."""
    cfg = t.cfg
    seed_everything(epoch_seed(cfg.seed, epoch))
    t.kit.loaders.reseed(epoch_seed(cfg.seed, epoch))
    t.apply_plan(epoch)
    first = progress.start_step if progress else t.state.step
    lr_start = t.plan.lrs_at(epoch, first)
    tic = time.perf_counter()
    cut = t.cut(epoch)
    if cut is not None:
        store = t.store_for(cut)  # built in the first epoch of this cut, and counted in its time
        loaders = t.kit.loaders
        batches = _progress(store.batches(epoch, cfg.batch_size, loaders.generator, loaders.train.drop_last),
                            epoch, cfg.epochs, cfg.quiet, len(loaders.train))
        tr = t.train_epoch(epoch, stop, batches, progress, forward=cut.suffix, pause_at=pause_at)
    else:
        t.features = None  # the trainable set reaches the cut: cached inputs are stale
        tr = t.train_epoch(epoch, stop, _progress(t.kit.loaders.train, epoch, cfg.epochs, cfg.quiet), progress,
                           pause_at=pause_at)
    train_s = time.perf_counter() - tic
    if cut is not None and t.features is not None and t.kit.ema is None:
        ev = evaluate_features(cut.suffix, t.features.val, t.features.val_labels, t.kit.amp, t.kit.device,
                               batch_size=1024 if cut.key == "head" else cfg.batch_size)
    else:
        ev = gather_eval(evaluate(t.kit.eval_model(), t.kit.loaders.val, t.kit.amp, t.kit.device,
                                  channels_last=cfg.channels_last), t.kit.dist)
    row = {
        "epoch": epoch, "train_loss": tr["train_loss"], "train_acc": tr["train_acc"], "val_loss": ev.loss,
        "val_acc": ev.acc, "lr": lr_start, "train_size": t.train_side,
        "cached_inputs": cut.key if cut is not None else None, "trainable_params": t.plan.trainable_params(epoch),
        "trainable_groups": t.plan.trainable_groups(epoch), "epoch_seconds": time.perf_counter() - tic,
        "images_per_second": tr["images"] / max(train_s, 1e-9), "elapsed_seconds": time.perf_counter() - t.started,
    }
    return row


def _record(t: Trainer, row: dict, writer: Any) -> bool:
    """An epoch's row into the state, best.safetensors, the checkpoint and the logs, in that
    order: the log never names an epoch the checkpoint lacks. Returns True to stop early."""
    cfg, epoch = t.cfg, row["epoch"]
    improved = t.state.record(row)
    if improved:
        check_finite(t.kit.eval_model(), t.state.step, t.run)
        if t.kit.dist.is_main:
            with rundir.explain_write_errors(t.run.root):
                save_weights(t.run.best, t.kit.eval_model())
    t.save_last(epoch)
    if t.kit.dist.is_main:
        t.run.append_metrics(row)
    if writer is not None:
        for k in ("train_loss", "train_acc", "val_loss", "val_acc", "images_per_second"):
            writer.add_scalar(k, row[k], epoch)
    say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} · "
        f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} · {row['images_per_second']:.0f} img/s"
        + (" · best" if improved else ""))
    return bool(cfg.patience) and epochs_without_gain(t.state.history) >= cfg.patience


def _final_eval(t: Trainer) -> EvalResult:
    """Reload the best weights and evaluate them, with ``--tta`` views if given (for the
    report's confusion matrix)."""
    model = t.kit.eval_model()
    if t.kit.dist.enabled:
        torch.distributed.barrier()  # rank 0 has written best.safetensors
    load_weights(t.run.best, model)
    ev = gather_eval(evaluate(model, t.kit.loaders.val, t.kit.amp, t.kit.device, views=t.cfg.tta,
                              channels_last=t.cfg.channels_last), t.kit.dist)
    if t.cfg.tta:
        say(f"best weights with TTA {', '.join(t.cfg.tta)}: val accuracy {ev.acc:.4f}")
        if t.kit.dist.is_main:
            write_json(t.run.tta, {"views": t.cfg.tta, "val_acc": ev.acc, "val_loss": ev.loss})
    return ev


def _test_eval(t: Trainer) -> dict | None:
    """The best weights (as _final_eval left them loaded) on DATA/test, once, at the end:
    recorded apart from val, which made every choice (strategy, epoch, threshold)."""
    from layerwise.augment import eval_transform
    from layerwise.data import check_images
    from layerwise.evaluation import evaluate_images, score_test

    items, skipped = check_images(t.splits.test)
    if not items:
        say(f"warning: DATA/test has no readable image ({len(skipped)} skipped); no test accuracy")
        return None
    tf = eval_transform(t.cfg.img_size, t.kit.loaded.mean, t.kit.loaded.std)
    result = score_test(lambda views: evaluate_images(t.kit.eval_model(), items, tf, t.kit.amp, t.kit.device,
                                                      batch_size=t.cfg.batch_size, views=views,
                                                      channels_last=t.cfg.channels_last),
                        items, skipped, t.cfg.tta)
    say(f"test accuracy {result['test_acc']:.4f} on {len(items)} images of DATA/test (never used for a choice)"
        + (f"; {result['without_views']['test_acc']:.4f} without TTA" if "without_views" in result else ""))
    if t.kit.dist.is_main:
        write_json(t.run.test, result)
    return result


def _progress(batches: Iterator, epoch: int, epochs: int, quiet: bool, total: int | None = None) -> Iterator:
    return bar(batches, f"epoch {epoch + 1}/{epochs}", enabled=not quiet, total=total, unit="batch", leave=True)


def _tensorboard(run: Path) -> Any:  # a SummaryWriter, or None without the optional tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run / "tb"))

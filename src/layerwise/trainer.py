"""The training loop of one run: the plan applied each epoch, one training step, checkpoints.

Each epoch reseeds every RNG from ``(seed, epoch)``, so resuming from ``last/`` replays
exactly what an uninterrupted run would have done; a checkpoint taken inside an epoch also
holds the position in it and the RNG state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from layerwise import rundir
from layerwise.augment import mix_batch
from layerwise.checkpoint import load_state, read_jsonl, save_state, state_dict_cpu
from layerwise.config import RunConfig, checkpoint_interval
from layerwise.data import Splits
from layerwise.distributed import DistInfo, all_sum
from layerwise.errors import LayerwiseError
from layerwise.features import Cut, FeatureStore, cache_allowed, head_cut, prefix_cut
from layerwise.freeze import set_trainable
from layerwise.groups import LayerGroup, head_module
from layerwise.hardware import Amp, to_device
from layerwise.loaders import Loaders, ordered_loader, set_train_side
from layerwise.models import LoadedModel
from layerwise.optim import apply_states, lr_by_group, lr_scale, set_lr_scale
from layerwise.plan import Plan
from layerwise.progress import say
from layerwise.rng import get_rng, set_rng
from layerwise.rundir import RunDir
from layerwise.step import train_step


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop stops after the current step."""

    def __init__(self, install: bool = True) -> None:
        self.flag = False
        self.install = install  # under torchrun the launcher owns the signals
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopRequested:
        for sig in (signal.SIGINT, signal.SIGTERM) if self.install else ():
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.flag:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Interrupted(Exception):
    """Training stopped on a signal; ``last/`` holds the last completed epoch."""


class Paused(Exception):
    """Training reached the step it was asked to pause at, mid-epoch (auto's race, a rung
    shorter than an epoch); ``last/`` holds it, and a resume continues it exactly."""


# --nan skip stops after this many non-finite batches in a row: the weights are gone by then.
MAX_SKIPPED_IN_A_ROW = 10


class NonFiniteError(LayerwiseError):
    """The loss or the weights became NaN/inf; nothing non-finite was saved."""

    def __init__(self, what: str, run: RunDir | Path) -> None:
        super().__init__(
            f"{what}. Nothing non-finite was saved: last/ keeps the last good state. Lower the LR, clip gradients "
            f"or train in fp32, then continue: layerwise fit --resume {run} --lr 1e-4 --clip-grad 1.0 "
            "--precision fp32 (resume accepts --lr, --clip-grad, --precision and --nan)")


def check_finite(model: nn.Module, step: int, run: RunDir | Path) -> None:
    """Never write NaN/inf weights or statistics (BatchNorm's running mean and variance are
    buffers): a checkpoint must always be worth resuming from."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    if not all(torch.isfinite(x).all() for x in tensors):
        raise NonFiniteError(f"the weights or normalisation statistics became non-finite by step {step}", run)


@dataclass(frozen=True)
class Kit:
    """What a run trains with, fixed once built: the model, its groups, the optimizer, the
    numerics, the device, the loaders, the EMA and the process group."""

    loaded: LoadedModel
    groups: tuple[LayerGroup, ...]
    optimizer: torch.optim.Optimizer
    amp: Amp
    device: torch.device
    loaders: Loaders
    ema: torch.optim.swa_utils.AveragedModel | None = None
    dist: DistInfo = DistInfo()
    penalty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # --reg: added to every step's loss

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    def eval_model(self) -> nn.Module:
        """What validation and best.safetensors use: the EMA's weights when there is one."""
        return self.ema.module if self.ema is not None else self.model


@dataclass
class RunState:
    """Where the run is and what it has seen: exactly what a checkpoint holds besides the
    weights, the optimizer and a mid-epoch position (with its RNG)."""

    step: int = 0
    best_acc: float = -1.0
    best_epoch: int = -1
    history: list[dict] = dataclasses.field(default_factory=list)  # metrics rows, the probe's first

    def record(self, row: dict) -> bool:
        """Append an epoch's row; True when its val accuracy is the best so far."""
        self.history.append(row)
        if row["val_acc"] > self.best_acc:
            self.best_acc, self.best_epoch = row["val_acc"], row["epoch"]
            return True
        return False


@dataclass
class Trainer:
    """One run while it trains: the resolved config and plan (never replaced: resolve.py
    decided them), the kit, the run state, and what the loop keeps between steps."""

    cfg: RunConfig
    plan: Plan
    kit: Kit
    splits: Splits
    run: RunDir
    state: RunState = dataclasses.field(default_factory=RunState)
    budget: str = ""  # why the epochs and batch size are what they are (config.yaml's first line)
    started: float = dataclasses.field(default_factory=time.perf_counter)
    start_epoch: int = 0  # where this sitting starts (a resume: after the checkpoint's epoch)
    progress: EpochProgress | None = None  # a checkpoint's position inside start_epoch
    # the loop's working memory, rebuilt on a resume
    features: FeatureStore | None = None
    cuts: dict[int, Cut | None] = dataclasses.field(default_factory=dict)  # first trainable group -> its prefix cut
    net: nn.Module | None = None  # what runs the forward pass: the model, or its DDP wrapper
    wrapped_for: tuple[str, ...] = ()
    nan_run: int = 0  # consecutive batches with a non-finite loss
    saved_at: float = dataclasses.field(default_factory=time.perf_counter)
    train_side: int | None = None  # the side the training transform crops to now

    def lr_scale(self) -> float:
        """The schedule's scale at this step: the plan's, so the LRs it shows are the ones used."""
        plan = self.plan
        return lr_scale(plan.scheduler, self.state.step, plan.spec())

    def apply_plan(self, epoch: int) -> None:
        states = self.plan.states(epoch)
        set_trainable(self.kit.model, self.kit.groups, {n: st.trainable for n, st in states.items()}, bn=self.cfg.bn)
        apply_states(self.kit.optimizer, states, lr=self.plan.lr, weight_decay=self.plan.weight_decay)
        self.wrap(tuple(self.plan.trainable_groups(epoch)))
        side = self.plan.train_size(epoch)
        if side is not None and side != self.train_side:  # progressive resizing: the same stored images, cropped smaller
            set_train_side(self.kit.loaders, self.cfg, side, self.kit.loaded.mean, self.kit.loaded.std)
            self.train_side = side

    def wrap(self, trainable: tuple[str, ...]) -> None:
        """DDP hooks only the parameters that require grad when it is built, so it is
        rebuilt whenever the trainable set changes: newly unfrozen groups are then
        all-reduced too (the bug of Lightning-AI/pytorch-lightning#20340)."""
        if not self.kit.dist.enabled:
            self.net = self.kit.model
        elif self.net is None or trainable != self.wrapped_for:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.kit.device.index] if self.kit.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.kit.model, device_ids=ids)
            self.wrapped_for = trainable

    def cut(self, epoch: int) -> Cut | None:
        """Where this epoch's model is cut for cached inputs, if anywhere (features.py)."""
        if not cache_allowed(self.cfg, self.plan, self.kit.dist.enabled):
            return None
        rng = get_rng()  # deciding must not shift the training RNG (resume replays it)
        try:
            return head_cut(head_module(self.kit.model, self.kit.groups), self.plan, epoch) or prefix_cut(
                self.kit.model, self.kit.groups, self.plan, epoch, self.sample_batch, self.cuts,
                images=len(self.kit.loaders.train.dataset),  # type: ignore[arg-type]
                views=self.views())
        finally:
            set_rng(rng)

    def views(self) -> int:
        """Training views a feature cache holds: one without augmentation, else the precomputed K."""
        return 1 if self.cfg.augment == "none" else self.cfg.feature_cache_views

    def sample_batch(self) -> torch.Tensor:
        """A few training images, to find and check a cut against the real forward pass."""
        x, _ = next(iter(ordered_loader(self.kit.loaders.train.dataset, min(8, self.cfg.batch_size or 8), 0)))
        return to_device(x, self.kit.device, self.cfg.channels_last)

    def store_for(self, cut: Cut) -> FeatureStore:
        """The cut's cached inputs, built the first epoch it is used (a new cut rebuilds them)."""
        if self.features is None or self.features.key != cut.key:
            rng = get_rng()
            self.features = FeatureStore.build(cut, self.kit.model, self.kit.loaders.train.dataset, self.kit.loaders.val,
                                               views=self.views(), cfg=self.cfg, workers=self.kit.loaders.train.num_workers,
                                               device=self.kit.device, amp=self.kit.amp)
            set_rng(rng)
        return self.features

    def train_epoch(self, epoch: int, stop: StopRequested, batches: Iterator | None = None,
                    progress: EpochProgress | None = None, forward: nn.Module | None = None,
                    pause_at: int | None = None) -> dict[str, float]:
        """Train one epoch; ``progress`` resumes it after its first ``progress.batches``;
        ``pause_at``: checkpoint after that many batches and raise :class:`Paused`."""
        self.kit.model.train()
        p = progress or EpochProgress(epoch, start_step=self.state.step)
        done = p.batches
        bar = batches if batches is not None else self.kit.loaders.train
        for i, (x, y) in enumerate(bar):
            if i < done:  # replay the loader up to where the interrupted run stopped
                if i == done - 1:
                    set_rng(p.rng)
                continue
            self._step((x, y), p, forward or self.net or self.kit.model)
            p.batches = i + 1
            if hasattr(bar, "set_postfix") and p.total:
                bar.set_postfix(loss=f"{p.loss_sum / p.total:.4f}", acc=f"{p.correct / p.total:.3f}")
            if stop.flag or self.checkpoint_due() or p.batches == pause_at:  # between steps: a consistent state
                p.rng = get_rng()
                self.save_last(epoch - 1, p)
                if stop.flag:
                    raise Interrupted
                if p.batches == pause_at:
                    raise Paused
        if self.kit.dist.is_main:
            self.run.append_steps(p.rows)
        total, correct, loss_sum = all_sum([p.total, p.correct, p.loss_sum], self.kit.dist)
        return {"train_loss": loss_sum / max(1, total), "train_acc": correct / max(1, total), "images": total}

    def checkpoint_due(self) -> bool:
        """``--checkpoint-every``: time since the last save, or steps done."""
        seconds, steps = checkpoint_interval(self.cfg.checkpoint_every)
        if steps:
            return self.state.step % steps == 0
        return seconds is not None and time.perf_counter() - self.saved_at >= seconds

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], p: EpochProgress, model: nn.Module) -> None:
        cfg = self.cfg
        set_lr_scale(self.kit.optimizer, self.plan.lr, self.lr_scale())
        mix = (functools.partial(mix_batch, num_classes=len(self.splits.classes), mixup=cfg.mixup, cutmix=cfg.cutmix)
               if cfg.mixup or cfg.cutmix else None)
        # --nan skip: a skipped batch's forward pass has already moved the running statistics
        stats = [(b, b.clone()) for b in self.kit.model.buffers()] if cfg.nan == "skip" else []
        r = train_step(model, batch, self.kit.optimizer, self.kit.amp, self.kit.device, channels_last=cfg.channels_last,
                       label_smoothing=cfg.label_smoothing, clip_grad=cfg.clip_grad, mix=mix, penalty=self.kit.penalty)
        if r is None:  # a batch whose images were all unreadable
            return
        if not r.finite:
            with torch.no_grad():
                for live, before in stats:
                    live.copy_(before)
            self.nan_run += 1
            if cfg.nan == "stop":
                raise NonFiniteError(f"loss became {r.loss} at step {self.state.step} (epoch {p.epoch})", self.run)
            if self.nan_run >= MAX_SKIPPED_IN_A_ROW:
                raise NonFiniteError(f"{self.nan_run} batches in a row had a non-finite loss (--nan skip), the last "
                                     f"at step {self.state.step} (epoch {p.epoch})", self.run)
            say(f"warning: non-finite loss at step {self.state.step} (epoch {p.epoch}); batch skipped (--nan skip)")
            self.state.step += 1
            return
        self.nan_run = 0
        if self.kit.ema is not None:
            self.kit.ema.update_parameters(self.kit.model)
        p.total += r.images
        p.loss_sum += r.loss * r.images
        p.correct += r.correct
        p.rows.append({"step": self.state.step, "epoch": p.epoch, "loss": round(r.loss, 6),
                       "lr": lr_by_group(self.kit.optimizer)})
        self.state.step += 1

    def save_last(self, epoch: int, progress: EpochProgress | None = None) -> None:
        """One atomic file, so model, optimizer and logged epochs can never disagree."""
        check_finite(self.kit.model, self.state.step, self.run)
        state = {"epoch": epoch, "step": self.state.step, "best_acc": self.state.best_acc, "best_epoch": self.state.best_epoch,
                 "metrics": self.state.history, "model": state_dict_cpu(self.kit.model),
                 "optimizer": self.kit.optimizer.state_dict(),
                 "progress": dataclasses.asdict(progress) if progress else None}
        if self.kit.ema is not None:
            state["ema"] = self.kit.ema.state_dict()
        if self.kit.amp.scaler is not None:
            state["scaler"] = self.kit.amp.scaler.state_dict()
        if self.kit.dist.is_main:
            with rundir.explain_write_errors(self.run.root):
                save_state(self.run.state, state)
        self.saved_at = time.perf_counter()

    def load_last(self) -> tuple[int, EpochProgress | None]:
        """Restore ``last/``: the epoch to continue from, and its progress if it stopped mid-way."""
        state = load_state(self.run.state)
        self.kit.model.load_state_dict(state["model"])
        # Put the optimizer's groups into the resumed epoch's state before loading, so
        # loaded LR/decay values and the model's requires_grad agree.
        self.apply_plan(state["epoch"] + 1)
        self.kit.optimizer.load_state_dict(state["optimizer"])
        if self.kit.ema is not None and "ema" in state:
            self.kit.ema.load_state_dict(state["ema"])
        if self.kit.amp.scaler is not None and "scaler" in state:
            self.kit.amp.scaler.load_state_dict(state["scaler"])
        self.state.step, self.state.best_acc, self.state.best_epoch = state["step"], state["best_acc"], state["best_epoch"]
        # Checkpoints before the log kept the rows in metrics.jsonl only.
        self.state.history = state.get("metrics") or [r for r in read_jsonl(self.run.metrics)
                                                if r["epoch"] <= state["epoch"]]
        progress = EpochProgress(**state["progress"]) if state.get("progress") else None
        return state["epoch"] + 1, progress


@dataclass
class EpochProgress:
    """Running sums of one epoch, saved when a run is interrupted mid-epoch."""

    epoch: int
    start_step: int = 0
    batches: int = 0
    total: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    rows: list = dataclasses.field(default_factory=list)
    rng: dict | None = None

"""The training loop: one optimizer, the plan applied each epoch, one AMP code path.

Each epoch reseeds every RNG from ``(seed, epoch)``, so resuming from ``last/`` at an
epoch boundary replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import random
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from layerwise import rundir
from layerwise.augment import PRESETS, eval_transform, mix_batch
from layerwise.cache import (
    DecodedImages,
    DiskImages,
    default_cache_dir,
    feature_batches,
    fits_in_ram,
    head_features,
)
from layerwise.checkpoint import (
    append_jsonl,
    atomic_write_text,
    load_state,
    load_weights,
    read_jsonl,
    save_state,
    save_weights,
    state_dict_cpu,
    write_json,
)
from layerwise.config import CHECK_DATA_AUTO_LIMIT, RunConfig, checkpoint_interval
from layerwise.data import (
    DEFAULT_IMG_SIZE,
    ImageDataset,
    Splits,
    check_images,
    collate_skipping,
    load_splits,
    write_skipped,
)
from layerwise.distributed import (
    DistInfo,
    ShardedShuffle,
    all_sum,
    eval_shard,
    from_env,
    params_in_sync,
    shutdown,
)
from layerwise.errors import LayerwiseError
from layerwise.evaluation import EvalResult, evaluate, evaluate_features, gather_eval
from layerwise.freeze import recalibrate_norms, set_trainable
from layerwise.hardware import Amp, pick_device, to_device
from layerwise.optim import ScheduleSpec, apply_states, build_optimizer, lr_by_group, lr_scale, set_lr_scale
from layerwise.plan import Plan, Setup, resolve_strategy, setup
from layerwise.progress import bar

# --- devices and precision ---------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


# --- evaluation --------------------------------------------------------------------------


# --- training ----------------------------------------------------------------------------


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    generator: torch.Generator  # the epoch's sample order
    worker_generator: torch.Generator  # the DataLoader workers' seeds

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)
        self.worker_generator.manual_seed(seed + 1)


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A permutation from ``generator``: the cached-feature path draws the same order."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def decoded_cache_mode(cfg: RunConfig, splits: Splits) -> str:
    """ram, disk or off; auto keeps decoded images in RAM when they fit in a quarter of it."""
    if cfg.cache != "auto":
        return cfg.cache
    return "ram" if fits_in_ram(len(splits.train) + len(splits.val), cfg.img_size) else "off"


def make_loaders(splits: Splits, cfg: RunConfig, mean: Sequence[float], std: Sequence[float],
                 info: DistInfo = DistInfo()) -> Loaders:
    size = cfg.img_size
    workers = default_workers() if cfg.workers is None else cfg.workers
    train_tf, eval_tf = PRESETS[cfg.augment](size, mean, std), eval_transform(size, mean, std)
    mode = decoded_cache_mode(cfg, splits)
    if mode == "ram":
        train_ds = DecodedImages(splits.train, size, train_tf, workers=workers, progress=not cfg.quiet)
        val_ds = DecodedImages(splits.val, size, eval_tf, workers=workers, progress=not cfg.quiet)
    elif mode == "disk":
        where = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        train_ds = DiskImages(splits.train, size, train_tf, cache_dir=where, workers=workers, progress=not cfg.quiet)
        val_ds = DiskImages(splits.val, size, eval_tf, cache_dir=where, workers=workers, progress=not cfg.quiet)
    else:
        train_ds, val_ds = ImageDataset(splits.train, train_tf), ImageDataset(splits.val, eval_tf)
    g, gw = torch.Generator(), torch.Generator()
    common = dict(batch_size=cfg.batch_size, num_workers=workers, pin_memory=torch.cuda.is_available(),
                  collate_fn=collate_skipping)
    if info.enabled:
        sampler = ShardedShuffle(len(train_ds), g, info, cfg.batch_size)
        train = DataLoader(train_ds, sampler=sampler, drop_last=True, generator=gw, **common)
        val_ds = torch.utils.data.Subset(val_ds, eval_shard(len(val_ds), info))
    else:
        train = DataLoader(train_ds, sampler=EpochShuffle(len(train_ds), g),
                           drop_last=len(train_ds) > cfg.batch_size, generator=gw, **common)
    val = DataLoader(val_ds, shuffle=False, **common)
    return Loaders(train, val, g, gw)


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


# --nan skip stops after this many non-finite batches in a row: the weights are gone by then.
MAX_SKIPPED_IN_A_ROW = 10


class NonFiniteError(LayerwiseError):
    """The loss or the weights became NaN/inf; nothing non-finite was saved."""

    def __init__(self, what: str, run: Path) -> None:
        super().__init__(
            f"{what}. Nothing non-finite was saved: last/ keeps the last good state. Lower the LR, clip gradients "
            f"or train in fp32, then continue: layerwise fit --resume {run} --lr 1e-4 --clip-grad 1.0 "
            "--precision fp32 (resume accepts --lr, --clip-grad, --precision and --nan)")


def _check_finite(model: nn.Module, step: int, run: Path) -> None:
    """Never write NaN/inf weights: a checkpoint must always be worth resuming from."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise NonFiniteError(f"the weights became non-finite by step {step}", run)


@dataclass
class Trainer:
    """Everything one run holds while it trains."""

    cfg: RunConfig
    s: Setup
    splits: Splits
    run: Path
    device: torch.device
    amp: Amp
    optimizer: torch.optim.Optimizer
    loaders: Loaders
    ema: torch.optim.swa_utils.AveragedModel | None
    spec: ScheduleSpec
    step: int = 0
    best_acc: float = -1.0
    best_epoch: int = -1
    stale: int = 0
    features: FeatureStore | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)
    dist: DistInfo = DistInfo()
    net: nn.Module | None = None  # what runs the forward pass: the model, or its DDP wrapper
    wrapped_for: tuple[str, ...] = ()
    history: list[dict] = dataclasses.field(default_factory=list)  # metrics rows; the checkpoint holds them
    skipped: list[dict] = dataclasses.field(default_factory=list)  # unreadable images, for skipped.json
    nan_run: int = 0  # consecutive batches with a non-finite loss
    saved_at: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def model(self) -> nn.Module:
        return self.s.loaded.model

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def lr_scale(self) -> float:
        return lr_scale(self.cfg.scheduler, self.step, self.spec)

    def apply_plan(self, epoch: int) -> None:
        states = self.s.plan.states(epoch)
        set_trainable(self.model, self.s.groups, {n: st.trainable for n, st in states.items()}, bn=self.cfg.bn)
        apply_states(self.optimizer, states, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.wrap(tuple(self.s.plan.trainable_groups(epoch)))

    def wrap(self, trainable: tuple[str, ...]) -> None:
        """DDP hooks only the parameters that require grad when it is built, so it is
        rebuilt whenever the trainable set changes: newly unfrozen groups are then
        all-reduced too (the bug of Lightning-AI/pytorch-lightning#20340)."""
        if not self.dist.enabled:
            self.net = self.model
        elif self.net is None or trainable != self.wrapped_for:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
            self.wrapped_for = trainable

    def head_module(self) -> nn.Module | None:
        """The module holding exactly the head group, if there is one."""
        head = self.s.groups[-1]
        return self.model.get_submodule(head.modules[0]) if len(head.modules) == 1 else None

    def feature_cache_on(self, epoch: int) -> bool:
        """Only the head trains, and the frozen rest gives the same output every time."""
        cfg = self.cfg
        if (cfg.feature_cache == "off" or cfg.bn == "train" or cfg.mixup or cfg.cutmix or self.dist.enabled
                or self.head_module() is None):
            return False
        if self.s.plan.trainable_groups(epoch) != [self.s.groups[-1].name]:
            return False
        return cfg.augment == "none" or cfg.feature_cache_views > 0

    def cached_features(self) -> FeatureStore:
        if self.features is None:
            rng = _get_rng()  # building must not shift the training RNG (resume replays it)
            self.features = FeatureStore.build(self)
            _set_rng(rng)
        return self.features

    def train_epoch(self, epoch: int, stop: StopRequested, batches: Iterator | None = None,
                    progress: EpochProgress | None = None, forward: nn.Module | None = None) -> dict[str, float]:
        """Train one epoch; ``progress`` resumes it after its first ``progress.batches``."""
        self.model.train()
        p = progress or EpochProgress(epoch, start_step=self.step)
        done = p.batches
        bar = batches if batches is not None else self.loaders.train
        for i, (x, y) in enumerate(bar):
            if i < done:  # replay the loader up to where the interrupted run stopped
                if i == done - 1:
                    _set_rng(p.rng)
                continue
            if y.numel():  # a batch whose images were all unreadable is empty
                self._step(x, y, p, forward or self.net or self.model)
            p.batches = i + 1
            if hasattr(bar, "set_postfix") and p.total:
                bar.set_postfix(loss=f"{p.loss_sum / p.total:.4f}", acc=f"{p.correct / p.total:.3f}")
            if stop.flag or self.checkpoint_due():  # between steps: a consistent state to resume from
                p.rng = _get_rng()
                self.save_last(epoch - 1, p)
                if stop.flag:
                    raise Interrupted
        if self.dist.is_main:
            with open(self.run / rundir.STEPS, "a") as f:  # per epoch: no fsync on the hot path
                f.writelines(json.dumps(r) + "\n" for r in p.rows)
        total, correct, loss_sum = all_sum([p.total, p.correct, p.loss_sum], self.dist)
        return {"train_loss": loss_sum / max(1, total), "train_acc": correct / max(1, total), "images": total}

    def checkpoint_due(self) -> bool:
        """``--checkpoint-every``: time since the last save, or steps done."""
        seconds, steps = checkpoint_interval(self.cfg.checkpoint_every)
        if steps:
            return self.step % steps == 0
        return seconds is not None and time.perf_counter() - self.saved_at >= seconds

    def _step(self, x: torch.Tensor, y: torch.Tensor, p: EpochProgress, model: nn.Module) -> None:
        cfg = self.cfg
        x, y = to_device(x, self.device, cfg.channels_last), y.to(self.device)
        target = y
        if cfg.mixup or cfg.cutmix:
            x, target = mix_batch(x, y, len(self.splits.classes), mixup=cfg.mixup, cutmix=cfg.cutmix)
        set_lr_scale(self.optimizer, cfg.lr, self.lr_scale())
        with self.amp.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
        if not torch.isfinite(loss):
            self.nan_run += 1
            if cfg.nan == "stop":
                raise NonFiniteError(f"loss became {loss.item()} at step {self.step} (epoch {p.epoch})", self.run)
            if self.nan_run >= MAX_SKIPPED_IN_A_ROW:
                raise NonFiniteError(f"{self.nan_run} batches in a row had a non-finite loss (--nan skip), the last "
                                     f"at step {self.step} (epoch {p.epoch})", self.run)
            _say(cfg, f"warning: non-finite loss at step {self.step} (epoch {p.epoch}); batch skipped (--nan skip)")
            self.step += 1
            return
        self.nan_run = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.amp.step(loss, self.optimizer, cfg.clip_grad)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        n = y.shape[0]
        p.total += n
        p.loss_sum += loss.item() * n
        p.correct += (logits.argmax(-1) == y).sum().item()
        p.rows.append({"step": self.step, "epoch": p.epoch, "loss": round(loss.item(), 6),
                       "lr": lr_by_group(self.optimizer)})
        self.step += 1

    def save_last(self, epoch: int, progress: EpochProgress | None = None) -> None:
        """One atomic file, so model, optimizer and logged epochs can never disagree."""
        _check_finite(self.model, self.step, self.run)
        state = {"epoch": epoch, "step": self.step, "best_acc": self.best_acc, "best_epoch": self.best_epoch,
                 "stale": self.stale, "metrics": self.history, "model": state_dict_cpu(self.model),
                 "optimizer": self.optimizer.state_dict(),
                 "progress": dataclasses.asdict(progress) if progress else None}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.amp.scaler is not None:
            state["scaler"] = self.amp.scaler.state_dict()
        if self.dist.is_main:
            with _explain_write_errors(self.run):
                save_state(self.run / rundir.STATE, state)
        self.saved_at = time.perf_counter()

    def load_last(self) -> tuple[int, EpochProgress | None]:
        """Restore ``last/``: the epoch to continue from, and its progress if it stopped mid-way."""
        state = load_state(self.run / rundir.STATE)
        self.model.load_state_dict(state["model"])
        # Put the optimizer's groups into the resumed epoch's state before loading, so
        # loaded LR/decay values and the model's requires_grad agree.
        self.apply_plan(state["epoch"] + 1)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        if self.amp.scaler is not None and "scaler" in state:
            self.amp.scaler.load_state_dict(state["scaler"])
        self.step, self.best_acc, self.best_epoch, self.stale = (
            state["step"], state["best_acc"], state["best_epoch"], state["stale"])
        # Checkpoints before the log kept the rows in metrics.jsonl only.
        self.history = state.get("metrics") or [r for r in read_jsonl(self.run / rundir.METRICS)
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


@dataclass
class FeatureStore:
    """Head inputs from the frozen prefix: K training views and the validation set."""

    train: list[torch.Tensor]
    labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor

    @staticmethod
    def build(t: Trainer) -> FeatureStore:
        cfg = t.cfg
        views = 1 if cfg.augment == "none" else cfg.feature_cache_views
        prep = functools.partial(to_device, device=t.device, channels_last=cfg.channels_last)
        head = t.head_module()
        ordered = DataLoader(t.loaders.train.dataset, batch_size=cfg.batch_size, shuffle=False,
                             num_workers=t.loaders.train.num_workers, collate_fn=collate_skipping)
        train, labels = [], None
        tic = time.perf_counter()
        for k in range(views):
            seed_everything(epoch_seed(cfg.seed, 10_000 + k))  # view k's augmentation, reproducibly
            feats, labels = head_features(t.model, head, ordered, t.device, t.amp.autocast, prep)
            train.append(feats)
        val, val_labels = head_features(t.model, head, t.loaders.val, t.device, t.amp.autocast, prep)
        _say(cfg, f"feature cache: frozen prefix run once over {len(labels)} x {views} train + {len(val_labels)} "
                  f"val images in {time.perf_counter() - tic:.1f}s; the head trains on cached features")
        return FeatureStore(train, labels, val, val_labels)

    def batches(self, epoch: int, t: Trainer) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        feats = self.train[epoch % len(self.train)]
        return feature_batches(feats, self.labels, t.cfg.batch_size, t.loaders.generator,
                               drop_last=t.loaders.train.drop_last)


def _get_rng() -> dict:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng(state: dict | None) -> None:
    if state:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _explain_write_errors(run: Path) -> Iterator[None]:
    """A failed checkpoint write (disk full...) becomes a user error; the atomic writer
    has left the previous checkpoint in place."""
    try:
        yield
    except OSError as e:
        kept = ("The previous checkpoint is intact" if rundir.has_checkpoint(run)
                else "No checkpoint was written yet, so the run will start over")
        raise LayerwiseError(
            f"could not write in {run}: {e.strerror or e}. {kept}; free some space (or make the folder writable), "
            f"then continue with: layerwise fit --resume {run}"
        ) from e


def _progress(batches: Iterator, epoch: int, epochs: int, quiet: bool, total: int | None = None) -> Iterator:
    return bar(batches, f"epoch {epoch + 1}/{epochs}", enabled=not quiet, total=total, unit="batch", leave=True)


def _say(cfg: RunConfig, msg: str) -> None:
    """Run logs, from rank 0 only; ``--quiet`` only drops the progress bars."""
    if os.environ.get("RANK", "0") == "0":
        print(msg, flush=True)


def _model_info(s: Setup, splits: Splits) -> dict:
    """What ``evaluate``/``predict``/``export`` need to rebuild the trained model."""
    lm = s.loaded
    return {"source": lm.source, "arch": lm.arch, "name": lm.name, "head": s.config.head, "hidden": s.config.hidden,
            "num_classes": len(splits.classes), "classes": splits.classes, "val_images": len(splits.val),
            "mean": list(lm.mean),
            "std": list(lm.std), "img_size": s.config.img_size}


def check_splits(splits: Splits, cfg: RunConfig) -> None:
    """Decode every file once and drop unreadable ones (kept in ``splits.skipped``, written to
    ``skipped.json`` with the run's header: nothing touches the disk before the run is valid)."""
    n = len(splits.train) + len(splits.val)
    if cfg.check_data == "off" or (cfg.check_data == "auto" and n > CHECK_DATA_AUTO_LIMIT):
        return
    splits.train, bad_train = check_images(splits.train, progress=not cfg.quiet)
    splits.val, bad_val = check_images(splits.val, progress=not cfg.quiet)
    splits.skipped = bad_train + bad_val
    if splits.skipped:
        _say(cfg, f"warning: skipped {len(splits.skipped)} unreadable image(s); the run folder's "
                  f"{rundir.SKIPPED} lists them")
    for part, items in (("train", splits.train), ("val", splits.val)):
        empty = set(range(len(splits.classes))) - {label for _, label in items}
        if empty:
            names = ", ".join(splits.classes[i] for i in sorted(empty))
            raise LayerwiseError(f"after skipping unreadable images, class(es) {names} have no {part} images; "
                                 "fix or replace those files")


def prepare(cfg: RunConfig) -> tuple[Setup, Splits]:
    splits = load_splits(cfg.data, val_split=cfg.val_split, seed=cfg.seed)
    check_splits(splits, cfg)
    if cfg.data is None:  # 8x8 digits: upscale a little, and never flip or crop them
        cfg.img_size = cfg.img_size or DEFAULT_IMG_SIZE
        cfg.augment = cfg.augment or "none"
    seed_everything(cfg.seed)  # the new head's initial weights depend on it
    s = setup(cfg, len(splits.classes), images_per_class=splits.images_per_class)
    return s, splits


def build_trainer(cfg: RunConfig, run: Path, info: DistInfo = DistInfo()) -> Trainer:
    s, splits = prepare(cfg)
    cfg = s.config
    device = pick_device(cfg.device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    model = s.loaded.model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, s.groups, s.plan.states(0), name=cfg.optimizer, lr=cfg.lr,
                                weight_decay=cfg.weight_decay, momentum=cfg.momentum, layer_decay=cfg.layer_decay)
    loaders = make_loaders(splits, cfg, s.loaded.mean, s.loaded.std, info)
    steps = len(loaders.train)
    spec = ScheduleSpec(total_steps=steps * cfg.epochs, steps_per_epoch=steps,
                        warmup_steps=int(cfg.warmup_epochs * steps), t0=cfg.t0, t_mult=cfg.t_mult)
    ema = None
    if cfg.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    amp = Amp(cfg.precision, device, model)
    cfg.precision = amp.precision  # config.yaml records what ran, so a re-run or resume matches
    return Trainer(cfg, s, splits, run, device, amp, optimizer, loaders, ema, spec, dist=info)


def _write_run_header(t: Trainer) -> None:
    run = t.run
    with _explain_write_errors(run):
        atomic_write_text(run / rundir.CONFIG, t.cfg.to_yaml())
        write_json(run / rundir.PLAN, t.s.plan.to_dict())
        write_json(run / rundir.MODEL, _model_info(t.s, t.splits))
        write_skipped(run / rundir.SKIPPED, t.splits.skipped)


def _sync_logs(t: Trainer, start_epoch: int) -> None:
    """Make the logs say exactly what ``last/`` holds: metrics.jsonl is rewritten from the
    checkpoint's rows (a kill may have come between the checkpoint and its log row), and
    steps of epochs the checkpoint does not cover are dropped (they will be redone)."""
    with _explain_write_errors(t.run):
        atomic_write_text(t.run / rundir.METRICS, "".join(json.dumps(r) + "\n" for r in t.history))
        rows = [r for r in read_jsonl(t.run / rundir.STEPS) if r["epoch"] < start_epoch]
        atomic_write_text(t.run / rundir.STEPS, "".join(json.dumps(r) + "\n" for r in rows))


def fit(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train ``cfg`` into its run folder (``cfg.out``); returns the folder.

    A folder that already holds a run is refused unless ``resume`` (continue it) or
    ``overwrite`` (replace it); one process writes a run folder at a time."""
    started = time.perf_counter()
    info = from_env()
    if info.enabled and not cfg.out:
        raise LayerwiseError("distributed runs need --out, so every rank writes to the same run folder")
    run = Path(cfg.out or default_run_dir())
    cfg.out = str(run)
    if not info.is_main:
        cfg.quiet = True
    try:
        with rundir.writer_lock(run) if info.is_main else contextlib.nullcontext():
            if info.is_main and not resume and not overwrite:
                rundir.refuse_existing(run)
            # Taken before set-up resolves defaults, so compare can predict it from its inputs.
            fingerprint = None if resume else rundir.run_fingerprint(cfg)
            return _fit(cfg, run, info, started, resume, overwrite, fingerprint)
    finally:
        shutdown(info)


def _fit(cfg: RunConfig, run: Path, info: DistInfo, started: float, resume: bool, overwrite: bool,
         fingerprint: dict | None) -> Path:
    auto_lr = cfg.lr == "auto"
    t = build_trainer(dataclasses.replace(cfg, lr=1e-3) if auto_lr else cfg, run, info)
    if overwrite and info.is_main:  # only now: a config or data error must not cost the old run
        rundir.clear(run)
    if _wants_probe(t):
        _probe_for_auto(t, run)
    if auto_lr:
        _find_lr(t, run)
    t.started = started  # elapsed_seconds counts data and model set-up too
    start, progress = 0, None
    restored = resume and rundir.has_checkpoint(run)
    if restored:
        _check_resumable(run, t)
        start, progress = t.load_last()
        if t.history:  # elapsed_seconds keeps counting across sittings
            t.started -= t.history[-1]["elapsed_seconds"]
    elif resume:
        _say(t.cfg, f"resume: {run} has no checkpoint yet (stopped before the first one was written); "
                    "starting it from step 0")
    if resume:
        _record_resume(t, run, start)
    if info.is_main:
        _sync_logs(t, start)
        _write_run_header(t)
        if fingerprint is not None:
            write_json(run / rundir.FINGERPRINT, fingerprint)
    _say(t.cfg, _banner(t))
    if cfg.bn is None and t.cfg.bn == "frozen" and _has_slow_groups(t.s.plan):
        _say(t.cfg, f"hint: {t.s.plan.strategy.name} trains some groups late or at a low LR; with batch statistics "
                    "in their BatchNorm layers (--bn frozen, the default) that lost 5-26 points on cifar10-mini. "
                    "Try --bn eval (docs/strategies.md).")
    if info.enabled:
        _say(t.cfg, f"distributed: {info.world} processes x batch {t.cfg.batch_size} = global batch "
                    f"{info.world * t.cfg.batch_size}; the LR is not scaled (set --lr for the global batch)")
    if t.cfg.bn == "adapt" and not restored:
        n = recalibrate_norms(t.model, _adapt_batches(t))
        _say(t.cfg, f"bn adapt: re-estimated BatchNorm statistics on {n} training images")
    writer = _tensorboard(run) if info.is_main else None
    with StopRequested(install=not info.enabled) as stop:
        try:
            for epoch in range(start, t.cfg.epochs):
                if _train_and_log(t, epoch, stop, writer, progress if epoch == start else None):
                    _say(t.cfg, f"early stopping: val accuracy has not improved for {t.cfg.patience} epochs")
                    break
                if t.cfg.time_budget and time.perf_counter() - t.started >= t.cfg.time_budget:
                    _say(t.cfg, f"time budget of {t.cfg.time_budget:.0f}s spent after epoch {epoch + 1}")
                    break
        except Interrupted:
            _say(t.cfg, f"\ninterrupted: last/ holds the run up to the last step. Resume with: layerwise fit --resume {run}")
            raise
    from layerwise.report import write_run_report

    if not params_in_sync(t.model, info):
        raise LayerwiseError("ranks ended with different weights; this is a bug in the distributed set-up")
    if info.enabled:
        _say(t.cfg, f"ranks in sync: all {info.world} processes hold identical weights")
    best = _final_eval(t)
    if info.is_main:
        with _explain_write_errors(run):
            write_run_report(run, t.splits.classes, best)
    _say(t.cfg, f"best val accuracy {t.best_acc:.4f} (epoch {t.best_epoch})\nrun folder: {run}\nreport: {run / rundir.REPORT}")
    return run


def _has_slow_groups(plan: Plan) -> bool:
    """Does some group train at under half the head's LR, or start after epoch 0?"""
    states = [plan.states(e) for e in range(plan.epochs)]
    late = any(not states[0][g].trainable and any(s[g].trainable for s in states) for g in states[0])
    return late or any(st.trainable and st.lr_mult < 0.5 for s in states for st in s.values())


def _wants_probe(t: Trainer) -> bool:
    """``auto``, with the probe on and its skill not known yet (a resume knows it)."""
    cfg = t.cfg
    return cfg.strategy == "auto" and cfg.probe and cfg.probe_skill is None and t.head_module() is not None


def _probe_for_auto(t: Trainer, run: Path) -> None:
    """Measure how well frozen features separate the classes and re-plan ``auto`` with it;
    config.yaml records the skill, so a resume keeps the same choice without probing."""
    from layerwise.probe import linear_probe

    res = linear_probe(t)
    skill, = all_sum([res.skill if t.dist.is_main else 0.0], t.dist)  # rank 0's verdict for all
    t.cfg.probe_skill = round(skill, 4)
    strategy = resolve_strategy(t.cfg, t.s.groups, images_per_class=t.splits.images_per_class,
                                num_classes=len(t.splits.classes))
    t.s.plan = dataclasses.replace(t.s.plan, strategy=strategy)
    if t.dist.is_main:
        run.mkdir(parents=True, exist_ok=True)
        write_json(run / rundir.PROBE, {"val_acc": res.acc, "chance": res.chance, "skill": t.cfg.probe_skill,
                                        "train_images": res.train_images, "seconds": round(res.seconds, 2),
                                        "strategy": strategy.name, "reason": strategy.reason})
    _say(t.cfg, f"auto: linear probe on frozen features: val acc {res.acc:.3f} (majority class {res.chance:.3f}), "
                f"skill {t.cfg.probe_skill:.2f}, {res.seconds:.1f}s -> {strategy.name}")


def _find_lr(t: Trainer, run: Path) -> None:
    """``--lr auto``: the LR range test picks the base LR; config.yaml records the value."""
    from layerwise.lrfind import lr_find, plot_lr_find

    res = lr_find(t)
    t.cfg.lr = res.suggestion
    t.s.plan = dataclasses.replace(t.s.plan, lr=res.suggestion)
    if t.dist.is_main:
        run.mkdir(parents=True, exist_ok=True)
        plot_lr_find(res, run / rundir.LR_FIND_PNG)
    _say(t.cfg, f"lr auto: {res.reason}; base lr {res.suggestion:.2e} (plot: {run / rundir.LR_FIND_PNG})")


def _adapt_batches(t: Trainer, max_images: int = 2048) -> Iterator[torch.Tensor]:
    """Training images through the deterministic eval transform, for BN re-estimation."""
    ds = ImageDataset(t.splits.train, eval_transform(t.cfg.img_size, t.s.loaded.mean, t.s.loaded.std))
    loader = DataLoader(ds, batch_size=t.cfg.batch_size, shuffle=False, collate_fn=collate_skipping,
                        num_workers=t.loaders.train.num_workers)
    seen = 0
    for x, _ in loader:
        if seen >= max_images:
            break
        seen += x.shape[0]
        yield to_device(x, t.device, t.cfg.channels_last)


def _check_resumable(run: Path, t: Trainer) -> None:
    saved = rundir.read_model_info(run)
    now = _model_info(t.s, t.splits)
    for key in ("arch", "num_classes", "classes", "head"):
        if saved[key] != now[key]:
            raise LayerwiseError(f"cannot resume {run}: it was trained with {key} {saved[key]!r}, "
                                 f"this data/config gives {now[key]!r}; start a new run with --out")


# What --resume may change: how far and how fast to go, and what to do about divergence.
# Anything else would make the checkpoint and the config disagree.
RESUME_OVERRIDABLE = ("epochs", "lr", "clip_grad", "precision", "nan", "patience", "checkpoint_every",
                      "quiet", "workers", "device")
# Where the run lives, not how it trains: never compared or recorded.
_RESUME_IGNORED = ("out", "quiet", "workers", "device", "resumed")


def _record_resume(t: Trainer, run: Path, start: int) -> None:
    """config.yaml keeps each resume's changed settings and the epoch/step they took effect."""
    from layerwise.config import from_mapping, load_yaml

    saved = from_mapping(load_yaml(run / rundir.CONFIG))
    changed = {k: getattr(t.cfg, k) for k in RESUME_OVERRIDABLE
               if k not in _RESUME_IGNORED and getattr(t.cfg, k) != getattr(saved, k)}
    if changed:
        t.cfg.resumed = [*saved.resumed, {"epoch": start, "step": t.step, "changed": changed}]
        _say(t.cfg, f"resume: from epoch {start} (step {t.step}) with " +
             ", ".join(f"{k} {getattr(saved, k)!r} -> {v!r}" for k, v in changed.items()))
    else:
        t.cfg.resumed = saved.resumed


def _train_and_log(t: Trainer, epoch: int, stop: StopRequested, writer: object,
                   progress: EpochProgress | None = None) -> bool:
    """One epoch: plan, train, validate, log, checkpoint. Returns True to stop early."""
    cfg = t.cfg
    seed_everything(epoch_seed(cfg.seed, epoch))
    t.loaders.reseed(epoch_seed(cfg.seed, epoch))
    t.apply_plan(epoch)
    first = progress.start_step if progress else t.step
    scale = lr_scale(cfg.scheduler, first, t.spec)
    lr_start = {g: cfg.lr * st.lr_mult * scale for g, st in t.s.plan.states(epoch).items()}
    tic = time.perf_counter()
    if t.feature_cache_on(epoch):
        store = t.cached_features()  # built in the first such epoch, and counted in its time
        batches = _progress(store.batches(epoch, t), epoch, cfg.epochs, cfg.quiet, len(t.loaders.train))
        tr = t.train_epoch(epoch, stop, batches, progress, forward=t.head_module())
    else:
        t.features = None  # the trainable set moved past the head: cached features are stale
        tr = t.train_epoch(epoch, stop, _progress(t.loaders.train, epoch, cfg.epochs, cfg.quiet), progress)
    train_s = time.perf_counter() - tic
    if t.features is not None and t.ema is None:
        ev = evaluate_features(t.head_module(), t.features.val, t.features.val_labels, t.amp, t.device)
    else:
        ev = gather_eval(evaluate(t.eval_model(), t.loaders.val, t.amp, t.device, channels_last=cfg.channels_last),
                         t.dist)
    row = {
        "epoch": epoch, "train_loss": tr["train_loss"], "train_acc": tr["train_acc"], "val_loss": ev.loss,
        "val_acc": ev.acc, "lr": lr_start, "trainable_params": t.s.plan.trainable_params(epoch),
        "trainable_groups": t.s.plan.trainable_groups(epoch), "epoch_seconds": time.perf_counter() - tic,
        "images_per_second": tr["images"] / max(train_s, 1e-9),
        "elapsed_seconds": time.perf_counter() - t.started,
    }
    improved = ev.acc > t.best_acc
    if improved:
        t.best_acc, t.best_epoch, t.stale = ev.acc, epoch, 0
        _check_finite(t.eval_model(), t.step, t.run)
        if t.dist.is_main:
            with _explain_write_errors(t.run):
                save_weights(t.run / rundir.BEST, t.eval_model())
    else:
        t.stale += 1
    t.history.append(row)
    t.save_last(epoch)  # the checkpoint first: the log never names an epoch the checkpoint lacks
    if t.dist.is_main:
        with _explain_write_errors(t.run):
            append_jsonl(t.run / rundir.METRICS, row)
    if writer is not None:
        for k in ("train_loss", "train_acc", "val_loss", "val_acc", "images_per_second"):
            writer.add_scalar(k, row[k], epoch)
    _say(cfg, f"epoch {epoch + 1}/{cfg.epochs}: train loss {tr['train_loss']:.4f} acc {tr['train_acc']:.4f} · "
              f"val loss {ev.loss:.4f} acc {ev.acc:.4f} · {row['images_per_second']:.0f} img/s"
              + (" · best" if improved else ""))
    return bool(cfg.patience) and t.stale >= cfg.patience


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
        _say(t.cfg, f"best weights with TTA {', '.join(t.cfg.tta)}: val accuracy {ev.acc:.4f}")
        if t.dist.is_main:
            write_json(t.run / rundir.TTA, {"views": t.cfg.tta, "val_acc": ev.acc, "val_loss": ev.loss})
    return ev


def _banner(t: Trainer) -> str:
    sp, s = t.splits, t.s
    lines = [f"data: {sp.name} · {len(sp.train)} train / {len(sp.val)} val images · {len(sp.classes)} classes",
             f"model: {s.loaded.name} ({s.loaded.source} {s.loaded.arch}) · weights {s.loaded.weights} · "
             f"{t.cfg.img_size}px · {t.device} · {t.amp.precision} · bn {t.cfg.bn}"]
    lines += s.loaded.notes
    return "\n".join(lines + [s.plan.table(), ""])


def _tensorboard(run: Path) -> object:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run / "tb"))


def default_run_dir() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / stamp


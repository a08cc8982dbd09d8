"""What ``auto`` measures before its first epoch, and how the run starts from it.

The linear probe (probe.py) and the BatchNorm shift (shift.py) on one frozen forward pass
choose the strategy; the probe's head becomes the run's first metrics row, so the fine-tune
only replaces it by beating it.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch

from layerwise import rundir
from layerwise.checkpoint import load_weights, save_weights, write_json
from layerwise.distributed import all_sum
from layerwise.evaluation import evaluate, gather_eval
from layerwise.loaders import unsharded, with_eval_transform
from layerwise.plan import resolve_strategy, training_settings
from layerwise.prefix import prefix_output
from layerwise.probe import ProbeResult, linear_probe, load_probe_head, probe_loaders
from layerwise.progress import say
from layerwise.rng import get_rng, set_rng
from layerwise.trainer import Trainer


def wants_probe(t: Trainer) -> bool:
    """``auto``, with the probe on and its skill not known yet (a resume knows it)."""
    cfg = t.cfg
    return cfg.strategy == "auto" and cfg.probe and cfg.probe_skill is None and t.head_module() is not None


def run_probe(t: Trainer) -> tuple[ProbeResult, tuple[str, str] | None]:
    """The linear probe on the frozen model (plus the BatchNorm shift and the earlier depth's
    probe, read from the same forward passes), and that earlier depth's (group, module)."""
    cfg, loaded = t.cfg, t.s.loaded
    train, val = probe_loaders(with_eval_transform(t.loaders.train.dataset, cfg.img_size, loaded.mean, loaded.std),
                               unsharded(t.loaders.val.dataset), batch_size=cfg.batch_size,
                               workers=t.loaders.train.num_workers, seed=cfg.seed)
    earlier = earlier_depth(t)
    res = linear_probe(t.model, t.head_module(), train, val, t.device, t.amp, channels_last=cfg.channels_last,
                       quiet=cfg.quiet, seed=cfg.seed, earlier=t.model.get_submodule(earlier[1]) if earlier else None)
    return res, earlier


def probe_for_auto(t: Trainer, run: Path, *, user_bn: str | None) -> None:
    """Measure how well frozen features separate the classes, and how far the images sit
    from the pretraining data, and re-plan ``auto`` with both (and the --bn its choice
    implies, unless ``user_bn`` was given); config.yaml records the evidence, so a resume
    keeps the same choice without probing."""
    cfg = t.cfg
    res, earlier = run_probe(t)
    # Rank 0's verdict for all; a model without BatchNorm has no shift (-1 on the wire).
    skill, shift = all_sum([res.skill, -1.0 if res.bn_shift is None else res.bn_shift] if t.dist.is_main
                           else [0.0, 0.0], t.dist)
    t.cfg = dataclasses.replace(cfg, probe_skill=round(skill, 4), bn_shift=None if shift < 0 else round(shift, 4))
    probe_head = copy.deepcopy(t.head_module())  # the model's own head stays fresh: begin_at_probe loads it
    probe_is_stage = False
    if res.head is not None and load_probe_head(probe_head, res.head):
        # The fine-tune starts from the probe (LP-FT as Kumar et al. define it); saved so a
        # resume or a re-run from config.yaml starts from the same head without probing.
        path = run / rundir.PROBE_HEAD
        if t.dist.is_main:
            save_weights(path, probe_head)
        t.cfg = dataclasses.replace(t.cfg, probe_head=str(path.resolve()))
        if t.cfg.probe_epochs is None:  # the probe *is* LP-FT's linear-probing stage, fitted to convergence
            t.cfg, probe_is_stage = dataclasses.replace(t.cfg, probe_epochs=0), True
    strategy = resolve_strategy(t.cfg, t.s.groups, images_per_class=t.splits.images_per_class,
                                num_classes=len(t.splits.classes))
    if probe_is_stage and not strategy.trains_from_probe:  # only lp-ft reads it: config.yaml says what applies
        t.cfg = dataclasses.replace(t.cfg, probe_epochs=None)
    bn = dataclasses.replace(t.cfg, bn=user_bn).resolved(strategy.overrides).bn
    t.cfg = dataclasses.replace(t.cfg, bn=bn)
    t.s.plan = dataclasses.replace(t.s.plan, strategy=strategy, settings=training_settings(t.cfg))
    if t.dist.is_main:
        write_json(run / rundir.PROBE, {"val_acc": res.acc, "chance": res.chance, "skill": t.cfg.probe_skill,
                                        "train_images": res.train_images, "seconds": round(res.seconds, 2),
                                        "c": res.head.c if res.head else None, "knn_acc": res.knn_acc,
                                        "hscore": res.hscore, "bn_shift": t.cfg.bn_shift,
                                        "earlier": earlier and {"group": earlier[0], "module": earlier[1],
                                                                "val_acc": res.earlier_acc, "skill": res.earlier_skill},
                                        "strategy": strategy.name, "bn": bn,
                                        "reason": strategy.reason})
    shift_text = "none (no BatchNorm)" if t.cfg.bn_shift is None else f"{t.cfg.bn_shift:.2f}"
    say(f"auto: linear probe on frozen features: val acc {res.acc:.3f} (majority class {res.chance:.3f}), "
        f"skill {t.cfg.probe_skill:.2f}; BatchNorm shift {shift_text}; {res.seconds:.1f}s -> {strategy.name}, "
        f"bn {bn}; also kNN {res.knn_acc:.3f}, H-score {res.hscore:.1f}"
        + (f", {earlier[0]}'s output skill {res.earlier_skill:.2f}" if earlier and res.earlier_skill is not None else ""))


def earlier_depth(t: Trainer) -> tuple[str, str] | None:
    """(group, module) whose pooled output is the probe's earlier depth: the output of every
    group before the last one of the body (Head2Toe-style evidence on how specialised the
    last stage is); None for a model of fewer than two body groups."""
    k = len(t.s.groups) - 2
    if k < 1:
        return None
    rng = get_rng()  # finding it must not shift the training RNG (a re-run without the probe replays it)
    try:
        module = prefix_output(t.model, t.s.groups, k, t.sample_batch())
    finally:
        set_rng(rng)
    return (t.s.groups[k - 1].name, module) if module else None


def begin_at_probe(t: Trainer) -> None:
    """Load the probe's head and validate the model as the run's first metrics row (epoch
    -1), so best.safetensors starts as the probe model and a fine-tune replaces it only by
    beating it: auto is never worse than its own probe."""
    tic = time.perf_counter()
    if t.dist.enabled:
        torch.distributed.barrier()  # rank 0 has written the head file
    fresh = {k: v.clone() for k, v in t.head_module().state_dict().items()}
    load_weights(Path(t.cfg.probe_head), t.head_module())
    if t.ema is not None:  # the average starts from the probe model too
        t.ema.module.load_state_dict(t.model.state_dict())
    ev = gather_eval(evaluate(t.eval_model(), t.loaders.val, t.amp, t.device, channels_last=t.cfg.channels_last),
                     t.dist)
    head = t.s.groups[-1].name
    t.history.append({
        "epoch": -1, "stage": "probe", "train_loss": None, "train_acc": None, "val_loss": ev.loss,
        "val_acc": ev.acc, "lr": {}, "trainable_params": t.s.plan.sizes[head], "trainable_groups": [head],
        "epoch_seconds": time.perf_counter() - tic, "images_per_second": None,
        "elapsed_seconds": time.perf_counter() - t.started,
    })
    t.best_acc, t.best_epoch = ev.acc, -1
    if t.dist.is_main:
        with rundir.explain_write_errors(t.run):
            save_weights(t.run / rundir.BEST, t.eval_model())
    say(f"probe head: val accuracy {ev.acc:.4f} with the probe as the classifier; best.safetensors starts here and "
        "only a better fine-tuned epoch replaces it")
    if not t.s.plan.strategy.trains_from_probe:
        t.head_module().load_state_dict(fresh)
        if t.ema is not None:
            t.ema.module.load_state_dict(t.model.state_dict())
        say("the fine-tune trains a fresh head at the full LR; the probe stays the row to beat")

"""The training budget: batch size and epochs, chosen from the number of training images when
the user does not set them (the batch for every strategy, the epochs for ``auto``).

Epochs are the wrong unit for small data: 245 images at batch 64 are 3 optimizer steps per
epoch. Like BiT's HyperRule (Kolesnikov et al., 2020), the rule fixes a minimum number of
optimizer steps instead, and a batch small enough for several steps per epoch; early stopping
on a validation plateau ends runs that have converged. The constants are a principle (enough
steps to move a pretrained network, at most a few minutes on a laptop CPU at small sizes), not
values fitted to a benchmark.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from layerwise.config import RunConfig

# Principles, not fits (see the module docstring), except where a dataset is named.
DEFAULT_EPOCHS = 4  # every fixed strategy, when --epochs is not given
DEFAULT_BATCH = 64
MIN_STEPS = 120  # auto: optimizer steps at least, whatever the data size
MIN_STEPS_PER_EPOCH = 16  # the batch shrinks (to 8 at least) to keep this many steps per epoch
MAX_EPOCHS = 30
# auto stops early after half its epochs (2 at least) without a val-acc gain: a 2-epoch patience
# stopped cosine runs before their LR had annealed (dtd at 96 px: 0.810 against 0.827 run to the
# end), on the noise of a few hundred val images. Set on the suite's dtd: in-sample there.
MIN_PATIENCE = 2


def auto_batch(n_train: int) -> int:
    """The largest power of two up to 64 (at least 8) that gives MIN_STEPS_PER_EPOCH steps."""
    b = DEFAULT_BATCH
    while b > 8 and n_train // b < MIN_STEPS_PER_EPOCH:
        b //= 2
    return b


def auto_epochs(n_train: int, batch: int) -> int:
    """Epochs for at least MIN_STEPS optimizer steps, between DEFAULT_EPOCHS and MAX_EPOCHS."""
    steps_per_epoch = max(1, n_train // batch)
    return min(MAX_EPOCHS, max(DEFAULT_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch)))


def resolve_budget(cfg: RunConfig, n_train: int | None) -> tuple[RunConfig, str]:
    """``cfg`` with epochs and batch size set, and a sentence saying why. Explicit values are
    kept. With a known dataset size every strategy gets a batch small enough for
    MIN_STEPS_PER_EPOCH steps an epoch (``full`` at batch 64 for 3 epochs of 1,000 images made
    15 steps an epoch and ended 7.4 points below a plain loop at 32); ``auto`` also gets the
    step-based epochs and early stopping."""
    from layerwise.config import validate

    if n_train is None:
        out = dataclasses.replace(cfg, epochs=cfg.epochs or DEFAULT_EPOCHS, batch_size=cfg.batch_size or DEFAULT_BATCH)
        validate(out)
        return out, ""
    batch = cfg.batch_size or auto_batch(n_train)
    if cfg.strategy != "auto":
        out = dataclasses.replace(cfg, epochs=cfg.epochs or DEFAULT_EPOCHS, batch_size=batch)
        validate(out)
        why = "" if cfg.batch_size else (f"budget: {n_train} training images -> batch {batch}, "
                                         f"{max(1, n_train // batch)} steps an epoch (at least {MIN_STEPS_PER_EPOCH} "
                                         f"where the data allows; --batch-size sets it)")
        return out, why
    epochs = cfg.epochs or auto_epochs(n_train, batch)
    patience = cfg.patience if cfg.patience is not None or cfg.epochs else max(MIN_PATIENCE, math.ceil(epochs / 2))
    out = dataclasses.replace(cfg, epochs=epochs, batch_size=batch, patience=patience)
    validate(out)
    steps = max(1, n_train // batch) * epochs
    given = [f"--{k.replace('_', '-')} {v}" for k, v in (("epochs", cfg.epochs), ("batch_size", cfg.batch_size)) if v]
    why = (f"budget: {n_train} training images -> batch {batch}, {epochs} epochs = {steps} optimizer steps "
           f"(auto aims at {MIN_STEPS} or more{'; ' + ', '.join(given) + ' as given' if given else ''})")
    if patience and not cfg.patience:
        why += f", stopping early after {patience} epochs without a val-accuracy gain"
    return out, why


def epochs_without_gain(history: list[dict]) -> int:
    """Fine-tuned epochs since the best fine-tuned one. auto's probe row (epoch -1) is the floor
    of best.safetensors, not a plateau of the fine-tune: one that has not overtaken the probe
    yet may still be climbing (fashion-mnist: 0.812, 0.840 under a 0.844 probe, then 0.87)."""
    accs = [r["val_acc"] for r in history if r["epoch"] >= 0]
    return len(accs) - 1 - accs.index(max(accs)) if accs else 0

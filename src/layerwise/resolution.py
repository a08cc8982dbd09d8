"""Which image size each epoch trains at: progressive resizing and train-low/test-high.

At a fixed model, a training step costs roughly the number of pixels, so the early epochs,
whose job is coarse, can run at a lower resolution (fastai's progressive resizing, FFCV's
resolution schedule). Training crops at a lower side than evaluation is also the FixRes
observation (Touvron et al., 2019): random-resized crops make objects look larger in
training than in the centre-cropped evaluation, so testing a little higher matches them.
"""

from __future__ import annotations

import math

PROGRESSIVE_START = 0.5  # the first epoch's side, as a fraction of the final one (a quarter of the pixels)
SIZE_STEP = 16  # sides are multiples of this: the stride of most stems, and fast kernels
MIN_SIDE = 32  # below this, early layers' feature maps vanish


def snap(side: float) -> int:
    """``side`` rounded down onto the size grid (multiples of ``SIZE_STEP``, at least ``MIN_SIDE``)."""
    return max(MIN_SIDE, int(side // SIZE_STEP) * SIZE_STEP)


def default_start(final: int) -> int:
    """``PROGRESSIVE_START`` of ``final``, on the size grid, never above ``final``."""
    return min(final, snap(final * PROGRESSIVE_START))


def train_sizes(epochs: int, final: int, *, progressive: bool = False, start: int | None = None) -> tuple[int, ...]:
    """The training side of each epoch: ``final`` throughout, or, progressive, a linear ramp
    from ``start`` (default :func:`default_start`) to ``final``, reached in the last
    ``ceil(epochs / 8)`` epochs (at least the last), so the run ends where it is evaluated."""
    if not progressive or epochs < 2:
        return (final,) * epochs
    first = default_start(final) if start is None else min(start, final)
    hold = max(1, math.ceil(epochs / 8))
    ramp = epochs - hold
    return tuple(min(final, snap(first + (final - first) * e / ramp)) for e in range(ramp)) + (final,) * hold


def describe(sizes: tuple[int, ...], eval_size: int) -> str:
    """``train 112->224 px, eval 224 px`` for the banner and the report."""
    lo, hi = min(sizes, default=eval_size), max(sizes, default=eval_size)
    train = f"{lo}px" if lo == hi else f"{lo}->{hi}px progressive"
    return f"{eval_size}px" if (lo == hi == eval_size) else f"train {train}, eval {eval_size}px"

"""Console output: progress bars for long work (data checks, decoding, the probe, lr-find,
epochs) on stderr, and the run's log lines on stdout.

One function each, so every bar looks alike, ``--quiet`` turns all bars off, and only rank 0
of a distributed run speaks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def bar(items: Iterable[T], desc: str, *, enabled: bool = True, total: int | None = None, unit: str = "it",
        leave: bool = False) -> Iterator[T]:
    """``items`` with a tqdm bar when ``enabled``; the bare iterator otherwise."""
    if not enabled:
        return iter(items)
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, leave=leave, dynamic_ncols=True)


def say(msg: str) -> None:
    """A run log line, from rank 0 only; ``--quiet`` drops the bars, not these."""
    if os.environ.get("RANK", "0") == "0":
        print(msg, flush=True)

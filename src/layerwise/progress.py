"""Progress bars for long work (data checks, decoding, the probe, lr-find, epochs), on stderr.

One function, so every bar looks alike and ``--quiet`` turns all of them off.
"""

from __future__ import annotations

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

"""The command line every competitor script takes, and the one way the benchmarks start a
process, so bench/speed.py and bench/suite.py drive every tool alike."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]


def competitor_parser() -> argparse.ArgumentParser:
    """DATA, --strategy head|partial|full, --epochs, --img-size, --batch-size, --seed; scripts
    add their own extras."""
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--strategy", default="full")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p


def run_child(cmd: list[str]) -> tuple[str, float, float]:
    """stdout, wall seconds and peak RSS (MB) of one process (set-up included)."""
    tic = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return out, time.perf_counter() - tic, usage.ru_maxrss / 1024


# a 1-minute load average above this on the 2-core machine means another job shared the CPU: a
# run measured then has a wall time that is not its own, and the reports mark it
LOADED = 3.0


def with_load(run: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> tuple[T, list[float]]:
    """run(*args, **kwargs)'s result and the 1-minute load average before and after it: the
    machine is shared, so every benchmark records how busy it was."""
    before = os.getloadavg()[0]
    out = run(*args, **kwargs)
    return out, [before, os.getloadavg()[0]]


def load_json(path: Path) -> dict:
    """A bench's recorded results, or none yet (a bench resumes from what ``save_json`` wrote)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def save_json(path: Path, obj: object) -> None:
    """Write through a temporary file: a benchmark saves after every run, and a kill then loses
    at most the run in progress, never the file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)

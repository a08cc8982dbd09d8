"""The command line every competitor script takes, and the one way the benchmarks start a
process, so bench/speed.py and bench/suite.py drive every tool alike."""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

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

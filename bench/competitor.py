"""The command line every competitor script takes, so bench/speed.py drives them alike."""

from __future__ import annotations

import argparse


def competitor_parser() -> argparse.ArgumentParser:
    """DATA, --strategy head|partial|full, --epochs, --img-size; scripts add their own extras."""
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--strategy", default="full")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--img-size", type=int, default=64)
    return p

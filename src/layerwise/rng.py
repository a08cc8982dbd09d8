"""Random number generators: seeding from ``(seed, epoch)``, and saving and restoring every
generator a training step draws from (CPU and CUDA), so a resume replays the same numbers."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch's seed: a resume at an epoch boundary reseeds exactly as the first run did."""
    return seed * 100_003 + epoch


def get_rng() -> dict[str, Any]:
    out: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng(state: dict[str, Any] | None) -> None:
    if state:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

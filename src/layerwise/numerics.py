"""The fastest numerics for this machine and model, measured rather than assumed.

Whether bf16 autocast or the channels_last memory format pays depends on the chip and the
architecture: on a CPU with AVX512-BF16, bf16 trained ResNet-18 1.75-2.2x faster, yet
EfficientNet's depthwise convolutions ran slower in bf16 than in fp32. So, when ``--precision``
or the memory format is left to ``auto``, a few training steps of each candidate on a copy of
the model decide, and the answer is cached per machine, torch version, model and image size.
"""

from __future__ import annotations

import copy
import itertools
import json
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from layerwise.checkpoint import atomic_write_text
from layerwise.hardware import Amp, cpu_has_fast_bf16, default_cache_dir, resolve_precision
from layerwise.progress import say

TRIAL_STEPS = 2  # timed steps per candidate, after one warm-up step
TRIAL_BATCH = 16  # images per trial step (the run's batch when smaller)
EXACT_MARGIN = 0.05  # fp32 is kept unless a lower precision is this much faster
CACHE_FILE = "numerics.json"


@dataclass(frozen=True)
class Numerics:
    precision: str
    channels_last: bool

    @property
    def label(self) -> str:
        return f"{self.precision}{' + channels_last' if self.channels_last else ''}"


def candidates(precision: str, channels_last: bool | None, device: torch.device) -> list[Numerics]:
    """Every combination left open: ``auto`` precision tries fp32 and the device's fast
    half precision (bf16, or fp16 on GPUs without bf16); ``None`` tries both layouts."""
    if precision == "auto":
        if device.type == "cuda":
            precisions = ["fp32", "bf16" if torch.cuda.is_bf16_supported() else "fp16"]
        else:  # a CPU without bf16 units only emulates it: not worth a trial
            precisions = ["fp32", "bf16"] if device.type == "cpu" and cpu_has_fast_bf16() else ["fp32"]
    else:
        precisions = [precision]
    layouts = [False, True] if channels_last is None else [channels_last]
    return [Numerics(p, c) for p, c in itertools.product(precisions, layouts)]


def fastest(seconds: Mapping[Numerics, float], *, margin: float = EXACT_MARGIN) -> Numerics:
    """The candidate with the fewest seconds per step; fp32 unless a lower precision beats
    the best fp32 by more than ``margin`` (exact arithmetic is worth a few percent)."""
    best = min(seconds, key=lambda c: seconds[c])
    exact = [c for c in seconds if c.precision == "fp32"]
    if exact:
        best_exact = min(exact, key=lambda c: seconds[c])
        if seconds[best_exact] <= seconds[best] * (1 + margin):
            return best_exact
    return best


def machine_key(device: torch.device) -> str:
    """What the timings depend on besides the model: the chip and the torch build."""
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = platform.processor() or platform.machine()
        try:
            chip = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        chip = f"{chip} x{torch.get_num_threads()} threads"
    return f"{device.type}:{chip}|torch {torch.__version__}"


def time_step(model: nn.Module, numerics: Numerics, device: torch.device, *, img_size: int, batch: int,
              num_classes: int, steps: int = TRIAL_STEPS) -> float:
    """Seconds per training step (forward, backward, optimizer) of a copy of ``model``."""
    net = copy.deepcopy(model).train()  # the trial must not touch the run's weights or BatchNorm statistics
    net = net.to(memory_format=torch.channels_last) if numerics.channels_last else net.to(
        memory_format=torch.contiguous_format)
    params = [p for p in net.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.0)
    amp = Amp(numerics.precision, device, net)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, generator=g).to(device)
    if numerics.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    elapsed = 0.0
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with amp.autocast():
            loss = nn.functional.cross_entropy(net(x).float(), y)
        amp.step(loss, opt, None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step pays for allocation and kernel selection
            elapsed += time.perf_counter() - tic
    return elapsed / steps


def choose(model: nn.Module, options: Sequence[Numerics], device: torch.device, *, model_name: str, img_size: int,
           batch: int, num_classes: int, cache_dir: Path) -> tuple[Numerics, str]:
    """The fastest of ``options`` and how it was known (measured, or cached from an earlier run)."""
    if len(options) == 1:
        return options[0], "as given"
    batch = max(2, min(batch, TRIAL_BATCH))
    key = f"{machine_key(device)}|{model_name}|{img_size}px|batch {batch}|{','.join(o.label for o in options)}"
    path = cache_dir / CACHE_FILE
    cached = _read_cache(path).get(key)
    if isinstance(cached, dict) and {"precision", "channels_last"} <= set(cached):
        choice = Numerics(str(cached["precision"]), bool(cached["channels_last"]))
        if choice in options:
            return choice, f"cached in {path}"
    seconds = {o: time_step(model, o, device, img_size=img_size, batch=batch, num_classes=num_classes)
               for o in options}
    choice = fastest(seconds)
    _remember(path, key, choice, seconds)
    table = ", ".join(f"{o.label} {batch / s:.0f}" for o, s in seconds.items())
    return choice, f"measured (img/s: {table})"


def _read_cache(path: Path) -> dict:
    """The cache's entries; a missing, damaged or foreign file (``[]``, deep nesting) is empty,
    and the next answer rewrites it."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(path: Path, key: str, choice: Numerics, seconds: Mapping[Numerics, float]) -> None:
    """Add the answer to the cache file; a cache that cannot be written only costs a re-measure."""
    data = _read_cache(path)
    data[key] = {"precision": choice.precision, "channels_last": choice.channels_last,
                 "seconds_per_step": {o.label: round(s, 5) for o, s in seconds.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=1))
    except OSError:
        pass


def fastest_numerics(precision: str, channels_last: bool | None, model: nn.Module, device: torch.device, *,
                     model_name: str, img_size: int, batch: int, num_classes: int, cache_dir: Path | None,
                     distributed: bool) -> Numerics:
    """Precision and memory format: as given, or the fastest of a short trial (cached), printed."""
    options = candidates(precision, channels_last, device)
    if distributed and len(options) > 1:  # ranks must agree: the fixed table rather than per-rank timings
        options = [Numerics(resolve_precision(precision, device, model),
                            True if channels_last is None else channels_last)]
    choice, how = choose(model, options, device, model_name=model_name, img_size=img_size, batch=batch,
                         num_classes=num_classes, cache_dir=cache_dir or default_cache_dir())
    if len(options) > 1:
        say(f"numerics: {choice.label}, the fastest of {len(options)} ({how})")
    return choice

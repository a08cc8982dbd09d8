"""Devices and numerics: which device, which precision, and the one AMP code path."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from layerwise.errors import LayerwiseError

RAM_BUDGET = 0.25  # caches (decoded images, features) take at most a quarter of the RAM


def total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "layerwise"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LayerwiseError(f"--device {name} asked for CUDA, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: where bf16 autocast measured 1.75-2.2x faster training."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def has_depthwise_convs(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())


def resolve_precision(precision: str, device: torch.device, model: nn.Module | None = None) -> str:
    """``auto``: bf16 on GPUs that support it; on CPUs with AMX/AVX512-BF16 too, except for
    depthwise-conv nets (EfficientNet, MobileNet), whose CPU bf16 kernels measured slower
    than fp32 here (Lite0 at 96 px: 48 vs 74 img/s; ResNet-18 at 112 px: 105 vs 61)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    fast = device.type == "cpu" and cpu_has_fast_bf16()
    return "bf16" if fast and not (model is not None and has_depthwise_convs(model)) else "fp32"


class Amp:
    """Autocast plus, for fp16, a gradient scaler: the one mixed-precision code path."""

    def __init__(self, precision: str, device: torch.device, model: nn.Module | None = None) -> None:
        precision = resolve_precision(precision, device, model)
        self.precision = precision
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype is torch.float16 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip: float | None) -> None:
        params = [p for pg in optimizer.param_groups for p in pg["params"] if p.grad is not None]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x

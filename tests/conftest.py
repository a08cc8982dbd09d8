"""Shared fixtures: tiny models and images made in the test, no network."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any accidental hub call fails fast
# The numerics trial and the disk cache write under the cache folder: keep tests out of ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="layerwise-tests-")

from hypothesis import settings  # noqa: E402

# CI replays the same examples every run (no flaky landings); local runs keep exploring.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
torch.set_num_threads(2)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class TinyNet(nn.Module):
    """A BatchNorm conv net with ResNet-style names, small enough for per-step tests."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def make_image_folder(root: Path, classes: int = 3, per_class: int = 6, size: int = 24, split: bool = True) -> Path:
    """Class folders of coloured-square images that a model can learn quickly."""
    g = torch.Generator().manual_seed(0)
    colours = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (200, 200, 40), (200, 40, 200)]
    subsets = {"train": per_class, "val": max(2, per_class // 2)} if split else {"": per_class}
    for sub, n in subsets.items():
        for c in range(classes):
            d = root / sub / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = torch.randint(0, 40, (size, size, 3), generator=g)
                px = (torch.tensor(colours[c % len(colours)]) + noise).clamp(0, 255).to(torch.uint8)
                Image.fromarray(px.numpy()).save(d / f"{i}.png")
    return root


@contextlib.contextmanager
def hang_guard(seconds: float):
    """Fail, instead of hanging the suite, when the body runs past ``seconds``: a hang
    detector (a loop that never ends), not a speed target."""
    def stop(*_):
        raise TimeoutError(f"did not return within {seconds}s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# A fit small enough for a unit test: a random-init timm test net at 32 px, one loader process.
TINY = ["--model", "timm/test_efficientnet", "--weights", "none", "--img-size", "32", "--batch-size", "8",
        "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three classes of eight coloured squares each, train/ and val/ (shared by a test module)."""
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=8)


@pytest.fixture(autouse=True)
def _no_probe_from_another_test():
    """engine keeps probe results for the process (by what the probe reads); a test that patches
    the probe's internals must not be handed another test's result."""
    from layerwise import engine

    engine._probed.clear()
    yield


@pytest.fixture
def no_network(monkeypatch) -> list[tuple]:
    """Every connection attempt fails, as on a machine with no network at all; the attempts
    are recorded in the returned list."""
    import socket

    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts

"""Weights from model hubs (torch.hub, the Hugging Face Hub): a download that fails, or cannot
happen, becomes a user error that says where the file comes from and how to do without it."""

from __future__ import annotations

import contextlib
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch

from layerwise.errors import LayerwiseError, quote_error


class WeightsDownloadError(LayerwiseError):
    """Pretrained weights that must be downloaded could not be."""


# One connection attempt before a Hugging Face download: offline, the hub client retries five
# times with backoff (52 s on this machine for hf-hub:timm/resnet18.a1_in1k) before failing.
REACH_TIMEOUT_S = 3.0


def torch_cache_dir() -> str:
    return str(Path(torch.hub.get_dir()) / "checkpoints")


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


@contextlib.contextmanager
def explain_download(what: str, url: str, cache: str, env: str, why: str | None = None) -> Iterator[None]:
    """A failed weights download (no network, proxy, offline mode) becomes a user error that
    says where the file comes from, where it is cached, and how to use a local copy."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # URLError, hub's LocalEntryNotFoundError, HTTP errors
        raise WeightsDownloadError(
            f"{what} need a download from {url}, which failed ({why or quote_error(e)}). "
            f"Downloaded weights are cached in {cache} (set {env} to move it) and are used from "
            "there without a network; copy the file there, or pass a local file with --weights path/to/file.pth "
            "(or .safetensors), or train from scratch with --weights none."
        ) from e


def unreachable(url: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """Why the host of ``url`` cannot be reached (one TCP connection), or None. Behind a proxy
    the host is never dialled directly, so there it is left to the client to find out."""
    parsed = urlparse(url)
    if parsed.hostname is None or urllib.request.getproxies().get(parsed.scheme):
        return None
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"{parsed.hostname} unreachable: {quote_error(e)}"
    return None


@contextlib.contextmanager
def hf_download(what: str, url: str) -> Iterator[None]:
    """Around a Hugging Face Hub download (timm's ``pretrained=True``). When the hub cannot be
    reached, the download runs in the client's own offline mode: weights in the cache load at
    once, and missing ones fail at once instead of after the client's retries."""
    from huggingface_hub import constants

    why = None if constants.HF_HUB_OFFLINE else unreachable(constants.ENDPOINT)
    with explain_download(what, url, hf_cache_dir(), "HF_HOME", why):
        if why is None:
            yield
            return
        # HF_HUB_OFFLINE is read from the environment once, at import; the client consults this
        # constant on every call, so it is set for this download only
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = False

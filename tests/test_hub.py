"""Hub downloads offline: the cache loads without a network, a missing file fails at once."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from layerwise.hub import WeightsDownloadError, unreachable
from layerwise.models import create_model

REPO = "timm/resnet18.a1_in1k"


@pytest.fixture
def hub_online(monkeypatch, tmp_path):
    """The hub client as a user has it (not in offline mode), with an empty cache of the test's own."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_unreachable_names_the_host_and_proxies_are_left_to_the_client(no_network, monkeypatch):
    assert unreachable("https://huggingface.co").startswith("huggingface.co unreachable: OSError")
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert unreachable("https://huggingface.co") is None  # behind a proxy the host is not dialled


def test_missing_hub_weights_fail_after_one_connection_attempt(no_network, hub_online):
    """Without the reachability check the client retries (six attempts, 23 s of backoff)."""
    from huggingface_hub import constants

    with pytest.raises(WeightsDownloadError, match="huggingface.co unreachable") as e:
        create_model(f"hf-hub:{REPO}", 3)
    assert "--weights none" in str(e.value) and str(hub_online) in str(e.value)
    assert len(no_network) == 1
    assert constants.HF_HUB_OFFLINE is False  # offline mode was for that download only


def test_cached_hub_weights_load_without_a_network(no_network, hub_online):
    src = create_model(f"hf-hub:{REPO}", 1000, weights="none").model
    snapshot = hub_online / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    loaded = create_model(f"hf-hub:{REPO}", 3)
    torch.testing.assert_close(loaded.model.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert loaded.model.fc.out_features == 3 and len(no_network) == 1

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TinyNet, make_image_folder
from layerwise import features
from layerwise.capture import spill_tensor
from layerwise.checkpoint import read_jsonl
from layerwise.cli import main
from layerwise.groups import layer_groups
from layerwise.prefix import boundary_outputs, plan_replay


def test_replay_gives_the_model_s_logits_and_leaves_the_model_whole():
    model = TinyNet().eval()
    groups = layer_groups(model)
    names = [g.name for g in groups]
    x = torch.randn(4, 3, 8, 8)
    replay = plan_replay(model, groups, names.index("layer2"), x)
    assert replay is not None and replay.boundary == "layer1" and set(replay.skipped) == {"conv1", "bn1"}
    acts = boundary_outputs(model, replay.boundary, x)
    assert torch.allclose(replay(acts), model(x), atol=1e-6)
    assert isinstance(model.layer1, nn.Sequential) and isinstance(model.conv1, nn.Conv2d)  # swapped back


class SkipAcross(TinyNet):
    """A skip connection from the stem to the head: the prefix's output is not all the rest needs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.bn1(self.conv1(x))
        y = self.layer2(self.layer1(stem))
        return self.fc(self.pool(y).flatten(1) + self.pool(stem).flatten(1).sum(1, keepdim=True))


def test_a_forward_that_cannot_be_cut_is_refused():
    model = SkipAcross().eval()
    groups = layer_groups(model)
    assert plan_replay(model, groups, [g.name for g in groups].index("layer2"), torch.randn(2, 3, 8, 8)) is None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=10, size=32)


GRADUAL = ["--model", "resnet18", "--weights", "none", "--img-size", "32", "--batch-size", "8", "--workers", "0", "--augment", "none",
           "--strategy", "gradual", "--every", "2", "--epochs", "4", "--precision", "fp32", "--no-channels-last", "--seed", "1"]


@pytest.fixture(scope="module")
def plain_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    assert main(["fit", str(data), *GRADUAL, "--feature-cache", "off", "--out", str(out)]) == 0
    return out


def assert_same_run(cached_run, plain_run):
    cached, plain = read_jsonl(cached_run / "metrics.jsonl"), read_jsonl(plain_run / "metrics.jsonl")
    assert [r["trainable_groups"] for r in cached] == [r["trainable_groups"] for r in plain]
    assert cached[2]["trainable_groups"] == ["layer4", "head"]  # epochs 2-3: a frozen prefix (stem..layer3)
    # both epochs of each cut train on cached inputs: the cut is planned once and kept
    assert [r["cached_inputs"] for r in cached] == ["head", "head", "prefix:4", "prefix:4"]
    assert [r["cached_inputs"] for r in plain] == [None] * 4
    for a, b in zip(cached, plain):
        for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), (k, a["epoch"])
    from safetensors.torch import load_file

    wa, wb = load_file(cached_run / "best.safetensors"), load_file(plain_run / "best.safetensors")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-5), k


def test_gradual_with_the_prefix_cache_equals_the_run_without(data, plain_run, tmp_path, capsys):
    assert main(["fit", str(data), *GRADUAL, "--out", str(tmp_path / "cached")]) == 0
    out, err = capsys.readouterr()
    assert "the groups after the frozen prefix train on cached inputs" in out and "memory-mapped" not in out
    assert "feature cache: train view 1/1" in err and "feature cache: val" in err  # its progress bars
    assert_same_run(tmp_path / "cached", plain_run)


def test_activations_too_large_for_ram_go_to_a_memory_map_and_give_the_same_run(data, plain_run, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setattr(features, "total_ram", lambda: 1024)  # nothing fits in a quarter of 1 KiB
    assert main(["fit", str(data), *GRADUAL, "--out", str(tmp_path / "cached")]) == 0
    out = capsys.readouterr().out
    assert "exceed a quarter of the RAM; they go to a memory-mapped file" in out
    assert_same_run(tmp_path / "cached", plain_run)
    assert not list(features.spill_dir().iterdir())  # the files were unlinked as soon as mapped


def test_activations_that_fit_nowhere_run_the_frozen_groups(data, plain_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(features, "total_ram", lambda: 1024)
    monkeypatch.setattr(features, "free_disk", lambda _folder: 1024)
    assert main(["fit", str(data), *GRADUAL, "--out", str(tmp_path / "run")]) == 0
    assert "fit neither a quarter of the RAM nor half the free disk" in capsys.readouterr().out
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["cached_inputs"] for r in rows] == ["head", "head", None, None]


def test_spill_tensor_keeps_its_values_without_a_file(tmp_path):
    t = spill_tensor((3, 4), tmp_path)
    t[:] = torch.arange(12.0).view(3, 4)
    assert not list(tmp_path.iterdir()) and t[2, 3] == 11.0 and t[[0, 2]].shape == (2, 4)


def test_free_disk_reads_the_nearest_existing_folder(tmp_path, monkeypatch):
    from types import SimpleNamespace

    seen = []
    monkeypatch.setattr(features.shutil, "disk_usage", lambda p: (seen.append(p), SimpleNamespace(free=7))[1])
    assert features.free_disk(tmp_path / "not" / "yet") == 7 and seen == [tmp_path]


def test_a_spill_file_the_disk_cannot_hold_is_a_clear_error(tmp_path, monkeypatch):
    import errno
    import os

    from layerwise.errors import LayerwiseError

    def full(*_a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(LayerwiseError, match="no room for the feature cache's .* --feature-cache off"):
        spill_tensor((1000, 4), tmp_path)
    assert not list(tmp_path.iterdir())

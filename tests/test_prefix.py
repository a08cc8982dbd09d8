from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TinyNet, make_image_folder
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


def test_gradual_with_the_prefix_cache_equals_the_run_without(data, tmp_path, capsys):
    common = ["fit", str(data), "--model", "resnet18", "--weights", "none", "--img-size", "32", "--batch-size", "8",
              "--workers", "0", "--augment", "none", "--strategy", "gradual", "--every", "2", "--epochs", "4",
              "--precision", "fp32", "--no-channels-last", "--seed", "1"]
    assert main([*common, "--out", str(tmp_path / "cached")]) == 0
    out = capsys.readouterr().out
    assert "the groups after the frozen prefix train on cached inputs" in out
    assert main([*common, "--feature-cache", "off", "--out", str(tmp_path / "plain")]) == 0
    cached, plain = read_jsonl(tmp_path / "cached" / "metrics.jsonl"), read_jsonl(tmp_path / "plain" / "metrics.jsonl")
    assert [r["trainable_groups"] for r in cached] == [r["trainable_groups"] for r in plain]
    assert cached[2]["trainable_groups"] == ["layer4", "head"]  # epochs 2-3: a frozen prefix (stem..layer3)
    for a, b in zip(cached, plain):
        for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), (k, a["epoch"])
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "cached" / "best.safetensors"), load_file(tmp_path / "plain" / "best.safetensors")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-5), k

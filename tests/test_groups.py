from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torchvision import models as tvm

from layerwise.errors import LayerwiseError, UnknownNameError
from layerwise.groups import find_group, layer_groups, under

ARCHS = {
    "resnet50": lambda: tvm.resnet50(),
    "resnext50_32x4d": lambda: tvm.resnext50_32x4d(),
    "efficientnet_b0": lambda: tvm.efficientnet_b0(),
    "mobilenet_v2": lambda: tvm.mobilenet_v2(),
    "mobilenet_v3_small": lambda: tvm.mobilenet_v3_small(),
    "convnext_tiny": lambda: tvm.convnext_tiny(),
    "vgg11": lambda: tvm.vgg11(),
    "densenet121": lambda: tvm.densenet121(),
    "vit_b_16": lambda: tvm.vit_b_16(),
    "swin_t": lambda: tvm.swin_t(),
    "timm_efficientnet_lite0": lambda: timm.create_model("efficientnet_lite0"),
    "timm_vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224"),
    "timm_convnext_atto": lambda: timm.create_model("convnext_atto"),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    torch.manual_seed(0)
    model = ARCHS[request.param]()
    return request.param, model, layer_groups(model)


def test_every_parameter_in_exactly_one_group(arch):
    _, model, groups = arch
    owned = [p for g in groups for p in g.params]
    assert sorted(owned) == sorted(n for n, _ in model.named_parameters())
    assert len(owned) == len(set(owned))
    for g in groups:  # blocks partition their group
        assert sorted(p for b in g.blocks for p in b) == sorted(g.params)


def test_groups_ordered_stem_to_head(arch):
    _, model, groups = arch
    assert groups[-1].name == "head"
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    # Groups follow the network's own order: each group starts after the previous one starts.
    firsts = [min(order[p] for p in g.params) for g in groups[:-1]]
    assert firsts == sorted(firsts)
    assert len(groups) >= 4, [g.name for g in groups]


def test_head_group_holds_the_classifier(arch):
    name, model, groups = arch
    head = groups[-1]
    weights = [p for p in head.params if p.endswith("weight")]
    assert weights, head.params
    out_dims = {dict(model.named_parameters())[p].shape[0] for p in weights}
    assert 1000 in out_dims


def test_resnet_groups_are_the_tutorials():
    groups = layer_groups(tvm.resnet18())
    assert [g.name for g in groups] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert groups[0].params == ("conv1.weight", "bn1.weight", "bn1.bias")
    assert groups[-1].params == ("fc.weight", "fc.bias")
    # The substring bug: 'conv1' in name would put layer1.0.conv1 into the stem.
    assert all(not p.startswith("layer") for p in groups[0].params)
    assert "layer1.0.conv1.weight" in groups[1].params


def test_module_boundary_matching():
    assert under("layer1.0.conv1.weight", "layer1")
    assert not under("layer10.weight", "layer1")
    assert not under("fc1.weight", "fc")
    assert under("fc.weight", "fc")


def test_se_block_fc_is_not_the_head():
    # timm's SE blocks have fc1/fc2; 'fc' in name would call them the classifier.
    model = timm.create_model("seresnet18")
    groups = layer_groups(model)
    assert groups[-1].params == ("fc.weight", "fc.bias")
    assert any(".se.fc1." in p for g in groups[:-1] for p in g.params)


def test_unknown_group_lists_valid_names():
    groups = layer_groups(tvm.resnet18())
    with pytest.raises(UnknownNameError) as e:
        find_group(groups, "layer3x")
    msg = str(e.value)
    assert "layer3x" in msg and all(n in msg for n in ["stem", "layer1", "layer4", "head"])


def test_user_spec_paths_and_regex(tiny):
    groups = layer_groups(tiny, {"early": ["conv1", "bn1"], "mid": r"layer\d\.", "top": "fc"})
    assert [g.name for g in groups] == ["early", "mid", "top"]
    assert set(groups[1].params) == {n for n, _ in tiny.named_parameters() if n.startswith("layer")}


def test_user_spec_must_cover_every_parameter(tiny):
    with pytest.raises(LayerwiseError, match="match no group"):
        layer_groups(tiny, {"stem": ["conv1", "bn1"], "head": "fc"})


def test_fallback_for_plain_modules():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    groups = layer_groups(model)
    assert [g.name for g in groups] == ["0", "2", "head"]
    assert groups[-1].params == ("4.weight", "4.bias")


def test_vit_blocks_are_finer_than_stages():
    groups = layer_groups(timm.create_model("vit_tiny_patch16_224"))
    assert len(groups) == 14  # stem, 12 blocks, head
    assert groups[0].name == "stem" and "cls_token" in groups[0].params

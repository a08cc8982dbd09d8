"""Run only the trainable suffix of a model whose first groups are frozen.

While groups ``0..k-1`` are frozen (gradual unfreezing, partial fine-tuning), their output
for a given image never changes, so it can be computed once and replayed: each training step
then costs the suffix alone. Any architecture works, without knowing its ``forward``: the
frozen modules are found by the order they run in, and for the duration of one forward
call the last of them is swapped for a module that returns the stored activations while the
others become identities. The swap is checked against the real model on one batch before it
is trusted (a skip connection across the boundary would fail the check), and undone after
every call, so checkpoints and evaluation always see the real model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from layerwise.capture import captured
from layerwise.groups import LayerGroup

MATCH_TOLERANCE = 1e-4  # largest |logit difference| between the replayed and the real forward pass


class _Replay(nn.Module):
    """Returns the stored activations, whatever it is given."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, *_args: object, **_kw: object) -> torch.Tensor:
        return self.value


def _owner(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), name


def frozen_modules(model: nn.Module, prefix_params: set[str]) -> list[str]:
    """The largest modules all of whose parameters are in ``prefix_params`` (and that have some)."""
    out: list[str] = []
    for name, module in model.named_modules():
        params = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
        if not params or not all(p in prefix_params for p in params):
            continue
        if any(name == o or name.startswith(o + ".") for o in out):
            continue  # inside a module already taken
        out.append(name)
    return [n for n in out if n]


def call_order(model: nn.Module, modules: Sequence[str], x: torch.Tensor) -> list[str]:
    """``modules`` in the order their forward passes finish on input ``x``."""
    done: list[str] = []
    hooks = [model.get_submodule(m).register_forward_hook(lambda *_a, m=m: done.append(m)) for m in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(done))


class PrefixReplay(nn.Module):
    """``model`` with its frozen prefix replaced by stored activations: call it on a batch of
    the boundary's outputs, get the model's logits for those images."""

    def __init__(self, model: nn.Module, skipped: Sequence[str], boundary: str) -> None:
        super().__init__()
        self.model, self.skipped, self.boundary = model, tuple(skipped), boundary

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        swaps = [(path, nn.Identity()) for path in self.skipped] + [(self.boundary, _Replay(acts))]
        originals = []
        try:
            for path, stand_in in swaps:
                owner, name = _owner(self.model, path)
                originals.append((owner, name, getattr(owner, name)))
                setattr(owner, name, stand_in)
            # The input only flows through identities and parameter-free ops into the replay.
            return self.model(acts)
        finally:
            for owner, name, module in reversed(originals):
                setattr(owner, name, module)


def boundary_outputs(model: nn.Module, boundary: str, x: torch.Tensor) -> torch.Tensor:
    """The boundary module's output for ``x``, as the feature store keeps it (float32), on
    ``x``'s device; the rest of the forward pass is skipped."""
    labels = torch.zeros(len(x), dtype=torch.long)  # captured() pairs every batch with labels
    acts, _ = captured(model, model.get_submodule(boundary), [(x, labels)], x.device, contextlib.nullcontext,
                       lambda t: t, output=True)
    return acts.to(x.device).clone()  # a normal tensor: captured() runs in inference mode


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _frozen_order(model: nn.Module, groups: Sequence[LayerGroup], first_trainable: int,
                  sample: torch.Tensor) -> tuple[list[str], list[str]]:
    """Groups ``0..first_trainable-1``'s largest modules, and the order they run in on ``sample``."""
    modules = frozen_modules(model, {p for g in groups[:first_trainable] for p in g.params})
    if not modules:
        return [], []
    with _evaluating(model):
        return modules, call_order(model, modules, sample)


def prefix_output(model: nn.Module, groups: Sequence[LayerGroup], first_trainable: int,
                  sample: torch.Tensor) -> str | None:
    """The module whose output is groups ``0..first_trainable-1``'s output: the last of their
    modules to run on ``sample`` (None when they hold no module of their own)."""
    _, order = _frozen_order(model, groups, first_trainable, sample)
    return order[-1] if order else None


def plan_replay(model: nn.Module, groups: Sequence[LayerGroup], first_trainable: int,
                sample: torch.Tensor) -> PrefixReplay | None:
    """A replay of groups ``0..first_trainable-1`` that gives the model's own logits on
    ``sample`` (eval mode), or None when this model's forward cannot be cut there."""
    try:
        modules, order = _frozen_order(model, groups, first_trainable, sample)
        if not modules or set(order) != set(modules):
            return None  # nothing frozen of its own, or a frozen module that does not run, or runs twice
        replay = PrefixReplay(model, order[:-1], order[-1])
        with _evaluating(model), torch.no_grad():
            expected = model(sample)
            got = replay(boundary_outputs(model, order[-1], sample))
        if got.shape != expected.shape or (got - expected).abs().max().item() > MATCH_TOLERANCE:
            return None
        return replay
    except (RuntimeError, TypeError, ValueError, IndexError):  # the cut broke the forward pass
        return None

"""Model soups (Wortsman et al., 2022): average the weights of runs that share their
pretrained start, and keep an ingredient only when the average scores better on val.

``layerwise compare --soup`` cooks one from the runs it made (users already paid for them);
the soup is written as a run folder (``model.json`` and ``best.safetensors``), so
``evaluate``, ``predict`` and ``export`` take it like any run.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from layerwise import rundir
from layerwise.config import RunConfig

State = Mapping[str, torch.Tensor]
SAME_MODEL = ("source", "arch", "head", "hidden", "num_classes", "classes", "img_size")  # what ingredients share


def average(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """The mean of each floating tensor (counters come from the first state)."""
    if not states:
        raise ValueError("a soup needs at least one ingredient")
    keys = states[0].keys()
    if any(s.keys() != keys for s in states):
        raise ValueError("a soup needs one architecture: the runs' tensors differ")
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in states[0].items()}


@dataclass(frozen=True)
class Soup:
    members: tuple[int, ...]  # indices into the runs, best single run first
    val_acc: float
    tried: tuple[tuple[int, float, bool], ...]  # (run, the soup's val acc with it, kept)
    state: dict[str, torch.Tensor]


def greedy_soup(states: Sequence[State], val_accs: Sequence[float], score: Callable[[State], float], *,
                settle: Callable[[State], dict[str, torch.Tensor]] | None = None,
                start: tuple[int, float] | None = None) -> Soup:
    """Start from the best run on val; add each next-best run if the average with it scores at
    least as well on val (the paper's greedy recipe). Never below the starting run on val.
    ``settle`` turns an average into the state scored and kept (BatchNorm statistics
    re-estimated for it); ``start`` is another first ingredient and its known val accuracy
    (auto's race starts from its verdict)."""
    first, best = start if start is not None else (max(range(len(states)), key=lambda i: val_accs[i]), None)
    order = [first] + sorted((i for i in range(len(states)) if i != first), key=lambda i: -val_accs[i])
    members, soup = [first], dict(states[first])
    best = score(soup) if best is None else best
    tried = [(first, best, True)]
    for i in order[1:]:
        mix = average([states[j] for j in [*members, i]])
        mix = settle(mix) if settle is not None else mix
        acc = score(mix)
        keep = acc >= best
        tried.append((i, acc, keep))
        if keep:
            members.append(i)
            best, soup = acc, mix
    return Soup(tuple(members), best, tuple(tried), soup)


def cook(runs: Sequence[Path], val_accs: Sequence[float], cfg: RunConfig, dest: Path) -> dict:
    """A greedy soup of ``runs`` (those of the best run's architecture and head), scored on
    ``cfg``'s val split, written to ``dest`` as a run folder with ``soup.json`` (and
    ``test.json`` when DATA has test/). Returns soup.json's record."""
    from safetensors.torch import load_file

    from layerwise.checkpoint import save_weights, write_json
    from layerwise.data import check_images
    from layerwise.evaluation import test_result
    from layerwise.inference import scorer
    from layerwise.setup import load_data

    top = max(range(len(runs)), key=lambda i: val_accs[i])
    shape = {k: rundir.read_model_info(runs[top])[k] for k in SAME_MODEL}
    kin = [i for i, r in enumerate(runs) if all(rundir.read_model_info(r)[k] == v for k, v in shape.items())]
    score, splits = scorer(runs[top], device=cfg.device or "auto"), load_data(cfg)  # fp32: the soup's own numerics
    val, model = check_images(splits.val)[0], score.run.model

    def score_state(state: State) -> float:
        model.load_state_dict(state)
        return score(val).acc

    states = [load_file(rundir.RunDir(runs[i]).best) for i in kin]
    soup = greedy_soup(states, [val_accs[i] for i in kin], score_state)
    model.load_state_dict(soup.state)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(rundir.RunDir(runs[top]).model, rundir.RunDir(dest).model)
    save_weights(rundir.RunDir(dest).best, model)
    record = {"members": [str(runs[kin[i]]) for i in soup.members], "val_acc": soup.val_acc,
              "tried": [{"run": str(runs[kin[i]]), "val_acc": acc, "kept": kept} for i, acc, kept in soup.tried],
              "left_out": [str(r) for i, r in enumerate(runs) if i not in kin],
              "note": "greedy soup (Wortsman et al. 2022): val accuracy scored in fp32, ingredients best first"}
    test = check_images(splits.test)
    if test[0]:
        ev = score(test[0])
        write_json(rundir.RunDir(dest).test, test_result(ev, test[0], test[1], ()))
        record["test_acc"] = ev.acc
    write_json(rundir.RunDir(dest).soup, record)
    return record

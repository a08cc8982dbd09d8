"""Averaging in weight space after auto's race: it costs evaluations, not training.

First a greedy soup of the racers (Wortsman et al., 2022): the winner's finished weights, then
each loser's weights at the end of its rung, best on val first, each kept only when the average
scores at least as well on val. They share their start (the same pretrained weights), which is
what lets an average land in one basin; where it does not, val says so and the soup stays the
winner alone. Then WiSE-FT (wise.py) between the probe model and that result.

Every step is scored on val with the winner's own numerics (its metrics row's), so "at least as
well" compares like with like. A result better than the winner on val becomes the run's
best.safetensors and is scored once on DATA/test; the winner's own weights stay in its race
folder, so a repeat after a kill starts from them again and makes the same choices.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from layerwise import rundir
from layerwise.checkpoint import atomic_write_text, load_weights, read_jsonl, save_weights, write_json
from layerwise.config import RunConfig
from layerwise.data import ImageDataset, Splits, check_images, spread
from layerwise.evaluation import score_test
from layerwise.freeze import recalibrate_norms
from layerwise.groups import head_module
from layerwise.inference import Scorer, paused_weights, run_views, validated_scorer
from layerwise.progress import say
from layerwise.racecost import WISE_NORM_IMAGES
from layerwise.soup import greedy_soup
from layerwise.wise import norm_stats_differ, wise_ft

State = Mapping[str, torch.Tensor]


class NormBatches:
    """``images`` training images for BatchNorm re-estimation, spread over the classes, decoded
    once on the first mix that needs them."""

    def __init__(self, splits: Splits, score: Scorer, images: int = WISE_NORM_IMAGES) -> None:
        self._splits, self._score, self._images, self._batches = splits, score, images, list[torch.Tensor]()

    def __call__(self) -> list[torch.Tensor]:
        from layerwise.loaders import ordered_loader

        if not self._batches:
            picked = [self._splits.train[i] for i in spread(len(self._splits.train), self._images)]
            ds = ImageDataset(check_images(picked)[0], self._score.run.transform())
            self._batches.extend(x.to(self._score.device) for x, _ in ordered_loader(ds, self._score.batch_size, 0))
        return self._batches


def finish(cfg: RunConfig, run: Path, winner: Path, losers: Mapping[Path, float], val: Sequence[tuple],
           splits: Splits, *, paused: bool = False) -> dict:
    """The soup of the winner and ``losers`` (their run folders and rung val accuracies; with
    ``paused``, their weights where they paused mid-epoch, else their best), then
    WiSE-FT, as ``cfg.soup`` and ``cfg.wise`` ask. Writes soup.json, wise.json, report.md
    sections and, when the result beats the winner on val, best.safetensors and test.json.
    Returns race.json's record of both."""
    rd = rundir.RunDir(run)
    score, views = validated_scorer(winner), run_views(winner)
    model, norm = score.run.model, NormBatches(splits, score)
    winner_acc = score(val).acc
    out: dict = {"winner_val_acc": winner_acc}
    acc, kept = winner_acc, {}
    # DATA/test decoded once, and only if a mix needs a score
    test: Callable[[], tuple[list, list[dict]]] = functools.cache(lambda: check_images(splits.test))

    def tested() -> dict:  # the model as it stands on DATA/test, with the run's TTA views
        return score_test(lambda v: score(test()[0], views=v), *test(), views)

    if cfg.soup and losers:
        out["soup"] = _soup(model, winner_acc, losers, lambda: score(val).acc, norm, paused=paused)
        acc = out["soup"]["val_acc"]
        kept["soup_members"] = out["soup"]["members"]
        soup = dict(out["soup"])
        if len(soup["members"]) > 1 and cfg.wise and test()[0]:  # the soup's own test score, before WiSE-FT mixes it
            soup["test"] = tested()
            out["soup"]["test_acc"] = soup["test"]["test_acc"]
        write_json(rd.soup, soup)
        _append_report(rd, soup_section(out["soup"], winner.name))
    if cfg.wise and rd.probe_head.is_file():
        out["wise"] = _wise(cfg, model, acc, lambda: score(val).acc, norm, splits, rd)
        kept["wise_alpha"] = out["wise"]["alpha"]
        write_json(rd.wise, out["wise"])
        _append_report(rd, wise_section(out["wise"]))
    changed = len(out.get("soup", {}).get("members", [None])) > 1 or out.get("wise", {}).get("alpha", 1.0) < 1.0
    if changed:
        test_acc = _adopt(rd, score, val, test(), views, kept)
        if test_acc is not None:
            out["test_acc"] = test_acc
            for part in ("soup", "wise"):  # each record says what the run ended with
                if part in out:
                    out[part]["final_test_acc"] = test_acc
    return out


def _adopt(rd: rundir.RunDir, score: Scorer, val: Sequence[tuple], test: tuple[list, list[dict]],
           views: Sequence[str], record: dict) -> float | None:
    """The weights in ``score``'s model become the run's: best.safetensors, tta.json's val score
    with the run's views, and test.json (with ``record``) when DATA has a test split (``test``:
    its checked images and the skipped ones); returns the test accuracy, if any."""
    save_weights(rd.best, score.run.model)
    if views:  # tta.json held the winner's val score with the views: now these weights'
        ev = score(val, views=views)
        write_json(rd.tta, {"views": list(views), "val_acc": ev.acc, "val_loss": ev.loss})
    items, skipped = test
    if not items:
        return None
    res = score_test(lambda v: score(items, views=v), items, skipped, views)
    write_json(rd.test, res | record)
    return float(res["test_acc"])


def probe_guard(cfg: RunConfig, run: Path, val: Sequence[tuple], splits: Splits) -> dict:
    """Without a race, auto is never below its own probe on val: the probe model is its first
    metrics row, and only a better epoch replaces it (evidence.begin_at_probe). The race's
    candidates start from a fresh head with no such row (race.candidate_config), so here, after
    the race and its averaging, the same promise is kept: when the probe's val accuracy
    (probe.json) tops the winner's best epoch, the probe model (the pretrained body with the
    probe's head) and the run's weights are scored on the same val images with the run's
    numerics, and the probe model, if better, becomes the run's. On SqueezeNet (seed 0, held-out
    splits) the winner ended below the probe on val on dtd, flowers17 and pbc-blood; on none of
    the Lite0/1/2 races. Its cost, a model set-up and two val passes, is paid only then."""
    rd = rundir.RunDir(run)
    probe_acc = json.loads(rd.probe.read_text()).get("val_acc") if rd.probe.is_file() else None
    best = max(r["val_acc"] for r in read_jsonl(rd.metrics) if r.get("val_acc") is not None)
    rec: dict = {"probe_val_acc": probe_acc, "winner_best_val_acc": best, "kept": False}
    if probe_acc is None or probe_acc <= best or not rd.probe_head.is_file():
        return rec
    score = validated_scorer(run)
    rec["run_val_acc"] = score(val).acc
    probe = _probe_state(cfg, splits, rd)
    if probe is None:
        return rec
    score.run.model.load_state_dict(probe)
    rec["probe_model_val_acc"] = score(val).acc
    if rec["probe_model_val_acc"] <= rec["run_val_acc"]:
        return rec
    rec["kept"] = True
    say(f"probe guard: the probe model scores {rec['probe_model_val_acc']:.4f} on val, the race's result "
        f"{rec['run_val_acc']:.4f}: best.safetensors is the probe model")
    test_acc = _adopt(rd, score, val, check_images(splits.test), run_views(run), {"probe_model": True})
    if test_acc is not None:
        rec["test_acc"] = test_acc
    _append_report(rd, "\n".join(["", "## The probe model kept", "",
                                   f"The race's result scored {rec['run_val_acc']:.4f} on val and the probe model "
                                   f"(the pretrained body with the probe's head) {rec['probe_model_val_acc']:.4f}: "
                                   "best.safetensors holds the probe model, as a run without the race would "
                                   "(auto is never below its own probe on val).", ""]))
    return rec


def _soup(model: nn.Module, winner_acc: float, losers: Mapping[Path, float], val_acc: Callable[[], float],
          norm: Callable[[], list[torch.Tensor]], *, paused: bool = False) -> dict:
    """A greedy soup in ``model`` (which holds the winner): the winner first, whatever its val
    accuracy against the losers' rungs (it trained longest), then the losers best first (with
    ``paused``, each with the weights it paused with mid-epoch: the ones its rung was scored on)."""
    from safetensors.torch import load_file

    names = ["winner", *(p.name for p in losers)]
    device = next(model.parameters()).device
    states: list[State] = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    states += [{k: v.to(device) for k, v in paused_weights(p).items()} if paused
               else load_file(rundir.RunDir(p).best, device=str(device)) for p in losers]
    if any(s.keys() != states[0].keys() for s in states[1:]):
        return {"skipped": "the racers' models differ in their tensors", "members": ["winner"], "val_acc": winner_acc}
    recal = any(norm_stats_differ(model, states[0], s) for s in states[1:])

    def settle(state: State) -> dict[str, torch.Tensor]:  # an average's own BatchNorm statistics
        model.load_state_dict(state)
        if recal:
            recalibrate_norms(model, norm())
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def score(state: State) -> float:
        model.load_state_dict(state)
        return val_acc()

    # the race's verdict starts the soup, whatever a loser's rung scored
    soup = greedy_soup(states, [winner_acc, *losers.values()], score, settle=settle, start=(0, winner_acc))
    model.load_state_dict(soup.state)
    say("soup of the racers: val acc " + ", ".join(f"{names[i]} {a:.4f}" + ("" if k else " (left out)")
                                                  for i, a, k in soup.tried))
    return {"members": [names[i] for i in soup.members], "val_acc": soup.val_acc, "recalibrated": recal,
            "tried": [{"ingredient": names[i], "val_acc": a, "kept": k} for i, a, k in soup.tried],
            "rung_val_acc": {p.name: a for p, a in losers.items()}}


def _wise(cfg: RunConfig, model: nn.Module, one_acc: float, val_acc: Callable[[], float], norm: NormBatches, splits: Splits,
          rd: rundir.RunDir) -> dict:
    """WiSE-FT between the probe model (the pretrained body with the probe's head) and ``model``."""
    probe = _probe_state(cfg, splits, rd)
    if probe is None:
        return {"skipped": "no linear head", "alphas": [1.0], "val_acc": [one_acc], "alpha": 1.0}
    device = next(model.parameters()).device
    res, _ = wise_ft(model, {k: v.to(device) for k, v in probe.items()}, model.state_dict(), lambda m: val_acc(), norm,
                     one_acc=one_acc)
    say("wise-ft: val acc " + ", ".join(f"alpha {a:g} {acc:.4f}" for a, acc in zip(res.alphas, res.val_acc))
        + f" -> alpha {res.alpha:g}")
    return res.to_dict()


def _probe_state(cfg: RunConfig, splits: Splits, rd: rundir.RunDir) -> State | None:
    """The probe model's weights: the pretrained body with the probe's head (None without a linear head)."""
    from layerwise.setup import set_up_model

    probe = set_up_model(cfg, len(splits.classes), n_train=None, images_per_class=None, embedded=cfg.data is None)
    head = head_module(probe.loaded.model, probe.groups)
    if head is None:
        return None
    load_weights(rd.probe_head, head)
    return probe.loaded.model.state_dict()


def _append_report(rd: rundir.RunDir, section: str) -> None:
    report = rd.report.read_text() if rd.report.is_file() else ""
    atomic_write_text(rd.report, report + section)


def soup_section(res: dict, winner: str) -> str:
    rows = [f"| {t['ingredient'].replace('winner', winner + ' (the winner)')} | {t['val_acc']:.4f} | "
            f"{'kept' if t['kept'] else 'left out'} |" for t in res.get("tried", [])]
    kept = ("the winner alone" if res["members"] == ["winner"] else
            f"{len(res['members'])} ingredients: best.safetensors holds their average")
    return "\n".join(["", "## Soup of the racers: the winner and the losers' rung weights, averaged", "",
                      "| added | soup's val acc | |", "|---|---:|---|", *rows, "",
                      f"Kept: {kept}" + (" (BatchNorm statistics re-estimated for each average)."
                                         if res.get("recalibrated") else "."), ""])


def wise_section(res: dict) -> str:
    cells = " | ".join(f"{a:.4f}" for a in res["val_acc"])
    kept = ("the fine-tuned model, unchanged" if res["alpha"] == 1.0 else
            f"alpha {res['alpha']:g}: best.safetensors holds this mix; the winner's own weights stay in race/")
    return "\n".join(["", "## WiSE-FT: the probe model and the fine-tuned one, averaged in weight space", "",
                      "| alpha | " + " | ".join(f"{a:g}" for a in res["alphas"]) + " |",
                      "|---|" + "---:|" * len(res["alphas"]), f"| val acc | {cells} |", "",
                      f"Kept: {kept}" + (" (BatchNorm statistics re-estimated between the endpoints)."
                                         if res.get("recalibrated") else "."), ""])

"""Averaging after auto's race (averaging.py): the soup of the racers starts from the race's
verdict, keeps a loser only when val says so, is the plain average of what it keeps (with its
own BatchNorm statistics), and a real race writes it where evaluate reads it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import TINY
from layerwise import averaging, race
from layerwise.checkpoint import save_weights
from layerwise.cli import main
from layerwise.racecost import Costs


def _net(seed: int, *, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 3)] + ([nn.BatchNorm1d(3)] if bn else [])
    net = nn.Sequential(*layers)
    if bn:  # each racer's own running statistics
        net[1].running_mean.fill_(float(seed))
    return net.eval()


def _losers(tmp_path, seeds: dict[str, float], *, bn: bool = False) -> dict:
    out = {}
    for i, (name, acc) in enumerate(seeds.items()):
        (tmp_path / name).mkdir()
        save_weights(tmp_path / name / "best.safetensors", _net(i + 1, bn=bn))
        out[tmp_path / name] = acc
    return out


def test_a_soup_that_ties_on_val_keeps_every_racer_best_rung_first_and_is_their_mean(tmp_path):
    winner = _net(0)
    losers = _losers(tmp_path, {"a": 0.40, "b": 0.45})
    states = [_net(s).state_dict() for s in (0, 1, 2)]
    rec = averaging._soup(winner, 0.5, losers, lambda: 0.5, lambda: [])
    assert [t["ingredient"] for t in rec["tried"]] == ["winner", "b", "a"] and rec["members"] == ["winner", "b", "a"]
    for k, v in winner.state_dict().items():
        assert torch.allclose(v, torch.stack([s[k] for s in states]).mean(0))
    assert rec["recalibrated"] is False


def test_a_soup_that_loses_on_val_leaves_the_winner_exactly(tmp_path):
    winner = _net(0)
    before = {k: v.clone() for k, v in winner.state_dict().items()}
    scores = iter([0.3, 0.2])
    rec = averaging._soup(winner, 0.5, _losers(tmp_path, {"a": 0.4, "b": 0.1}), lambda: next(scores), lambda: [])
    assert rec["members"] == ["winner"] and rec["val_acc"] == 0.5
    assert [t["kept"] for t in rec["tried"]] == [True, False, False]
    assert all(torch.equal(before[k], v) for k, v in winner.state_dict().items())


def test_a_soup_of_racers_with_different_statistics_re_estimates_them(tmp_path):
    winner = _net(0, bn=True)
    batches = [torch.randn(16, 4) for _ in range(3)]
    rec = averaging._soup(winner, 0.5, _losers(tmp_path, {"a": 0.4}, bn=True), lambda: 0.5, lambda: batches)
    assert rec["recalibrated"] and rec["members"] == ["winner", "a"]
    with torch.no_grad():  # the soup's statistics are those of its own outputs on the batches, not a mean of two
        expected = winner[0](torch.cat(batches)).mean(0)
    assert torch.allclose(winner[1].running_mean, expected, atol=1e-5)


@pytest.fixture(scope="module")
def souped(data, tmp_path_factory):
    """A real race with the soup and without WiSE-FT, priced as on large data (test_race.py), at a
    budget that leaves room for the soup after the race."""
    run = tmp_path_factory.mktemp("soup") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(race, "COSTS", Costs(forward=0.1, probe=0.1, setup=0))
        # evidence given by hand: no probe, so no probe head, and every racer starts from a fresh head
        assert main(["fit", str(data), *TINY, "--strategy", "auto", "--epochs", "5", "--no-wise", "--race-cost", "2",
                     "--probe-skill", "0.5", "--bn-shift", "0.1", "--out", str(run)]) == 0
    return run


def test_the_race_soups_its_racers_and_evaluate_scores_what_it_kept(souped, data):
    from layerwise.inference import evaluate_run

    state, soup = json.loads((souped / "race.json").read_text()), json.loads((souped / "soup.json").read_text())
    winner = souped / "race" / state["winner"]
    assert state["soup"]["members"] == soup["members"] and soup["members"][0] == "winner"
    assert soup["tried"][0]["val_acc"] == max(json.loads(line)["val_acc"]
                                            for line in (winner / "metrics.jsonl").read_text().splitlines())
    assert len(soup["tried"]) == len(state["candidates"]) and soup["val_acc"] >= soup["tried"][0]["val_acc"]
    same = (souped / "best.safetensors").read_bytes() == (winner / "best.safetensors").read_bytes()
    assert same == (soup["members"] == ["winner"])
    assert evaluate_run(souped, str(data))["accuracy"] == pytest.approx(soup["val_acc"])
    assert "## Soup of the racers" in (souped / "report.md").read_text()
    assert not (souped / "wise.json").exists()


def test_only_racers_that_share_the_winners_start_join_its_soup(tmp_path):
    """lp-ft from the probe's head and the others from a fresh head are not one start."""
    import dataclasses

    from layerwise.config import RunConfig

    def sub(name, head=None):
        return dataclasses.replace(RunConfig(), probe_head=head, out=str(tmp_path / name))

    runs = {"full": sub("full"), "disc": sub("disc"), "lp-ft": sub("lp-ft", "/run/probe_head.safetensors")}
    rungs = {"full": {"val_acc": 0.6}, "disc": {"val_acc": 0.5}, "lp-ft": {"val_acc": 0.7}}
    assert race.soup_losers(runs, rungs, "full") == {tmp_path / "disc": 0.5}
    assert race.soup_losers(runs, rungs, "lp-ft") == {}


def test_a_mix_is_scored_on_test_with_the_runs_tta_views(data, tmp_path, monkeypatch):
    """When averaging changes the weights, test.json and tta.json are the mix's, scored with
    the views the winner's run resolved (and test.json also without them)."""
    import shutil

    from conftest import make_image_folder
    from layerwise.config import RunConfig
    from layerwise.data import load_splits

    d = tmp_path / "d"
    shutil.copytree(data, d)
    shutil.copytree(make_image_folder(tmp_path / "o", classes=3, per_class=3, size=20) / "val", d / "test")
    winner, run = tmp_path / "winner", tmp_path / "run"
    assert main(["fit", str(d), *TINY, "--strategy", "full", "--epochs", "1", "--tta", "auto", "--precision", "fp32",
                 "--no-channels-last", "--out", str(winner)]) == 0
    run.mkdir()

    def nudged(model, winner_acc, losers, val_acc, norm, **kw):  # a soup that moved the weights
        with torch.no_grad():
            next(model.parameters()).mul_(0.5)
        return {"members": ["winner", "other"], "val_acc": val_acc()}

    monkeypatch.setattr(averaging, "_soup", nudged)
    splits = load_splits(str(d))
    averaging.finish(RunConfig(data=str(d), soup=True, wise=False), run, winner, {tmp_path / "other": 0.1},
                     splits.val, splits)
    test, before = json.loads((run / "test.json").read_text()), json.loads((winner / "test.json").read_text())
    assert test["views"] == ["hflip", "multi-scale"] and "without_views" in test
    assert test["test_loss"] != pytest.approx(before["test_loss"], rel=1e-6)  # the mix's score, not the winner's
    tta = json.loads((run / "tta.json").read_text())
    assert tta["views"] == test["views"] and tta["val_loss"] != pytest.approx(
        json.loads((winner / "tta.json").read_text())["val_loss"], rel=1e-6)

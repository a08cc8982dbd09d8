"""auto's race (race.py): its size within the cost bound, the order, the paired verdict, and a
real race on tiny images: the winner's steps are an uninterrupted run's, and a race stopped
part-way resumes into the same race."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY
from layerwise import engine, race
from layerwise.checkpoint import read_jsonl
from layerwise.choices import config_from
from layerwise.cli import main
from layerwise.config import load_yaml
from layerwise.racecost import Costs


@pytest.fixture(scope="module", autouse=True)
def priced_as_for_large_data():
    """The runs below have 24 training images, where a set-up costs more than an epoch and a
    race is never worth it, and val is half as large as train; they price the race as on large
    data, where a set-up and val's passes are a small share of an epoch (racecost's model is
    tested in test_racecost.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(race, "COSTS", Costs(forward=0.1, probe=0.1, setup=0))
        yield


def test_the_rules_favourite_runs_first():
    assert [c.strategy for c in race.ordered("auto:full")] == ["full", "discriminative", "lp-ft"]
    assert [c.strategy for c in race.ordered("auto:lp-ft")] == ["lp-ft", "discriminative", "full"]
    assert [c.strategy for c in race.ordered("auto:gradual")] == ["discriminative", "full", "lp-ft"]


def _bits(text: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in text])


def test_a_clear_lead_wins_and_a_lead_inside_the_noise_keeps_the_prior():
    n = 100
    clear = {"a": _bits("1" * 50 + "0" * 50), "b": _bits("1" * 90 + "0" * 10)}
    assert race.pick(clear, ["a", "b"]).winner == "b"
    close = {"a": _bits("1" * 50 + "0" * 50), "b": _bits("1" * 53 + "0" * 47)}  # 3 images of 100
    v = race.pick(close, ["a", "b"])
    assert v.winner == "a" and "inside the noise" in v.reason
    assert race.pick(close, ["b", "a"]).winner == "b"  # the leader first in the order simply wins
    tie = {"a": _bits("10" * (n // 2)), "b": _bits("10" * (n // 2))}
    assert race.pick(tie, ["b", "a"]).winner == "b"
    # of three, only the favourite is a prior: c leads a clearly and b (second in the order) by
    # 3 images of 100; c wins, not b
    three = {"a": _bits("1" * 50 + "0" * 50), "b": _bits("1" * 87 + "0" * 13), "c": _bits("1" * 90 + "0" * 10)}
    assert race.pick(three, ["a", "b", "c"]).winner == "c"
    assert race.pick(three, ["b", "a", "c"]).winner == "b"  # b, the favourite, inside the noise


def _race(data, run, *extra):
    """The race alone (the soup and WiSE-FT after it have their own tests)."""
    return main(["fit", str(data), *TINY, "--strategy", "auto", "--epochs", "3", "--no-wise", "--no-soup", "--out",
                 str(run), *extra])


@pytest.fixture(scope="module")
def raced(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("race") / "run"
    assert _race(data, run) == 0
    return run


def test_the_race_pauses_the_losers_and_the_winner_becomes_the_run(raced):
    state = json.loads((raced / "race.json").read_text())
    names = [c["name"] for c in state["candidates"]]
    assert state["cost"]["limit"] == 1.5 and 1.0 < state["cost"]["estimate"] <= 1.5  # priced, within its bound
    assert len(names) == 2 and state["promoted"] and state["winner"] in names
    for name in names:
        rows = read_jsonl(raced / "race" / name / "metrics.jsonl")
        trained = [r for r in rows if r["epoch"] >= 0]  # lp-ft's first row is the probe's head (epoch -1)
        assert len(trained) == (3 if name == state["winner"] else state["rung_epochs"])  # losers stopped at the rung
        assert (rows[0]["epoch"] == -1) == name.startswith("lp-ft")
        if name.startswith("lp-ft"):  # from the probe's head, its rung fine-tunes every group, as the others' do
            assert len(trained[0]["trainable_groups"]) > 1
        assert state["rungs"][name]["curve"] == [r["val_acc"] for r in rows if r["epoch"] < state["rung_epochs"]]
        rung = state["rungs"][name]
        if next(c["bn"] for c in state["candidates"] if c["name"] == name) == "eval":
            assert rung["val_acc"] == pytest.approx(max(rung["curve"])) and "norm_images" not in rung  # same numerics
        else:  # on batch statistics: scored after re-estimating them, the running ones' score kept beside it
            assert rung["norm_images"] == 24 and rung["running_stats_val_acc"] == rung["curve"][-1]

    winner = raced / "race" / state["winner"]
    rung = [r for r in read_jsonl(winner / "metrics.jsonl") if r["epoch"] < state["rung_epochs"]]  # kept, not trained again
    assert sum(r["epoch_seconds"] for r in rung) == state["rungs"][state["winner"]]["epoch_seconds"]
    assert (raced / "best.safetensors").read_bytes() == (winner / "best.safetensors").read_bytes()
    assert read_jsonl(raced / "metrics.jsonl") == read_jsonl(winner / "metrics.jsonl")
    assert "## auto's race" in (raced / "report.md").read_text()
    assert json.loads((raced / "probe.json").read_text())["race"]["winner"] == state["winner"]


def test_the_winner_trains_exactly_the_steps_of_an_uninterrupted_run(raced, tmp_path):
    """Paused at the rung and resumed from its checkpoint, the winner ends bit for bit where
    its config run straight through ends: no step trained twice or differently."""
    winner = raced / "race" / json.loads((raced / "race.json").read_text())["winner"]
    straight = tmp_path / "straight"
    # its config as the race ran it (a --config file would leave out lp-ft's probe head: another run's state)
    cfg = dataclasses.replace(config_from(load_yaml(winner / "config.yaml")), out=str(straight))
    engine.fit(cfg)
    a, b = load_file(winner / "best.safetensors"), load_file(straight / "best.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["val_acc"] for r in read_jsonl(winner / "metrics.jsonl")] == \
        [r["val_acc"] for r in read_jsonl(straight / "metrics.jsonl")]


def test_a_race_stopped_part_way_resumes_into_the_same_race(data, tmp_path, monkeypatch):
    """Killed between full's rung and its score, then resumed: the same outcomes and weights as
    a race run straight through. Evidence by hand makes discriminative --bn eval the favourite,
    so the resumed run's config.yaml says --bn eval; full must still race on batch statistics."""
    calls = []
    real = race.rung_result

    def second_stops(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill between the second candidate's rung and its result
        return real(*args, **kwargs)

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _race(data, ref, "--probe-skill", "0.5") == 0
    monkeypatch.setattr(race, "rung_result", second_stops)
    assert _race(data, run, "--probe-skill", "0.5") == 130
    state = json.loads((run / "race.json").read_text())
    assert len(state["rungs"]) == 1 and state["winner"] is None
    assert [c["name"] for c in state["candidates"]] == ["discriminative-bn-eval", "full"]
    monkeypatch.setattr(race, "rung_result", real)
    assert main(["fit", "--resume", str(run)]) == 0
    done, ref_state = json.loads((run / "race.json").read_text()), json.loads((ref / "race.json").read_text())
    def outcomes(state):  # everything but the wall times
        return {k: {f: v for f, v in r.items() if f != "epoch_seconds"} for k, r in state["rungs"].items()}

    assert "norm_images" in done["rungs"]["full"]  # scored on re-estimated statistics, as on batch statistics
    assert done["winner"] == ref_state["winner"] and outcomes(done) == outcomes(ref_state)
    assert (run / "best.safetensors").read_bytes() == (ref / "best.safetensors").read_bytes()


def test_a_rung_shorter_than_an_epoch_pauses_mid_epoch_and_the_winner_runs_on_exactly(data, tmp_path, monkeypatch):
    """Where one epoch's rungs do not fit, a race of half-epoch rungs does: each candidate pauses
    after half of epoch 0's batches (2 of 3), is scored with the weights it paused with (after
    re-estimating BatchNorm on batch statistics), and the winner continues from mid-epoch to the
    end a run straight through reaches; the losers stay paused there, and the soup tries each
    loser with those same weights."""
    from layerwise.checkpoint import load_state
    from layerwise.data import check_images, load_splits
    from layerwise.inference import validated_scorer

    monkeypatch.setattr(race, "RUNGS", (0.5,))
    run = tmp_path / "run"
    # discriminative --bn eval first, then full; the soup after, WiSE-FT left out (its own tests)
    assert main(["fit", str(data), *TINY, "--strategy", "auto", "--epochs", "3", "--no-wise", "--probe-skill", "0.5",
                 "--race-cost", "2", "--out", str(run)]) == 0
    state = json.loads((run / "race.json").read_text())
    assert state["rung_epochs"] == 0.5 and state["cost"]["estimate"] <= 2 and state["averaging"]["soup"]
    val = check_images(load_splits(str(data)).val)[0]
    for name in state["rungs"]:
        folder = run / "race" / name
        if name != state["winner"]:
            ckpt = load_state(folder / "last" / "state.pt")
            assert ckpt["epoch"] == -1 and ckpt["progress"]["batches"] == 2  # paused mid-epoch 0
            assert not [r for r in read_jsonl(folder / "metrics.jsonl") if r["epoch"] >= 0]
            paused = validated_scorer(folder, paused=True)(val).acc
            rung = state["rungs"][name]
            assert (rung.get("running_stats_val_acc", rung["val_acc"])) == paused  # the paused weights, scored
    assert "norm_images" in state["rungs"]["full"]
    assert "| none: paused mid-epoch |" in (run / "report.md").read_text()  # no epoch row to show
    soup = json.loads((run / "soup.json").read_text())  # without a probe every racer starts from the same head
    shared = {k: v["val_acc"] for k, v in state["rungs"].items() if k != state["winner"]}
    assert soup["rung_val_acc"] == shared and [t["ingredient"] for t in soup["tried"]][1:] == list(shared)
    winner = run / "race" / state["winner"]
    straight = tmp_path / "straight"
    engine.fit(dataclasses.replace(config_from(load_yaml(winner / "config.yaml")), out=str(straight)))
    if not state["soup"]["members"][1:]:  # the run is the winner as trained unless the soup kept a loser
        assert (run / "best.safetensors").read_bytes() == (winner / "best.safetensors").read_bytes()
    loser = next(run / "race" / k for k in state["rungs"] if k != state["winner"])
    assert main(["fit", "--resume", str(loser)]) == 0  # a paused loser finishes as the plain run it is
    assert [r["epoch"] for r in read_jsonl(loser / "metrics.jsonl") if r["epoch"] >= 0] == [0, 1, 2]
    a, b = load_file(winner / "best.safetensors"), load_file(straight / "best.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(winner / "steps.jsonl") == read_jsonl(straight / "steps.jsonl")


def test_no_race_keeps_the_thresholds_choice(data, tmp_path):
    run = tmp_path / "run"
    assert _race(data, run, "--no-race") == 0
    assert not (run / "race.json").exists() and not (run / "race").exists()
    assert json.loads((run / "probe.json").read_text())["strategy"].startswith("auto:")


def test_the_last_word_names_the_run_folder_not_the_race_folder(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _race(data, run) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-2].startswith(f"run folder: {run} (auto's race:")


def test_a_race_cost_of_one_run_affords_no_race(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _race(data, run, "--race-cost", "1") == 0
    assert "afford no race within 1x one run (--race-cost; the cheapest race" in capsys.readouterr().out
    assert not (run / "race.json").exists() and (run / "best.safetensors").is_file()
    assert main(["fit", str(data), *TINY, "--race-cost", "0.5", "--out", str(tmp_path / "bad")]) == 2


def test_one_epoch_affords_no_race(data, tmp_path, capsys, monkeypatch):
    """The set-up that found no race affordable is the run's: data and model are set up once."""
    calls, real = [], engine.prepare
    monkeypatch.setattr(engine, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    run = tmp_path / "run"
    assert main(["fit", str(data), *TINY, "--strategy", "auto", "--epochs", "1", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert not (run / "race.json").exists() and "afford no race" in out
    assert len(calls) == 1 and out.count("budget:") == 1


def test_evidence_given_by_hand_orders_the_race_without_a_probe(data, tmp_path, monkeypatch):
    from layerwise import engine

    def boom(*a, **k):
        raise AssertionError("--probe-skill was given: no probe")

    monkeypatch.setattr(engine, "run_probe", boom)
    run = tmp_path / "run"
    assert _race(data, run, "--probe-skill", "0.5") == 0
    state = json.loads((run / "race.json").read_text())
    assert state["favourite"] == "auto:discriminative" and state["candidates"][0]["strategy"] == "discriminative"


def test_wise_ft_after_the_race_keeps_the_best_mix_on_val(data, tmp_path):
    from layerwise.inference import evaluate_run

    run = tmp_path / "run"
    # 24 training images: WiSE-FT's passes are dear against an epoch; at 1.5x the race takes the
    # budget (test_the_race_comes_before_the_averaging), at 2x WiSE-FT fits after it
    assert main(["fit", str(data), *TINY, "--strategy", "auto", "--epochs", "5", "--race-cost", "2", "--out",
                 str(run)]) == 0
    wise = json.loads((run / "wise.json").read_text())
    assert wise["alphas"][0] == 0.0 and wise["alphas"][-1] == 1.0 and wise["val_acc"][wise["alphas"].index(wise["alpha"])] == max(wise["val_acc"])
    state = json.loads((run / "race.json").read_text())
    assert state["wise"]["alpha"] == wise["alpha"]
    assert "probe_guard" not in state  # WiSE-FT's alpha 0 is the probe model: no second check
    # best.safetensors holds the kept mix: evaluate (val of a train/val folder) scores what WiSE-FT chose
    assert evaluate_run(run, str(data))["accuracy"] == pytest.approx(max(wise["val_acc"]))
    assert "## WiSE-FT" in (run / "report.md").read_text()


def test_the_race_comes_before_the_averaging(data, tmp_path, capsys):
    """5 epochs of 24 images at 1.5x: all three candidates race, and WiSE-FT and the soup no
    longer fit (racecost.plan), so they are left out, said, and recorded."""
    run = tmp_path / "run"
    assert main(["fit", str(data), *TINY, "--strategy", "auto", "--epochs", "5", "--out", str(run)]) == 0
    state = json.loads((run / "race.json").read_text())
    assert len(state["candidates"]) == 3 and state["averaging"] == {"wise": False, "soup": False}
    assert state["cost"]["estimate"] <= 1.5 and not (run / "wise.json").exists() and not (run / "soup.json").exists()
    # full trains on batch statistics: its rung alone is scored after re-estimating them
    assert [k for k, r in state["rungs"].items() if "norm_images" in r] == ["full"]
    assert "BatchNorm statistics re-estimated on 24 training images" in (run / "report.md").read_text()
    assert "WiSE-FT and the soup left out: the race takes the budget" in capsys.readouterr().out


def test_a_rung_on_batch_statistics_is_scored_after_re_estimating_them(data, tmp_path):
    """Mid-schedule a candidate's running statistics lag its weights (full's rung on the digits:
    0.53 on val, 0.94 re-estimated). Stale statistics, made here by shifting every running mean,
    are re-estimated on training images before the score, in memory only; without splits (a
    --bn eval candidate) the score is the stale one."""
    from safetensors.torch import save_file

    from layerwise.data import check_images, load_splits

    run = tmp_path / "full"
    assert main(["fit", str(data), *TINY, "--strategy", "full", "--epochs", "2", "--out", str(run)]) == 0
    state = load_file(run / "best.safetensors")
    stale = {k: v + 50 if k.endswith("running_mean") else v for k, v in state.items()}
    save_file(stale, run / "best.safetensors")
    splits = load_splits(str(data))
    val = check_images(splits.val)[0]
    as_is = race.rung_result(run, val)
    settled = race.rung_result(run, val, splits)
    assert "norm_images" not in as_is and settled["norm_images"] == len(splits.train)  # 24 < RUNG_NORM_IMAGES
    assert settled["running_stats_val_acc"] == read_jsonl(run / "metrics.jsonl")[-1]["val_acc"]
    assert settled["val_acc"] > as_is["val_acc"]
    assert all(torch.equal(load_file(run / "best.safetensors")[k], v) for k, v in stale.items())  # nothing written


def test_the_report_says_when_the_thresholds_favourite_is_not_a_candidate():
    """Without a probe, small data can make the thresholds favour gradual or head: the race
    then runs in the candidates' own order, and says so instead of 'gradual first'."""
    state = {"favourite": "gradual", "rule": "small dataset", "rung_epochs": 1, "rungs": {}, "winner": None,
             "stopped": {}, "reason": "r", "candidates": [{"name": "discriminative-bn-eval"}, {"name": "full"}]}
    text = race.race_section(state)
    assert "the thresholds' favourite, gradual, is not a candidate; discriminative-bn-eval first" in text
    assert "favourite first: full" in race.race_section(state | {"favourite": "auto:full"})


def test_a_race_never_ends_below_the_probe_on_val(data, tmp_path, raced, monkeypatch):
    """discriminative and full start from a fresh head, with no probe row to beat. Raced without
    lp-ft (which starts from the probe's head) at an LR that teaches them nothing, the probe model
    is better on val, and it becomes the run's weights, as it would without a race; a race whose
    winner beats the probe keeps the winner (the raced fixture)."""
    from layerwise.inference import evaluate_run

    monkeypatch.delitem(race.CANDIDATES, "lp-ft")
    run = tmp_path / "run"
    assert _race(data, run, "--lr", "1e-12") == 0
    state = json.loads((run / "race.json").read_text())
    guard, probe = state["probe_guard"], json.loads((run / "probe.json").read_text())
    assert guard["kept"] and guard["probe_model_val_acc"] > guard["run_val_acc"]
    assert guard["probe_model_val_acc"] == pytest.approx(probe["val_acc"], abs=0.05)
    assert evaluate_run(run, str(data))["accuracy"] == pytest.approx(guard["probe_model_val_acc"])  # val: no test/
    assert "## The probe model kept" in (run / "report.md").read_text()
    kept = json.loads((raced / "race.json").read_text())["probe_guard"]
    assert not kept["kept"] and "probe_model_val_acc" not in kept  # the winner beat the probe: nothing re-scored


def test_a_race_killed_after_its_winner_finished_resumes_into_the_guard(data, tmp_path, monkeypatch):
    """Killed after the winner's last epoch, in the probe guard: --resume finishes the race (the
    winner is not trained again; the guard runs and keeps the probe model) instead of taking the
    run folder for a plain run, which would end without the guard."""
    monkeypatch.delitem(race.CANDIDATES, "lp-ft")
    real, run = race.probe_guard, tmp_path / "run"

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(race, "probe_guard", killed)
    assert _race(data, run, "--lr", "1e-12") == 130
    winner = run / "race" / json.loads((run / "race.json").read_text())["winner"]
    rows = read_jsonl(winner / "metrics.jsonl")
    monkeypatch.setattr(race, "probe_guard", real)
    assert main(["fit", "--resume", str(run)]) == 0
    state = json.loads((run / "race.json").read_text())
    assert state["promoted"] and state["probe_guard"]["kept"]
    assert read_jsonl(winner / "metrics.jsonl") == rows  # no epoch trained again
    assert (run / "report.md").read_text().count("## auto's race") == 1
    assert "## The probe model kept" in (run / "report.md").read_text()

"""auto's race: measure which way of fine-tuning wins on the user's data, then train that way.

The probe's thresholds (strategies.auto_choice) only *order* the candidates, favourite first.
Each candidate is a complete run folder under ``RUN/race/``, trained by :func:`engine.fit`
for one rung (racecost.RUNGS: an epoch, or less where that affords no race) of its own full plan
and paused there, checkpointed, mid-epoch if the rung ends there. The
candidates are compared on the same val images; a lead inside the noise keeps the favourite.
The winner's run then resumes from its own checkpoint, so no step is trained twice and its
steps are exactly those of an uninterrupted run; the losers stay paused and resumable. At the
end the winner's files are the run folder's, with ``race.json`` beside them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from layerwise import backbones, rundir
from layerwise.averaging import NormBatches, finish, probe_guard
from layerwise.checkpoint import atomic_write_text, read_jsonl, write_json
from layerwise.config import AUTO_MODEL, RunConfig
from layerwise.data import Splits, check_images
from layerwise.freeze import has_norms, recalibrate_norms
from layerwise.groups import head_module
from layerwise.progress import say
from layerwise.racecost import (
    COSTS,
    RUNG_NORM_IMAGES,
    RUNGS,
    Candidate,
    RacePlan,
    estimate,
    on_batch_statistics,
    plan,
)
from layerwise.resolve import Resolved

if TYPE_CHECKING:
    from layerwise.engine import Prepared

# The strategies auto's threshold rule chooses among, each at its recommended --bn.
CANDIDATES: dict[str, Candidate] = {
    "discriminative": Candidate("discriminative-bn-eval", "discriminative", "eval"),
    "full": Candidate("full", "full", None),
    "lp-ft": Candidate("lp-ft-bn-eval", "lp-ft", "eval"),
}
Z95 = 1.96  # a lead smaller than this many standard errors of the paired difference is noise


def ordered(favourite: str, bn: str | None = None) -> list[Candidate]:
    """The candidates, the threshold rule's favourite (``auto:X`` or ``X``) first; a ``--bn``
    the user gave holds for every one."""
    fav = favourite.removeprefix("auto:")
    first = [CANDIDATES[fav]] if fav in CANDIDATES else []
    return [dataclasses.replace(c, bn=bn or c.bn) for c in first + [c for k, c in CANDIDATES.items() if k != fav]]


@dataclass(frozen=True)
class Verdict:
    winner: str
    reason: str


def pick(outcomes: dict[str, torch.Tensor], order: Sequence[str]) -> Verdict:
    """The winner from each candidate's right/wrong on the same val images. The leader wins
    unless the favourite (``order[0]``, the thresholds' prior) trails it by no more than the noise
    of the paired difference; then the favourite stays. The order of the other candidates is
    no prior: in a race of three on dtd's held-out split (seed 1; seed 0's rungs replay the
    same way) an earlier rule kept the earliest candidate inside the noise, full, over a leader
    4 points ahead and a favourite outside the noise, and full ended 8 points below both on test
    (one seed, 150 test images: docs/strategies.md)."""
    acc = {k: outcomes[k].float().mean().item() for k in order}
    leader = max(order, key=lambda k: (acc[k], -order.index(k)))
    fav = order[0]
    if leader != fav:
        diff = outcomes[leader].float() - outcomes[fav].float()
        se = diff.std().item() / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
        if diff.mean().item() <= Z95 * se:
            return Verdict(fav, f"{leader} led {fav} by {100 * diff.mean().item():.1f} points on the same val images, "
                                f"inside the noise (±{100 * Z95 * se:.1f}): {fav}, the favourite, stays")
    runner = max((k for k in order if k != leader), key=lambda k: acc[k])
    return Verdict(leader, f"{leader} led on val ({acc[leader]:.3f}, next {runner} {acc[runner]:.3f})")


def wants_race(cfg: RunConfig) -> bool:
    return cfg.strategy == "auto" and cfg.race and cfg.probe


def fit(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """``layerwise fit``: auto races its candidates where it can; any other run is engine.fit's."""
    from layerwise import engine
    from layerwise.distributed import from_env

    run = Path(cfg.out or rundir.default_run_dir())
    cfg = dataclasses.replace(cfg, out=str(run))
    if cfg.model == AUTO_MODEL:  # a resume reads the chosen model from config.yaml
        if not overwrite:
            rundir.refuse_existing(run)
        cfg, record = backbones.choose_backbone(cfg)
        if overwrite:  # only now: an error in the choice must not cost the old run
            rundir.clear(run)
            overwrite = False
        run.mkdir(parents=True, exist_ok=True)
        write_json(rundir.RunDir(run).backbone, record)
    racing = resume and rundir.RunDir(run).race.is_file() and not _promoted(run)
    if not racing and (resume or not wants_race(cfg) or from_env().enabled):
        return engine.fit(cfg, resume=resume, overwrite=overwrite)
    return _race(cfg, run, resume=resume, overwrite=overwrite)


def _promoted(run: Path) -> bool:
    return bool(json.loads(rundir.RunDir(run).race.read_text()).get("promoted"))


def _race(cfg: RunConfig, run: Path, *, resume: bool, overwrite: bool) -> Path:
    """Start (or resume) the race, train each candidate's rung, pick the winner, let it finish
    from its checkpoint, then average; race.json is saved after each step."""
    from layerwise import engine
    from layerwise.setup import load_data

    rd = rundir.RunDir(run)
    started = time.perf_counter()
    with rundir.writer_lock(run):
        if resume:
            state, p = json.loads(rd.race.read_text()), None
        else:
            state, p = _start(cfg, run, overwrite=overwrite)
    if state is None:  # no race: the set-up _start made is the run's
        return engine.fit(cfg, resume=False, overwrite=overwrite, prepared=p)
    before = state.get("wall_seconds", 0.0)  # earlier sittings of this race

    def save() -> None:  # the whole race's wall time so far (probe and every candidate), each time
        state["wall_seconds"] = before + time.perf_counter() - started
        write_json(rd.race, state)

    splits = p.splits if p else load_data(cfg)  # loaded once: by _start on a new race, here on a resumed one
    del p  # its model, on the device, was the probe's: each candidate builds its own
    val = check_images(splits.val)[0]  # a score cannot skip a file: unchecked large data is checked here
    runs = {c["name"]: candidate_config(cfg, state["settings"], c, run) for c in state["candidates"]}
    _run_rungs(state, runs, val, splits, save)
    if state["winner"] is None:
        verdict = pick({k: _bits(v["correct"]) for k, v in state["rungs"].items()}, list(runs))
        state |= {"winner": verdict.winner, "reason": verdict.reason,
                  "stopped": {k: f"paused after the rung: {verdict.winner} won" for k in runs if k != verdict.winner}}
        save()
    say(f"race: {state['winner']} wins ({state['reason']}); it continues from its checkpoint after "
        f"{state['rung_epochs']:g} epoch(s)")
    engine.fit(runs[state["winner"]], resume=True)
    # saved only with the averaging and the guard (the last save below): a race killed before
    # then resumes as a race, not as the plain run the promoted folder would look like
    state["promoted"] = True
    _promote(run, Path(runs[state["winner"]].out), state)
    averaging = state.get("averaging", {"wise": cfg.wise, "soup": cfg.soup})  # what the race's budget left room for
    if (averaging["soup"] or averaging["wise"]) and "averaged" not in state:
        state |= finish(dataclasses.replace(cfg, **averaging), run, Path(runs[state["winner"]].out),
                        soup_losers(runs, state["rungs"], state["winner"]), val, splits,
                        paused=mid_epoch(state["rung_epochs"])) | {"averaged": True}
    # never below the probe on val, as without a race; WiSE-FT, when it ran, already was (its
    # alpha 0 is the probe model, scored exactly), so the guard would only score it again
    wise_ran = "wise" in state and "skipped" not in state["wise"]
    if "probe_guard" not in state and not wise_ran:
        state["probe_guard"] = probe_guard(cfg, run, val, splits)
    save()
    # the winner's own fit named its race folder last; the run is this one
    say(f"run folder: {run} (auto's race: {state['winner']} won; race.json)\nreport: {rd.report}")
    return run


def _start(cfg: RunConfig, run: Path, *, overwrite: bool) -> tuple[dict | None, Prepared]:
    """A new race's state, written to race.json with the probe's evidence (None, and the
    reason said, when the budget affords no race or the model has no linear head), and the
    set-up it made (the run's own when there is no race)."""
    from layerwise import engine

    rd = rundir.RunDir(run)
    if not overwrite:
        rundir.refuse_existing(run)
    p = engine.prepare(cfg)
    epochs, splits = p.resolved.config.epochs, p.splits
    n_train, n_val = len(splits.train), len(splits.val)

    def race_plan(favourite: str) -> RacePlan:
        return plan(ordered(favourite, cfg.bn), epochs, n_train, n_val, COSTS, probe=cfg.probe_skill is None,
                    wise=cfg.wise, soup=cfg.soup, limit=cfg.race_cost, rungs=RUNGS)

    # whether a race happens depends on neither the favourite nor the averaging (racecost.plan),
    # so it is known before the probe
    head = head_module(p.model.loaded.model, p.model.groups)
    if not race_plan("discriminative").raced or head is None:
        order = ordered("discriminative", cfg.bn)  # the price of a race of two is the favourite's too
        price = estimate(order[:2], epochs, n_train, n_val, COSTS, probe=cfg.probe_skill is None, wise=False,
                         soup=False, order=order, rung=min(RUNGS))
        why = (f"{epochs} epochs of {n_train} images afford no race within {cfg.race_cost:g}x one run "
               f"(--race-cost; the cheapest race, probe included, costs about {price:.2f}x)"
               if head is not None else "the model has no linear head")
        say(f"auto: {why}; the probe's thresholds choose")
        return None, p
    if overwrite:
        rundir.clear(run)
    # evidence given by hand (--probe-skill) orders the race without a probe
    r = p.resolved if cfg.probe_skill is not None else engine.probe(cfg, p, run)[0]
    rp = race_plan(r.strategy.name)
    left_out = [k for k, asked, kept in (("WiSE-FT", cfg.wise, rp.wise), ("the soup", cfg.soup, rp.soup))
                if asked and not kept]
    if left_out:
        say(f"auto: {' and '.join(left_out)} left out: the race takes the budget (--race-cost {cfg.race_cost:g})")
    state = _new_state(r, rp.raced, rp.rung) | {"cost": {"limit": cfg.race_cost, "estimate": round(rp.cost, 3)},
                                       "averaging": {"wise": rp.wise, "soup": rp.soup}}
    write_json(rd.race, state)
    write_json(rd.fingerprint, rundir.run_fingerprint(cfg))  # what compare predicts for auto
    atomic_write_text(rd.config, r.config.to_yaml())  # a run is here: --resume finds it
    return state, p


def _run_rungs(state: dict, runs: dict[str, RunConfig], val: Sequence[tuple], splits: Splits,
               save: Callable[[], None]) -> None:
    """Each candidate trained to its rung (those already there are kept) and scored on val."""
    priced = (f", about {state['cost']['estimate']:.2f}x one run in all (limit {state['cost']['limit']:g}x)"
              if "cost" in state else "")
    say(f"auto: racing {', '.join(runs)} for {state['rung_epochs']:g} epoch(s) each ({_order_note(state)}"
        f"{priced}); then the winner continues from its checkpoint")
    for name, sub in runs.items():
        if name not in state["rungs"]:
            train_rung(sub, state["rung_epochs"])
            state["rungs"][name] = rung_result(Path(sub.out), val, splits if on_batch_statistics(sub.bn) else None,
                                               paused=mid_epoch(state["rung_epochs"]))
            save()
        say(f"race: {name}: val acc {state['rungs'][name]['val_acc']:.4f} after {state['rung_epochs']:g} epoch(s)"
            + _norm_note(state["rungs"][name]))


def soup_losers(runs: dict[str, RunConfig], rungs: dict, winner: str) -> dict[Path, float]:
    """The losers that may join the winner's soup, with their rung val accuracy: those that share
    its start. lp-ft from the probe's head does not share the fresh head the others start from
    (its averages with them scored 0.11-0.30 on val on gtsrb's and pbc-blood's held-out splits,
    against 0.82-0.93 for the winners)."""
    start = bool(runs[winner].probe_head)
    return {Path(str(sub.out)): rungs[k]["val_acc"] for k, sub in runs.items()
            if k != winner and bool(sub.probe_head) == start}


def _new_state(r: Resolved, raced: list[Candidate], rung: float) -> dict:
    """race.json as the race starts: the evidence, the order, the settings every candidate shares."""
    c = r.config
    return {"favourite": r.strategy.name, "rule": r.strategy.reason, "budget": r.budget, "probe_skill": c.probe_skill,
            "bn_shift": c.bn_shift, "rung_epochs": rung,
            "settings": {"epochs": c.epochs, "batch_size": c.batch_size, "patience": c.patience,
                         "img_size": c.img_size},
            "candidates": [dataclasses.asdict(k) for k in raced],
            "rungs": {}, "winner": None, "reason": None, "stopped": {}, "promoted": False}


def candidate_config(cfg: RunConfig, settings: dict, c: dict, run: Path) -> RunConfig:
    """A fixed-strategy run with auto's budget (epochs, batch, patience, size): the user's
    other settings hold for every candidate. Its ``--bn`` is the candidate's own, a --bn the user
    gave already in it (:func:`ordered`): on a resumed race ``cfg`` is the resolved config.yaml,
    whose ``bn`` is the thresholds' choice, not the user's. ``lp-ft`` starts
    from the probe's head, as auto's own lp-ft does: the probe *is* its linear-probing stage,
    fitted to convergence, so its rung is an epoch of fine-tuning like the others' (from its
    own head-only epoch it always ranked last: gtsrb, pbc-blood, cifar10-mini, held-out split)."""
    probe_head = rundir.RunDir(run).probe_head
    from_probe = c["strategy"] == "lp-ft" and cfg.probe_epochs is None and probe_head.is_file()
    lp = {"probe_head": str(probe_head.resolve()), "probe_epochs": 0} if from_probe else {"probe_head": None}
    return dataclasses.replace(cfg, strategy=c["strategy"], bn=c["bn"], **settings, race=False,
                               probe_skill=None, bn_shift=None, **lp, out=str(run / rundir.RACE_DIR / c["name"]))


def mid_epoch(rung: float) -> bool:
    """Whether a rung of this many epochs ends inside an epoch (its candidates pause mid-epoch)."""
    return not float(rung).is_integer()


def train_rung(sub: RunConfig, epochs: float) -> None:
    """Train a candidate to the end of its rung (or on from where a kill left it)."""
    from layerwise import engine

    started = rundir.holds_run(Path(sub.out))
    engine.fit(sub, resume=started, overwrite=not started, until=epochs)


def rung_result(run: Path, val: Sequence[tuple], norm_from: Splits | None = None, *, paused: bool = False) -> dict:
    """A paused candidate: its val accuracy per epoch, and its best weights' right/wrong on
    each val image (the same images for every candidate: the comparison is paired); with
    ``paused`` (a rung that ends mid-epoch, with no epoch's best yet) the weights it paused
    with. With ``norm_from`` (a candidate on batch statistics) its BatchNorm statistics are
    re-estimated on training images first, in memory only: mid-schedule its running statistics
    lag its weights (racecost.RUNG_NORM_IMAGES), which would rank it below what it has learnt."""
    from layerwise.inference import validated_scorer

    rows = read_jsonl(rundir.RunDir(run).metrics)
    score = validated_scorer(run, paused=paused)
    renorm = norm_from is not None and has_norms(score.run.model)
    # the running statistics' score, kept beside the re-estimated one: an epoch's metrics row
    # holds it; paused mid-epoch, no row does (the val pass racecost prices as the epoch's)
    running = (score(val).acc if paused else rows[-1]["val_acc"]) if renorm else None
    seen = recalibrate_norms(score.run.model, NormBatches(norm_from, score, RUNG_NORM_IMAGES)()) if renorm else 0
    ev = score(val)  # without a re-estimation or a pause mid-epoch, the rung's accuracy is its metrics row's
    return {"val_acc": ev.acc, "curve": [r["val_acc"] for r in rows],
            "epoch_seconds": sum(r["epoch_seconds"] for r in rows),
            "correct": "".join("1" if ok else "0" for ok in (ev.preds == ev.labels).tolist())} | (
        {"norm_images": seen, "running_stats_val_acc": running} if seen else {})


def _order_note(state: dict) -> str:
    """Which candidate the thresholds put first, or that their favourite is not a candidate."""
    fav = state["favourite"].removeprefix("auto:")
    return (f"favourite first: {fav}" if fav in CANDIDATES
            else f"the thresholds' favourite, {fav}, is not a candidate; {state['candidates'][0]['name']} first")


def _norm_note(rung: dict) -> str:
    return (f" (BatchNorm statistics re-estimated on {rung['norm_images']} training images; "
            f"{rung['running_stats_val_acc']:.4f} with its running ones)" if "norm_images" in rung else "")


def _bits(text: str) -> torch.Tensor:
    return torch.tensor([ch == "1" for ch in text])


def _promote(run: Path, winner: Path, state: dict) -> None:
    """The winner's finished run becomes the run folder's (config, plan, metrics, weights,
    checkpoint, report), with the race appended to report.md; race.json says it is done."""
    rd = rundir.RunDir(run)
    keep = {rundir.RACE, rundir.PROBE, rundir.PROBE_HEAD, rundir.FINGERPRINT, rundir.CONFIG}
    for name in rundir.RUN_FILES:
        if name not in keep and (winner / name).is_file():
            shutil.copy2(winner / name, run / name)
    # config.yaml: the winner's settings under auto's own budget line (the candidate's says its
    # epochs were given, which is how the race passed auto's budget on)
    settings = [line for line in (winner / rundir.CONFIG).read_text().splitlines(keepends=True) if not line.startswith("#")]
    header = [f"# {state['budget']}\n"] * bool(state.get("budget")) + [f"# auto's race: {state['winner']} won (race.json)\n"]
    atomic_write_text(rd.config, "".join(header + settings))
    if (winner / "last").is_dir():
        shutil.rmtree(run / "last", ignore_errors=True)
        shutil.copytree(winner / "last", run / "last")
    report = rd.report.read_text() if rd.report.is_file() else ""
    atomic_write_text(rd.report, report + race_section(state))
    if rd.probe.is_file():  # probe.json shows the race beside the evidence that ordered it
        probe = json.loads(rd.probe.read_text())
        race = {k: state[k] for k in ("favourite", "winner", "reason", "stopped")}
        write_json(rd.probe, probe | {
            "race": race | {"rungs": {k: v["curve"] for k, v in state["rungs"].items()}},
            "strategy": json.loads(rd.plan.read_text())["strategy"],
            "reason": f"{state['winner']} won auto's race ({state['reason']}); the thresholds' favourite was "
                      f"{state['favourite']}: {probe['reason']}"})


def race_section(state: dict) -> str:
    """report.md's account of the race."""
    lines = ["", "## auto's race", "",
             f"The probe's thresholds ordered the candidates ({_order_note(state)}: {state['rule']}). Each "
             f"trained {state['rung_epochs']:g} epoch(s) of its own plan; the winner continued from its checkpoint.", "",
             "| candidate | val acc per epoch | at the rung | outcome |", "|---|---|---:|---|"]
    for name, res in state["rungs"].items():
        outcome = "won" if name == state["winner"] else state["stopped"].get(name, "")
        curve = " / ".join(f"{a:.4f}" for a in res["curve"]) or "none: paused mid-epoch"
        lines.append(f"| {name} | {curve} | {res['val_acc']:.4f}"
                     f"{_norm_note(res)} | {outcome} |")
    return "\n".join([*lines, "", f"Verdict: {state['reason']}.", ""])

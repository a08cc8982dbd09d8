"""The per-backbone table (bench/backbone_table.py) and the speed rates (bench/backbone_speed.py),
on made-up records; and the README's block is the one the committed results give."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from backbone_speed import rates  # noqa: E402
from backbone_table import (  # noqa: E402
    BACKBONES,
    README_BEGIN,
    README_END,
    SHORT,
    best_probe,
    cheapest_in_noise,
    gain_cheapest_in_noise,
    largest_in_noise,
    load,
    load_cost,
    load_fixed,
    readme_block,
    rule_outcome,
    table,
    with_gain,
)

GFLOPS = {"efficientnet_lite0": 0.1, "efficientnet_lite1": 0.15, "efficientnet_lite2": 0.2, "squeezenet1_1": 0.09}


def rec(model: str, d: str, bits: str, wall: float = 10.0, seed: int = 0, **extra) -> dict:
    return {"dataset": d, "variant": "auto", "seed": seed, "img": 112, "model": model, "test_correct": bits,
            "test": bits.count("1") / len(bits), "wall": wall} | extra


def auto_rec(d: str, bits: str, chosen: str, probe: dict[str, float], n_val: int = 100) -> dict:
    return rec("auto", d, bits, wall=12.0, backbone={"chosen": chosen, "probe_val": probe, "gflops": GFLOPS, "n_val": n_val})


def single(model: str, d: str, bits: str, probe: float, wall: float = 10.0, n_val: int = 100_000,
           best: float | None = None) -> dict:
    """A backbone's auto record; its best val accuracy is its test accuracy unless given."""
    return rec(model, d, bits, wall=wall, probe_acc=probe, n_val=n_val,
               best=bits.count("1") / len(bits) if best is None else best)


def test_the_cheapest_backbone_in_the_noise_wins_unless_the_gap_is_real():
    probe = {"efficientnet_lite0": 0.80, "squeezenet1_1": 0.79, "efficientnet_lite2": 0.70}
    assert cheapest_in_noise(probe, GFLOPS, {}, n_val=100) == "squeezenet1_1"  # 1 point on 100 images: noise
    assert cheapest_in_noise(probe, GFLOPS, {}, n_val=100_000) == "efficientnet_lite0"
    assert best_probe(probe, GFLOPS, {}, 100) == "efficientnet_lite0"
    assert largest_in_noise(probe, GFLOPS, {}, n_val=100) == "efficientnet_lite0"  # Lite2's 0.70 is outside the noise
    assert largest_in_noise(probe, GFLOPS, {}, n_val=10) == "efficientnet_lite2"
    # a measured gain moves the expectation: SqueezeNet's probe lead is what fine-tuning loses
    moved = {"efficientnet_lite0": 0.08, "efficientnet_lite2": 0.0, "squeezenet1_1": -0.02}
    assert with_gain({"efficientnet_lite0": 0.78, "squeezenet1_1": 0.80}, GFLOPS, moved, 100) == "efficientnet_lite0"
    assert gain_cheapest_in_noise(probe, GFLOPS, moved, 10) == "squeezenet1_1"  # in the noise of 0.88: the cheapest


def test_the_table_scores_each_rule_by_the_picked_backbones_own_auto():
    """On x the probes are within the noise and the cheap rule picks SqueezeNet, whose own auto
    scored 0.5 there, Lite0's 1.0; on y, the dataset the gains come from when x is scored,
    SqueezeNet's fine-tuning lost 0.5 to its probe and Lite0's gained 0.4."""
    by_model = {"efficientnet_lite0": [single("efficientnet_lite0", "x", "1111", 0.81, n_val=100),
                                       single("efficientnet_lite0", "y", "1111", 0.6)],
                "efficientnet_lite1": [single("efficientnet_lite1", "x", "1110", 0.78, n_val=100),
                                       single("efficientnet_lite1", "y", "1110", 0.75)],
                "efficientnet_lite2": [single("efficientnet_lite2", "x", "1100", 0.78, n_val=100),
                                       single("efficientnet_lite2", "y", "1100", 0.5)],
                "squeezenet1_1": [single("squeezenet1_1", "x", "1010", 0.80, wall=3.0, n_val=100),
                                  single("squeezenet1_1", "y", "1100", 1.0, wall=3.0)],
                "auto": [auto_rec("x", "1010", "squeezenet1_1", {})]}
    assert rule_outcome(by_model, cheapest_in_noise, GFLOPS)[("x", 0)] == "squeezenet1_1"
    assert rule_outcome(by_model, best_probe, GFLOPS)[("x", 0)] == "efficientnet_lite0"
    assert rule_outcome(by_model, with_gain, GFLOPS)[("x", 0)] == "efficientnet_lite0"
    lines = table(by_model, {"gflops": GFLOPS, "rates": {}})
    assert "| x | 1.000 | 0.750 | 0.500 | 0.500 | 0.500 | SqueezeNet |" in lines
    assert "| wall s (mean) | 10 | 10 | 10 | 3 | 12 | |" in lines
    by_model["efficientnet_lite1"][0]["load"] = [3.5, 2.0]  # another job shared the CPU
    lines = table(by_model, {"gflops": GFLOPS, "rates": {}})
    assert "| wall s (mean) | 10 | 10 † | 10 | 3 | 12 | |" in lines and any(line.startswith("† measured") for line in lines)
    text = "\n".join(lines)
    assert "`--model auto` − Lite0's auto (the best single backbone), seeds 0: -50.0 [" in text and "] points" in text
    assert "wall time 1.20× its\n" in text + "\n"  # no run shared the CPU: no mark
    by_model["auto"][0]["load"] = [3.5, 2.0]
    text = "\n".join(table(by_model, {"gflops": GFLOPS, "rates": {}}))
    assert "wall time 1.20×" not in text and "wall times not comparable (†: a run shared the CPU)" in text
    # gains over x and y: Lite0 ((1 - 0.81) + (1 - 0.6)) / 2 = +29.5 points, SqueezeNet ((0.5 - 0.8) + (0.5 - 1)) / 2
    assert "Lite0 +29.5, Lite1 -1.5, Lite2 -14.0, SqueezeNet -40.0 points" in text
    assert "- SqueezeNet's auto − Lite0's: -50.0 [" in text and "- Lite1's auto − Lite0's: -25.0 [" in text
    # on y every probe is outside the noise (100,000 images): best probe picks SqueezeNet (0.5); the
    # gain rule, with x's gains, Lite0 (1.0)
    assert "rule *probe + fine-tuning gain (backbones.choose)*: mean val 1.000, mean test 1.000 (Lite0 2); − Lite0's auto, the best single backbone: the same run" in text
    assert "rule *best probe*: mean val 0.750, mean test 0.750 (Lite0 1, SqueezeNet 1); − Lite0's auto, the best single backbone: -25.0 [" in text
    assert "rule *probe only, cheapest within the noise*: mean val 0.500, mean test 0.500 (SqueezeNet 2)" in text


def test_a_rule_is_scored_with_the_gains_of_the_other_datasets_only():
    seen = {}

    def spy(probe, gflops, gains, n_val):
        seen[tuple(sorted(probe.items()))] = gains
        return "efficientnet_lite0"

    by_model = {"efficientnet_lite0": [single("efficientnet_lite0", "x", "11", 0.5), single("efficientnet_lite0", "y", "10", 0.5)],
                "squeezenet1_1": [single("squeezenet1_1", "x", "10", 0.25), single("squeezenet1_1", "y", "11", 0.75)]}
    assert rule_outcome(by_model, spy, GFLOPS) == {("x", 0): "efficientnet_lite0", ("y", 0): "efficientnet_lite0"}
    on_x = seen[(("efficientnet_lite0", 0.5), ("squeezenet1_1", 0.25))]
    assert on_x == {"efficientnet_lite0": pytest.approx(0.0), "squeezenet1_1": pytest.approx(0.25)}  # y's gains
    on_y = seen[(("efficientnet_lite0", 0.5), ("squeezenet1_1", 0.75))]
    assert on_y == {"efficientnet_lite0": pytest.approx(0.5), "squeezenet1_1": pytest.approx(0.25)}  # x's gains


def test_only_datasets_every_backbone_ran_are_compared():
    by_model = {"efficientnet_lite0": [single("efficientnet_lite0", "x", "11", 0.5), single("efficientnet_lite0", "y", "11", 0.5)],
                "squeezenet1_1": [single("squeezenet1_1", "x", "10", 0.5)]}
    lines = table(by_model, {"gflops": GFLOPS, "rates": {}})  # one dataset: left out, no other sets a gain
    assert any(line.startswith("| x |") for line in lines) and not any(line.startswith("| y |") for line in lines)


def test_lite0s_auto_comes_from_its_own_file_when_there_is_one(tmp_path):
    """The backbones compare auto runs of one commit: Lite0's own file (its auto at the other
    backbones' commit) wins over suite-test.json's current auto, which is the fallback."""
    def write(name: str, bits: str) -> None:
        (tmp_path / name).write_text(json.dumps({"k": single("efficientnet_lite0", "x", bits, 0.5)}))
    write("suite-test.json", "10")
    assert [r["test_correct"] for r in load(tmp_path)["efficientnet_lite0"]] == ["10"]
    write("suite-test-efficientnet_lite0.json", "11")
    assert [r["test_correct"] for r in load(tmp_path)["efficientnet_lite0"]] == ["11"]


def test_speed_rates_are_images_over_the_median_lap():
    laps = {"a": {"train": [10.0, 20.0, 11.0], "val": [1.0, 2.0, 4.0]}}
    assert rates(laps, n_train=1000, n_val=100) == {"a": {"train": pytest.approx(1000 / 11), "infer": pytest.approx(50)}}


def test_the_readme_block_is_the_committed_results():
    results = ROOT / "bench" / "results"
    readme = (ROOT / "README.md").read_text()
    speed = results / "backbone-speed.json"
    block = readme_block(load(results), json.loads(speed.read_text()) if speed.is_file() else None, load_cost(results),
                         load_fixed(results))
    assert readme[readme.index(README_BEGIN):readme.index(README_END) + len(README_END)] == block


def test_the_backbone_figures_in_concepts_md_are_the_suites():
    """docs/concepts.md quotes the backbones' gains, SqueezeNet's auto against Lite0's and the
    rules' scores: recomputed here from the committed results."""
    from backbone_table import chosen_on_val, gains, mean_test, paired_diff, pick, rule_scores, shared, singles
    from heldout import Diff

    results = ROOT / "bench" / "results"
    by_model = load(results)
    models = singles(by_model)
    keys = shared({m: by_model[m] for m in models})
    words = {2: "two", 7: "seven", 8: "eight"}
    lo, sq = "efficientnet_lite0", "squeezenet1_1"
    gflops = json.loads((results / "backbone-speed.json").read_text())["gflops"]
    scores = rule_scores(by_model, gflops)  # name -> (mean val, mean test, picks)
    score = {n: (test, {m: sum(v == m for v in picks.values()) for m in models}) for n, (_, test, picks) in scores.items()}
    docs = " ".join((ROOT / "docs" / "concepts.md").read_text().split())
    g = gains(by_model, [k for k in keys if k[1] == 0])  # FINE_TUNE_GAIN's, set at seed 0
    assert ("112 px: " + ", ".join(f"{SHORT[m]} {100 * g[m]:+.1f}" for m in models).replace("+-", "-")
            + " points)") in docs
    datasets, seeds = {d for d, _ in keys}, sorted({s for _, s in keys})
    assert all(pick(by_model, sq, k)["test"] < pick(by_model, lo, k)["test"] for k in keys)
    assert (f"below Lite0's on all {words[len(datasets)]} held-out splits at seeds {', '.join(map(str, seeds))} "
            f"(mean {mean_test(by_model, sq, keys):.3f} against {mean_test(by_model, lo, keys):.3f})") in docs
    def probe_ahead(k: tuple[str, int]) -> bool:
        return pick(by_model, sq, k)["probe_acc"] > pick(by_model, lo, k)["probe_acc"]

    ahead = sorted(d for d in datasets if all(probe_ahead(k) for k in keys if k[0] == d))
    assert not any(probe_ahead(k) for k in keys if k[0] not in ahead)  # "ahead on two datasets", nowhere else
    assert f"ahead of Lite0's on {words[len(ahead)]} datasets ({' and '.join(ahead)}, at every seed)" in docs
    old, new, cheap = (score[n] for n in ("probe only, cheapest within the noise",
                                          "probe + fine-tuning gain (backbones.choose)",
                                          "probe + fine-tuning gain, cheapest within the noise"))
    def counts(picked: dict[str, int]) -> str:
        return ", ".join(f"{SHORT[m]} on {n}" for m, n in picked.items() if n)

    assert f"picked SqueezeNet on {old[1][sq]} of the {len(keys)} runs and scored {old[0]:.3f}" in docs
    assert (f"the gain rule scores {new[0]:.3f} ({counts(new[1])}), against "
            f"{mean_test(by_model, 'efficientnet_lite2', keys):.3f} for always Lite2, the best single backbone, "
            f"and {mean_test(by_model, lo, keys):.3f} for always Lite0") in docs
    def interval(d: Diff) -> str:  # Diff.cell's figures, with the docs' minus signs
        return f"{100 * d.mean:+.1f} [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}]".replace("-", "−")

    rule = scores["probe + fine-tuning gain (backbones.choose)"][2]
    assert (f"(the rule − always Lite2: {interval(paired_diff(by_model, lambda k: rule[k], 'efficientnet_lite2', keys))}"
            " points)") in docs
    assert (f"(Lite1's auto − Lite0's: {interval(paired_diff(by_model, lambda k: 'efficientnet_lite1', lo, keys))}"
            " points)") in docs
    assert f"picked Lite0 on {cheap[1][lo]} of the {len(keys)} runs and scored {cheap[0]:.3f}, no better than" in docs
    assert cheap[0] <= mean_test(by_model, lo, keys) + 1e-9
    lift = mean_test(by_model, "efficientnet_lite2", keys) - mean_test(by_model, lo, keys)
    assert f"Lite2's auto is {100 * lift:+.1f} points above Lite0's there, inside the noise" in docs
    ranked = [n for n in sorted(scores, key=lambda n: -scores[n][0]) if n != "largest within the noise"]  # = always Lite2
    assert ranked[:3] == ["always Lite0", "always Lite2", "probe + fine-tuning gain (backbones.choose)"]
    assert (f"always Lite0 comes first ({scores[ranked[0]][0]:.3f}), then always Lite2 ({scores[ranked[1]][0]:.3f}) "
            f"and the gain rule ({scores[ranked[2]][0]:.3f})") in docs
    assert chosen_on_val(scores) == "always Lite0"
    two = "efficientnet_lite2"
    assert f"(Lite2 − Lite0: {interval(paired_diff(by_model, lambda k: two, lo, keys))} points)" in docs
    assert f"the val gap, {100 * (scores['always Lite0'][0] - scores['always Lite2'][0]):.1f} points, has no interval" in docs
    assert (f"its test is {interval(paired_diff(by_model, lambda k: lo, 'efficientnet_lite2', keys))} points from "
            "always Lite2's") in docs
    gtsrb = [k for k in shared(by_model) if k[0] == "gtsrb"]
    assert all(pick(by_model, "auto", k)["backbone"]["chosen"] == lo for k in gtsrb)
    differ = [k[1] for k in gtsrb if pick(by_model, "auto", k)["probe_acc"] != pick(by_model, lo, k)["probe_acc"]]
    assert f"differs from Lite0's own run at the same seed on seeds {', '.join(map(str, differ))} alike" in docs


def test_the_shipped_fine_tuning_gains_are_the_suites():
    """backbones.FINE_TUNE_GAIN is the gain bench/backbone_table measures over the datasets where
    every backbone's auto ran at seed 0, and its comment names those datasets. Later seeds do not
    move it: `--model auto`'s runs at seeds 1 and 2 chose with these gains."""
    from backbone_table import gains, shared, singles

    from layerwise.backbones import FINE_TUNE_GAIN, OFFLINE

    by_model = load(ROOT / "bench" / "results")
    models = singles(by_model)
    keys = [k for k in shared({m: by_model[m] for m in models}) if k[1] == 0]  # set at seed 0 (its comment)
    assert set(models) == set(OFFLINE) and FINE_TUNE_GAIN == {m: round(g, 3) for m, g in gains(by_model, keys).items()}
    source = " ".join((ROOT / "src" / "layerwise" / "backbones.py").read_text().split())
    assert all(d in source for d, _ in keys)


def test_the_controlled_cost_line_quotes_the_geometric_mean_and_each_ratio():
    by_model = {m: [single(m, "x", "1100", 0.5), single(m, "y", "1010", 0.5)] for m in BACKBONES}
    by_model["auto"] = [auto_rec("x", "1100", "efficientnet_lite0", {m: 0.5 for m in BACKBONES}),
                        auto_rec("y", "1010", "efficientnet_lite0", {m: 0.5 for m in BACKBONES})]
    cost = {"ratios": {"x": 1.2, "y": 1.5}, "clean": 2, "geomean": (1.2 * 1.5) ** 0.5}
    text = "\n".join(table(by_model, {"gflops": GFLOPS, "rates": {}}, cost))
    assert "`--model auto` takes 1.34× Lite0's auto's wall time (geometric mean over 2 datasets: x 1.20×, y 1.50×)" in text
    assert "Controlled cost" not in "\n".join(table(by_model, {"gflops": GFLOPS, "rates": {}}))


def test_the_worst_dataset_line_names_a_loss_outside_its_interval():
    from backbone_table import worst_dataset

    probes = {m: 0.5 for m in BACKBONES}
    by_model = {m: [single(m, "x", "1" * 100, 0.5), single(m, "y", "10" * 50, 0.5)] for m in BACKBONES}
    by_model["auto"] = [auto_rec("x", "1" * 60 + "0" * 40, "efficientnet_lite0", probes),
                        auto_rec("y", "10" * 50, "efficientnet_lite0", probes)]
    keys = [("x", 0), ("y", 0)]
    line = worst_dataset(by_model, keys)
    assert line.startswith("- Worst dataset for `--model auto` against Lite0's auto (seeds 0): x, -40.0 [")
    assert line.endswith("below it outside the interval on x of the 2")
    by_model["auto"][0] = auto_rec("x", "1" * 99 + "0", "efficientnet_lite0", probes)  # one image: inside the noise
    assert "inside the noise; below it outside the interval on none of the 2" in worst_dataset(by_model, keys)


def test_model_auto_is_compared_on_every_seed_its_two_sides_ran():
    """Lite1 and SqueezeNet ran seed 0 only: the grid keeps to seed 0, while `--model auto`
    against Lite0 and Lite2 (the best single backbone) pairs on seeds 0 and 1, which those three
    ran (fails if the comparison waits for every backbone's seeds)."""
    probes = {m: 0.5 for m in BACKBONES}
    by_model = {m: [single(m, "x", "1100", 0.5)] for m in BACKBONES}
    by_model["efficientnet_lite2"][0] = single("efficientnet_lite2", "x", "1110", 0.5)
    for m in ("efficientnet_lite0", "efficientnet_lite2"):
        by_model[m].append(rec(m, "x", "1100", seed=1, probe_acc=0.5, best=0.5, n_val=100))
    by_model["auto"] = [auto_rec("x", "1110", "efficientnet_lite2", probes),
                        auto_rec("x", "1111", "efficientnet_lite2", probes) | {"seed": 1}]
    text = "\n".join(table(by_model, {"gflops": GFLOPS, "rates": {}}))
    assert "| x | 0.500 | 0.500 | 0.750 | 0.500 | 0.750 | Lite2 |" in text  # seed 0 only: Lite1 and SqueezeNet
    assert "`--model auto` − Lite0's auto, seeds 0, 1: +37.5 [" in text
    assert "`--model auto` − Lite2's auto (the best single backbone), seeds 0, 1: +25.0 [" in text
    assert "Worst dataset for `--model auto` against Lite0's auto (seeds 0, 1): x, +37.5 [" in text


def test_val_chooses_the_rule_and_test_only_reports_it():
    """Lite2's best val epoch leads on both datasets but its test trails Lite0's: the rule chosen is
    one val ranks first (one that picks Lite2: the gain rule ties with always-Lite2, the first listed
    wins), and its test line is the loss test then shows."""
    by_model = {"efficientnet_lite0": [single("efficientnet_lite0", d, "1111", 0.8, best=0.7) for d in "xy"],
                "efficientnet_lite2": [single("efficientnet_lite2", d, "1100", 0.7, best=0.9) for d in "xy"]}
    lines = table(by_model, {"gflops": GFLOPS, "rates": {}})
    assert "- rule *always Lite2*: mean val 0.900, mean test 0.500 (Lite2 2); − Lite0's auto, the best single backbone: -50.0 [" in "\n".join(lines)
    chosen = next(line for line in lines if line.startswith("- Chosen on val"))
    assert chosen.startswith("- Chosen on val (the best mean val): *probe + fine-tuning gain (backbones.choose)*; its "
                             "test − Lite0's auto, the best single backbone on test: -50.0 [")
    assert not any("always Lite1" in line for line in lines)  # no runs of Lite1: no rule for it


def test_auto_is_set_against_the_best_fixed_strategy_run_on_its_own_backbone():
    """The oracle is each dataset's best fixed strategy in hindsight; a variant missing on a
    dataset leaves that dataset out (never compared on unequal sets); no fixed runs, no line."""
    from backbone_table import against_fixed

    def run(d: str, v: str, bits: str, seed: int = 0) -> dict:
        return rec("efficientnet_lite2", d, bits, seed=seed) | {"variant": v, "best": 0.5}

    recs = [run("x", "auto", "1110"), run("x", "full", "1110"), run("x", "head", "1000"),
            run("y", "auto", "1111"), run("y", "full", "1100"), run("y", "head", "1110"),
            run("z", "auto", "1111"), run("z", "full", "0000")]  # z lacks head: left out
    line = against_fixed(recs, "efficientnet_lite2")
    # x: 0.75 - 0.75 (full); y: 1.00 - 0.75 (head, not full): a mean of +12.5 points
    assert line is not None and line.startswith("- Lite2: auto − the oracle of its 2 fixed strategies (full, head), "
                                                "2 datasets, seeds 0: +12.5 [")
    assert against_fixed([r for r in recs if r["variant"] == "auto"], "efficientnet_lite2") is None

"""The per-backbone table (issue 23): each offline backbone's ``auto`` and ``--model auto`` on the
suite's held-out splits, with their wall time and speed, and how the backbone rule fared.

    .venv/bin/python bench/backbone_table.py            # print the table
    .venv/bin/python bench/backbone_table.py --readme   # and rewrite README.md's block

Reads suite-test-efficientnet_lite0.json (Lite0's ``auto``; suite-test.json's without it), suite-test-MODEL.json for
the other backbones and for ``--model auto`` (bench/suite.py --model MODEL --variants auto), and
backbone-speed.json (bench/backbone_speed.py). Pure functions over those records, so they are
tested on made-up ones.
"""

from __future__ import annotations

import functools
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from competitor import LOADED
from heldout import Diff, complete, derived_rows, fixed_variants, paired_matrix, seed_text, suite_diff, with_block

from layerwise.backbones import Candidate, choose, noise

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "squeezenet1_1")
SHORT = {"efficientnet_lite0": "Lite0", "efficientnet_lite1": "Lite1", "efficientnet_lite2": "Lite2",
         "squeezenet1_1": "SqueezeNet", "auto": "--model auto"}
README_BEGIN = "<!-- backbone table: written by `python bench/backbone_table.py --readme` -->"
README_END = "<!-- end of the backbone table -->"


def load(results: Path) -> dict[str, list[dict]]:
    """model -> its ``auto`` records at 112 px. Lite0's come from suite-test-efficientnet_lite0.json
    where it exists: its auto runs at the commit the other backbones' ran at (before 8b06073
    let the 960-1,023-image band race), so that every backbone's auto is the same code; else
    from suite-test.json."""
    out = {}
    for model in (*BACKBONES, "auto"):
        path = results / f"suite-test-{model}.json"
        if model == BACKBONES[0] and not path.is_file():
            path = results / "suite-test.json"
        if kept := [r for r in scored(path) if r["variant"] == "auto"]:  # a model with no run yet is not in the tables
            out[model] = kept
    return out


def scored(path: Path) -> list[dict]:
    """The runs recorded in ``path`` at 112 px that have a test score (none if no file yet)."""
    if not path.is_file():
        return []
    return [r for r in json.loads(path.read_text()).values() if r["img"] == 112 and "test_correct" in r]


def load_fixed(results: Path) -> dict[str, list[dict]]:
    """model -> every run recorded on it at 112 px (auto and the fixed strategies): Lite0's from
    suite-test.json, the suite's own, the others from suite-test-MODEL.json."""
    out = {}
    for model in BACKBONES:
        if recs := scored(results / ("suite-test.json" if model == BACKBONES[0] else f"suite-test-{model}.json")):
            out[model] = recs
    return out


def against_fixed(records: Sequence[dict], model: str) -> str | None:
    """``model``'s auto minus the hindsight oracle among the fixed strategies run on it, over the
    datasets and seeds every variant has (heldout.complete), paired: whether auto's thresholds,
    set on Lite0's suite runs, still reach the best fixed strategy on this backbone. None where
    no fixed strategy has run on every dataset."""
    data = derived_rows(complete(records))
    if not data or "oracle" not in next(iter(data.values())):
        return None
    fixed = sorted(fixed_variants(next(iter(data.values()))))  # complete(): every dataset has every variant
    diff = suite_diff([paired_matrix(runs["auto"], runs["oracle"]) for runs in data.values()])
    return (f"- {SHORT[model]}: auto − the oracle of its {len(fixed)} fixed strategies ({', '.join(fixed)}), "
            f"{len(data)} datasets, seeds {seed_text(data)}: {diff.cell().replace(']', '] points', 1)}")


def shared(by_model: dict[str, list[dict]]) -> list[tuple[str, int]]:
    """(dataset, seed) pairs every model has run."""
    keys = [{(r["dataset"], r["seed"]) for r in recs} for recs in by_model.values()]
    return sorted(set.intersection(*keys)) if keys else []


def seed_list(keys: Sequence[tuple[str, int]]) -> str:
    """The seeds ``keys`` cover, as the lines name them: "0, 1, 2"."""
    return ", ".join(map(str, sorted({s for _, s in keys})))


def pick(by_model: dict[str, list[dict]], model: str, key: tuple[str, int]) -> dict:
    return next(r for r in by_model[model] if (r["dataset"], r["seed"]) == key)


# A backbone rule: (probe val accuracy, GFLOPs and fine-tuning gain per backbone, val images) -> backbone.
Rule = Callable[[dict[str, float], dict[str, float], dict[str, float], int], str]


def in_noise(expected: dict[str, float], probe: dict[str, float], n_val: int) -> list[str]:
    """The backbones whose expectation is within the noise (backbones.noise, of the best one's
    probe: an expectation with a gain added is not an accuracy) of the best expectation."""
    top = max(expected, key=lambda k: expected[k])
    return [k for k in expected if expected[k] >= expected[top] - noise(probe[top], n_val)]


def with_gain(probe: dict[str, float], gflops: dict[str, float], gains: dict[str, float], n_val: int) -> str:
    """backbones.choose itself: the best probe plus measured fine-tuning gain (it reads a
    candidate's name, probe accuracy and GFLOPs only)."""
    rows = [Candidate(k, acc, skill=0.0, knn_acc=None, img_size=0, gflops=gflops[k], seconds=0.0)
            for k, acc in probe.items()]
    return choose(rows, n_val, gains)[0]


def gain_cheapest_in_noise(probe: dict[str, float], gflops: dict[str, float], gains: dict[str, float], n_val: int) -> str:
    expected = {k: a + gains.get(k, 0.0) for k, a in probe.items()}
    return min(in_noise(expected, probe, n_val), key=lambda k: gflops[k])


def cheapest_in_noise(probe: dict[str, float], gflops: dict[str, float], gains: dict[str, float], n_val: int) -> str:
    """The rule before the gains: the cheapest whose probe is within the noise of the best."""
    return min(in_noise(probe, probe, n_val), key=lambda k: gflops[k])


def largest_in_noise(probe: dict[str, float], gflops: dict[str, float], gains: dict[str, float], n_val: int) -> str:
    """The costliest within the noise of the best probe: fine-tuning may take a bigger model further."""
    return max(in_noise(probe, probe, n_val), key=lambda k: gflops[k])


def best_probe(probe: dict[str, float], gflops: dict[str, float], gains: dict[str, float], n_val: int) -> str:
    return max(probe, key=lambda k: (probe[k], -gflops[k]))


def always(model: str, probe: dict[str, float], gflops: dict[str, float], gains: dict[str, float], n_val: int) -> str:
    """No choice: ``model`` on every dataset (the single backbones, as rules, so val can rank them too)."""
    return model


RULES: dict[str, Rule] = {
    "probe + fine-tuning gain (backbones.choose)": with_gain,
    "probe + fine-tuning gain, cheapest within the noise": gain_cheapest_in_noise,
    "probe only, cheapest within the noise": cheapest_in_noise,
    "best probe": best_probe,
    "largest within the noise": largest_in_noise,
    **{f"always {SHORT[m]}": functools.partial(always, m) for m in BACKBONES},
}


def singles(by_model: dict[str, list[dict]]) -> list[str]:
    return [m for m in BACKBONES if m in by_model]


def fine_tune_gain(by_model: dict[str, list[dict]], model: str, keys: Sequence[tuple[str, int]]) -> float:
    """What ``model``'s auto added to its frozen probe on val, over ``keys``: the best epoch's val
    accuracy minus the probe's. Both on val, the split that makes choices, so that the test split
    stays for reporting (the gain is a choice's setting). The best epoch's val is the maximum over
    the epochs, a little optimistic; every backbone's gain carries that."""
    return over_datasets(lambda k: pick(by_model, model, k)["best"] - pick(by_model, model, k)["probe_acc"], keys)


def gains(by_model: dict[str, list[dict]], keys: Sequence[tuple[str, int]]) -> dict[str, float]:
    """Each single backbone's gain over ``keys``; none over no datasets (one left out of one)."""
    return {m: fine_tune_gain(by_model, m, keys) for m in singles(by_model)} if keys else {}


def rule_outcome(by_model: dict[str, list[dict]], rule: Rule, gflops: dict[str, float]) -> dict[tuple[str, int], str]:
    """(dataset, seed) -> the backbone ``rule`` picks from the single backbones' own recorded
    probes, where every one's auto has run (so the pick's test accuracy is known). The gains come
    from the *other* datasets only: a rule is not scored on the data that set it."""
    models = singles(by_model)
    keys = shared({m: by_model[m] for m in models})
    out = {}
    for key in keys:
        probes = {m: pick(by_model, m, key)["probe_acc"] for m in models}
        rec = pick(by_model, models[0], key)
        # val and test halve each class: the test half's size stands in where n_val was not recorded
        n_val = rec.get("n_val") or len(rec["test_correct"])
        out[key] = rule(probes, gflops, gains(by_model, [k for k in keys if k[0] != key[0]]), n_val)
    return out


def over_datasets(value: Callable[[tuple[str, int]], float], keys: Sequence[tuple[str, int]]) -> float:
    """The mean over datasets of each dataset's mean over its seeds (a dataset with more seeds
    does not weigh more)."""
    datasets = sorted({d for d, _ in keys})
    return statistics.fmean(statistics.fmean(value(k) for k in keys if k[0] == d) for d in datasets)


def mean_test(by_model: dict[str, list[dict]], model: str, keys: Sequence[tuple[str, int]]) -> float:
    return over_datasets(lambda k: pick(by_model, model, k)["test"], keys)


def table(by_model: dict[str, list[dict]], speed: dict | None, cost: dict | None = None,
          fixed: dict[str, list[dict]] | None = None) -> list[str]:
    """The single backbones over the datasets they all ran, their fine-tuning gains, (``fixed``:
    load_fixed) each one's auto against the fixed strategies run on it, and the backbone rules
    scored on them; then ``--model auto`` over the datasets where it has run too, with its
    comparisons, and (``cost``: model_auto_cost.summary) its controlled cost."""
    models = singles(by_model)
    keys = shared({m: by_model[m] for m in models})
    lines = [f"Test accuracy of each backbone's `auto` (seeds {seed_list(keys)}; 112 px; the suite's "
             f"held-out splits, `bench/suite.py --test-split --model MODEL --variants auto`).", "",
             *grid(by_model, models, keys, speed), "",
             "Fine-tuning gain (auto's best val accuracy minus its frozen probe's, both on val, mean over these "
             "datasets): " + ", ".join(f"{SHORT[m]} {100 * g:+.1f}" for m, g in gains(by_model, keys).items()) + " points.",
             "", *against(by_model, models[1:], models[0], keys)]
    if held := [line for m, recs in (fixed or {}).items() if (line := against_fixed(recs, m))]:
        lines += ["", "Each backbone's auto against the fixed strategies run on the same backbone (auto's thresholds "
                  "were set on Lite0's suite runs; the oracle is each dataset's best fixed strategy on test, in "
                  "hindsight; Lite0's auto here is the suite's, which races the 960–1,023-image band too):", *held]
    if speed:
        lines += ["", "Backbone rules on the same datasets, each scored with the gains of the *other* datasets "
                  "(leave one dataset out):", *rule_lines(by_model, speed["gflops"])]
    if "auto" in by_model:
        both = shared(by_model)
        best = best_single(by_model, keys)
        # a paired comparison needs only its two sides' runs: seeds the other backbones lack still count
        pairs = shared({m: by_model[m] for m in (BACKBONES[0], best, "auto")})
        lines += ["", f"`--model auto` on the {len({d for d, _ in both})} datasets where it has run:", "",
                  *grid(by_model, [*models, "auto"], both, None), "", *comparisons(by_model, pairs, best),
                  worst_dataset(by_model, pairs)]
    if cost and cost["geomean"] is not None:
        lines.append(f"- Controlled cost (`bench/model_auto_cost.py`: the two runs back to back on each dataset, "
                     f"nothing else running; [model-auto-cost.md](bench/results/model-auto-cost.md)): `--model auto` "
                     f"takes {cost['geomean']:.2f}× Lite0's auto's wall time (geometric mean over {cost['clean']} "
                     f"datasets: {', '.join(f'{d} {r:.2f}×' for d, r in cost['ratios'].items())})")
    return lines


def grid(by_model: dict[str, list[dict]], models: Sequence[str], keys: Sequence[tuple[str, int]],
         speed: dict | None) -> list[str]:
    """Per dataset and on average: each model's test accuracy, wall time and (``speed``) img/s."""
    chose = "auto" in models
    lines = ["| dataset | " + " | ".join(SHORT[m] for m in models) + (" | `--model auto` chose |" if chose else " |"),
             "|---|" + "---:|" * len(models) + ("---|" if chose else "")]
    end = " | |" if chose else " |"
    for d in sorted({d for d, _ in keys}):
        ks = [k for k in keys if k[0] == d]
        picked = ", ".join(SHORT[pick(by_model, "auto", k)["backbone"]["chosen"]] for k in ks) if chose else ""
        lines.append(f"| {d} | " + " | ".join(f"{mean_test(by_model, m, ks):.3f}" for m in models)
                     + (f" | {picked} |" if chose else " |"))
    lines.append("| **mean** | " + " | ".join(f"**{mean_test(by_model, m, keys):.3f}**" for m in models) + end)
    walls = {m: over_datasets(lambda k, m=m: pick(by_model, m, k)["wall"], keys) for m in models}
    shared_cpu = {m for m in models if loaded(by_model, m, keys)}
    lines.append("| wall s (mean) | " + " | ".join(f"{walls[m]:.0f}{' †' * (m in shared_cpu)}" for m in models) + end)
    if speed:
        rates = speed["rates"]
        for what, label in (("train", "train img/s"), ("infer", "inference img/s")):
            lines.append(f"| {label} | " + " | ".join(f"{rates[m][what]:.0f}" if m in rates else "" for m in models) + end)
    if shared_cpu:
        lines += ["", f"† measured while another job shared the 2-core CPU (load average above {LOADED:g}): "
                  "the wall time is not the backbone's; the img/s rows (one process, the backbones taking turns) and "
                  "the controlled cost line compare speed"]
    return lines


def paired_diff(by_model: dict[str, list[dict]], left: Callable[[tuple[str, int]], str], right: str,
                keys: Sequence[tuple[str, int]]) -> Diff:
    """The auto of ``left(key)`` minus ``right``'s, paired on seeds and test images per dataset,
    with its 95 % interval (heldout.suite_diff)."""
    mats = [paired_matrix([pick(by_model, left(k), k) for k in keys if k[0] == d],
                          [pick(by_model, right, k) for k in keys if k[0] == d]) for d in sorted({d for d, _ in keys})]
    return suite_diff(mats)


def paired(by_model: dict[str, list[dict]], left: Callable[[tuple[str, int]], str], right: str,
           keys: Sequence[tuple[str, int]]) -> str:
    """:func:`paired_diff` as a cell, and whether it is inside the noise."""
    return paired_diff(by_model, left, right, keys).cell().replace("]", "] points", 1)


def loaded(by_model: dict[str, list[dict]], model: str, keys: Sequence[tuple[str, int]]) -> bool:
    """Whether any of ``model``'s runs over ``keys`` shared the CPU with another job."""
    return any(max(pick(by_model, model, k).get("load") or [0.0]) > LOADED for k in keys)


def best_single(by_model: dict[str, list[dict]], keys: Sequence[tuple[str, int]]) -> str:
    return max(singles(by_model), key=lambda m: mean_test(by_model, m, keys))


def against(by_model: dict[str, list[dict]], models: Sequence[str], ref: str, keys: Sequence[tuple[str, int]]) -> list[str]:
    """Each of ``models``' auto minus ``ref``'s, paired on seeds and test images, 95 % intervals."""
    return [f"- {SHORT[m]}'s auto − {SHORT[ref]}'s: {paired(by_model, lambda k, m=m: m, ref, keys)}" for m in models]


def comparisons(by_model: dict[str, list[dict]], keys: Sequence[tuple[str, int]], best: str) -> list[str]:
    """`--model auto` against Lite0's auto and ``best``'s (the best single backbone), paired on
    ``keys``' seeds and test images, 95 % intervals."""
    out = []
    for m in dict.fromkeys((BACKBONES[0], best)):
        ratio = over_datasets(lambda k, m=m: pick(by_model, "auto", k)["wall"] / pick(by_model, m, k)["wall"], keys)
        # a ratio of runs that shared the CPU measures the other job: said, not quoted
        wall = (f"wall time {ratio:.2f}× its" if not (loaded(by_model, "auto", keys) or loaded(by_model, m, keys))
                else "wall times not comparable (†: a run shared the CPU)")
        out.append(f"- `--model auto` − {SHORT[m]}'s auto{' (the best single backbone)' if m == best else ''}, "
                   f"seeds {seed_list(keys)}: "
                   f"{paired(by_model, lambda k: 'auto', m, keys)}; {wall}")
    return out


def worst_dataset(by_model: dict[str, list[dict]], keys: Sequence[tuple[str, int]], ref: str = BACKBONES[0]) -> str:
    """The dataset where ``--model auto`` fell furthest below ``ref``'s auto, paired on seeds and
    test images there, and whether that is inside its 95 % interval (issue 23: on no dataset
    worse than Lite0's auto by more than its interval)."""
    diffs = {d: paired_diff(by_model, lambda k: "auto", ref, [k for k in keys if k[0] == d])
             for d in sorted({d for d, _ in keys})}
    d = min(diffs, key=lambda d: diffs[d].mean)
    outside = [x for x, v in diffs.items() if v.hi < 0]
    return (f"- Worst dataset for `--model auto` against {SHORT[ref]}'s auto (seeds {seed_list(keys)}): {d}, "
            f"{diffs[d].cell().replace(']', '] points', 1)}; below it outside the interval on "
            + (", ".join(outside) if outside else "none") + f" of the {len(diffs)}")


def rule_scores(by_model: dict[str, list[dict]], gflops: dict[str, float]
                ) -> dict[str, tuple[float, float, dict[tuple[str, int], str]]]:
    """Rule name -> its picks' mean val accuracy (their auto's best val epoch: the score that may
    choose a rule), mean test accuracy (only reported) and the picks themselves, on the datasets
    where every single backbone's auto ran; a rule that picks a backbone with no runs is left out."""
    keys = shared({m: by_model[m] for m in singles(by_model)})
    out = {}
    for name, rule in RULES.items():
        picks = rule_outcome(by_model, rule, gflops)
        if set(picks.values()) <= set(by_model):
            out[name] = tuple(over_datasets(lambda k, p=picks, s=split: pick(by_model, p[k], k)[s], keys)
                              for split in ("best", "test")) + (picks,)
    return out


def chosen_on_val(scores: dict[str, tuple[float, float, dict]]) -> str:
    """The rule with the best mean val accuracy (the first listed on a tie)."""
    return max(scores, key=lambda n: scores[n][0])


def rule_lines(by_model: dict[str, list[dict]], gflops: dict[str, float]) -> list[str]:
    """Each rule's mean val and test accuracy (:func:`rule_scores`) and its picks minus the best
    single backbone's auto on test, paired (95 % interval); then the rule val chooses and what
    that choice scores on test."""
    keys = shared({m: by_model[m] for m in singles(by_model)})
    best = best_single(by_model, keys)
    scores, out = rule_scores(by_model, gflops), []
    for name, (val, acc, picks) in scores.items():
        counts = ", ".join(f"{SHORT[b]} {sum(v == b for v in picks.values())}" for b in BACKBONES
                           if any(v == b for v in picks.values()))
        out.append(f"- rule *{name}*: mean val {val:.3f}, mean test {acc:.3f} ({counts}); − {SHORT[best]}'s "
                   f"auto, the best single backbone: {paired(by_model, lambda k, p=picks: p[k], best, keys)}")
    chosen = chosen_on_val(scores)
    picks = scores[chosen][2]
    out.append(f"- Chosen on val (the best mean val): *{chosen}*; its test − {SHORT[best]}'s auto, the best single "
               f"backbone on test: {paired(by_model, lambda k: picks[k], best, keys)}")
    return out


def readme_block(by_model: dict[str, list[dict]], speed: dict | None, cost: dict | None = None,
                 fixed: dict[str, list[dict]] | None = None) -> str:
    return "\n".join([README_BEGIN, *table(by_model, speed, cost, fixed), README_END])


def load_cost(results: Path) -> dict | None:
    """model_auto_cost.summary of the recorded pairs, if any were measured."""
    from model_auto_cost import summary

    path = results / "model-auto-cost.json"
    return summary(json.loads(path.read_text())) if path.is_file() else None


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", action="store_true", help="rewrite README.md's backbone table")
    ap.add_argument("--results", type=Path, default=None, help="the results folder (default bench/results)")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    results = args.results or root / "bench" / "results"
    speed_path = results / "backbone-speed.json"
    block = readme_block(load(results), json.loads(speed_path.read_text()) if speed_path.is_file() else None,
                         load_cost(results), load_fixed(results))
    print(block)
    if args.readme:
        (root / "README.md").write_text(with_block((root / "README.md").read_text(), block, README_BEGIN, README_END))

"""The suite's held-out numbers: test accuracy that no choice saw, and paired differences with
95 % intervals from a bootstrap over seeds and test images.

Pure functions over the records bench/suite.py stores (``test``, ``test_correct``: a string of
0/1 per test image in one fixed order, ``best``: best val accuracy, ``chosen`` and the evidence
for auto), so they are tested on made-up records.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from suite_stats import FIXED_EXCLUDED, by_dataset, loo_threshold_rule

BOOT = 4000  # bootstrap replicates: the interval's ends move by < 0.1 point between resamplings


@dataclass(frozen=True)
class Diff:
    """A mean paired difference (accuracy points as fractions) and its 95 % interval."""

    mean: float
    lo: float
    hi: float
    same_run: bool = False  # every seed's pair is one computation: identical outcomes, image for image

    @property
    def inside_noise(self) -> bool:
        return self.lo <= 0 <= self.hi

    def cell(self) -> str:
        if self.same_run:
            return "the same run"
        text = f"{100 * self.mean:+.1f} [{100 * self.lo:+.1f}, {100 * self.hi:+.1f}]"
        return text + (" inside the noise" if self.inside_noise else "")


def outcomes(runs: Sequence[dict]) -> dict[int, np.ndarray]:
    """seed -> 0/1 per test image."""
    return {r["seed"]: np.frombuffer(r["test_correct"].encode(), dtype=np.uint8) - ord("0") for r in runs}


def paired_matrix(a: Sequence[dict], b: Sequence[dict]) -> np.ndarray:
    """a minus b per shared seed (rows) and test image (columns)."""
    oa, ob = outcomes(a), outcomes(b)
    seeds = sorted(set(oa) & set(ob))
    if not seeds:
        raise ValueError("no seed run by both")
    return np.stack([oa[s].astype(np.int16) - ob[s] for s in seeds])


def bootstrap_means(d: np.ndarray, rng: np.random.Generator, n: int = BOOT) -> np.ndarray:
    """``n`` resampled means of a seeds x images difference matrix: seeds and images are drawn
    with replacement, the images once per replicate for every seed (they are one test set)."""
    s, m = d.shape
    rows = rng.integers(0, s, size=(n, s))
    weights = rng.multinomial(m, np.full(m, 1 / m), size=n)  # how often each image is drawn
    per_seed = (d @ weights.T) / m  # seeds x n: each seed's mean over the resampled images
    return np.take_along_axis(per_seed.T, rows, axis=1).mean(axis=1)


def suite_diff(matrices: Sequence[np.ndarray], seed: int = 0) -> Diff:
    """The mean over datasets of each dataset's mean paired difference, its bootstrap interval
    resampling every dataset's seeds and images independently (percentile method)."""
    rng = np.random.default_rng(seed)
    boots = np.mean([bootstrap_means(d, rng) for d in matrices], axis=0)
    mean = float(np.mean([d.mean() for d in matrices]))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    same = all(not d.any() for d in matrices)
    return Diff(mean, float(lo), float(hi), same_run=same)


def complete(records: Sequence[dict]) -> dict[str, dict[str, list[dict]]]:
    """dataset -> variant -> runs, each dataset at the seeds on which every variant has its
    per-image outcomes there (a seed still running would compare unequal sets; a dataset with no
    such seed is left out). Datasets may differ in their seeds: every difference is paired within
    a dataset, and the suite's mean weighs each dataset once."""
    data = by_dataset([r for r in records if "test_correct" in r])
    if not data:
        return {}
    variants = set.union(*(set(v) for v in data.values()))
    out = {}
    for d, v in data.items():
        seeds = set.intersection(*({r["seed"] for r in runs} for runs in v.values())) if set(v) == variants else set()
        if seeds:
            out[d] = {name: [r for r in runs if r["seed"] in seeds] for name, runs in v.items()}
    return out


def test_mean(runs: Sequence[dict]) -> float:
    return statistics.fmean(r["test"] for r in runs)


# rows derived_rows makes from other runs: never a fixed variant of their own
DERIVED = ("oracle", "ceiling", "loo-rule", "auto-before-averaging", "auto+tta")


def fixed_variants(runs: dict[str, list[dict]]) -> list[str]:
    return [v for v in runs if v not in FIXED_EXCLUDED and v not in DERIVED]


def oracle(runs: dict[str, list[dict]]) -> str:
    """The hindsight-best fixed variant: the highest mean test accuracy (no method can know it)."""
    fixed = fixed_variants(runs)
    return max(fixed, key=lambda v: test_mean(runs[v]))


def ceiling(runs: dict[str, list[dict]]) -> list[dict]:
    """Each seed's best fixed run on test: what a perfect chooser among the fixed variants would
    score, seed by seed, in hindsight. Chosen on the very images it is scored on, it is an upper
    bound of choosing, not a method: what auto must add beyond it has to come from elsewhere."""
    fixed = fixed_variants(runs)
    seeds = sorted({r["seed"] for r in runs[fixed[0]]})
    return [max((r for v in fixed for r in runs[v] if r["seed"] == s), key=lambda r: r["test"]) for s in seeds]


def loo_rule(data: dict[str, dict[str, list[dict]]], key: str = "bn_shift") -> dict[str, str]:
    """dataset -> the fixed variant a one-threshold rule on auto's ``key`` evidence picks for it,
    the rule fitted on the *other* datasets' best val accuracy (bench/suite_stats.py)."""
    fixed = sorted(set.intersection(*(set(fixed_variants(runs)) for runs in data.values())))
    val = {d: {v: statistics.fmean(r["best"] for r in runs[v]) for v in fixed} for d, runs in data.items()}
    evidence = {d: statistics.fmean(r[key] for r in runs["auto"]) for d, runs in data.items()}
    return {r["dataset"]: r["choice"] for r in loo_threshold_rule(val, evidence, fixed)}


def derived_rows(data: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, list[dict]]]:
    """Each dataset's runs plus rows made of fixed runs: the hindsight oracle, the per-seed ceiling and the
    leave-one-dataset-out shift rule (when every auto run recorded a shift)."""
    fixed = any(fixed_variants(runs) for runs in data.values())  # not an auto-only backbone run
    loo = loo_rule(data) if fixed and len(data) >= 3 and all(
        r.get("bn_shift") is not None for runs in data.values() for r in runs["auto"]) else {}
    out = {}
    for d, runs in data.items():
        extra = ({"oracle": runs[oracle(runs)], "ceiling": ceiling(runs)} if fixed else {}) | ({"loo-rule": runs[loo[d]]} if d in loo else {})
        before = [r | r["race"]["winner_test"] for r in runs["auto"] if "winner_test" in r.get("race", {})]
        if before and len(before) == len(runs["auto"]):  # the race's winner before the soup and WiSE-FT
            extra["auto-before-averaging"] = before
        tta = [r | r["tta"] for r in runs["auto"] if "tta" in r]
        if tta and len(tta) == len(runs["auto"]):  # the same runs scored with their --tta auto views
            extra["auto+tta"] = tta
        out[d] = runs | extra
    return out


def summary(records: Sequence[dict], against: str = "auto") -> list[str]:
    """One row per variant: its mean test accuracy over the complete datasets and
    ``against`` minus it, with a 95 % interval over datasets, seeds and images."""
    data = derived_rows(complete(records))
    if not data:
        return []
    names = sorted(set.intersection(*(set(v) for v in data.values())), key=lambda v: (v != against, v))
    lines = [f"Datasets: {', '.join(sorted(data))}; seeds: {seed_text(data)}.", "",
             f"| variant | mean test acc | {against} − it, points [95 % interval] |", "|---|---:|---|"]
    for v in names:
        acc = statistics.fmean(test_mean(data[d][v]) for d in data)
        cell = "" if v == against else suite_diff([paired_matrix(data[d][against], data[d][v]) for d in data]).cell()
        lines.append(f"| {v} | {acc:.3f} | {cell} |")
    return lines


def seed_text(data: dict[str, dict[str, list[dict]]]) -> str:
    """The seeds of the complete datasets: one list when they share it, else per dataset."""
    per = {d: sorted({r["seed"] for runs in v.values() for r in runs}) for d, v in data.items()}
    lists = {tuple(s) for s in per.values()}
    if len(lists) == 1:
        return ", ".join(map(str, next(iter(lists))))
    return "; ".join(f"{d} {', '.join(map(str, s))}" for d, s in sorted(per.items()))


def per_dataset(records: Sequence[dict], against: str = "auto") -> list[str]:
    """Per complete dataset: each variant's test accuracy per seed, its mean, and ``against``
    minus it with a 95 % interval over seeds and images."""
    out = []
    for d, runs in sorted(derived_rows(complete(records)).items()):
        chose = ", ".join(r.get("chosen", "-").removeprefix("auto:") for r in sorted(runs[against], key=lambda r: r["seed"]))
        best = f" oracle = {oracle(runs)}." if "oracle" in runs else ""
        out += [f"### {d}", "", f"{against} chose (per seed): {chose}.{best}", "",
                *race_lines(runs),
                "| variant | test acc per seed | mean | best val (mean) | " + against + " − it [95 %] |",
                "|---|---|---:|---:|---|"]
        for v in sorted(runs, key=lambda v: (v != against, v)):
            rs = sorted(runs[v], key=lambda r: r["seed"])
            cell = "" if v == against else suite_diff([paired_matrix(runs[against], rs)]).cell()
            per_seed = " / ".join(format(r["test"], ".3f") for r in rs)
            out.append(f"| {v} | {per_seed} | {test_mean(rs):.3f} | "
                       f"{statistics.fmean(r['best'] for r in rs):.3f} | {cell} |")
        out.append("")
    return out


def race_lines(runs: dict[str, list[dict]]) -> list[str]:
    """Each auto variant's races on one dataset: the rung val accuracies and the winner, per seed."""
    lines = []
    for v in sorted(v for v in runs if v.startswith("auto")):
        for r in sorted(runs[v], key=lambda r: r["seed"]):
            race = r.get("race")
            if race and race.get("rungs"):
                rungs = ", ".join(f"{k} {a:.3f}" for k, a in race["rungs"].items())
                lines.append(f"- {v}, seed {r['seed']}: raced {rungs} (val, after the rung) -> {race['winner']}")
    return [*lines, ""] if lines else []


SEEDS_LINE = "Seeds reported: "


def report_seeds(text: str) -> list[int] | None:
    """The seeds a written report was restricted to (None: all), read back from its own line."""
    for line in text.splitlines():
        if line.startswith(SEEDS_LINE):
            rest = line.removeprefix(SEEDS_LINE).split(" ")[0].rstrip(".")
            return None if rest == "all" else [int(s) for s in rest.split(",")]
    return None


def report(records: Sequence[dict], img: int, seeds: Sequence[int] | None = None, model: str | None = None) -> str:
    """suite-test.md: the records at ``img`` px (of ``seeds`` only, when given: a seed every
    dataset has finished, while the others are still running). ``model``: another backbone's
    records (suite-test-MODEL.md), named in the title and the commands."""
    records = [r for r in records if r["img"] == img and (seeds is None or r["seed"] in seeds)]
    chosen = "all" if seeds is None else ",".join(str(s) for s in seeds)
    tag, flag = (f", {model}", f" --model {model}") if model else ("", "")
    head = [f"# Transfer suite, held-out test split ({img} px{tag})", "",
            f"{SEEDS_LINE}{chosen} (`bench/suite.py --test-split --report-only --img-size {img}{flag}"
            + ("" if seeds is None else f" --seeds {chosen}") + "`).", "",
            f"Written by `bench/suite.py --test-split{flag}` from `bench/results/suite-test{tag.replace(', ', '-')}.json`. "
            "Each val class is split "
            "in two by the SHA-1 of the file names (`held_out()`): the first half stays val and makes every choice "
            "(auto's evidence, the probe's C, early stopping, the best epoch), the second half is test and is only "
            "reported. Differences are paired (same seed, same test images) with a 95 % percentile bootstrap "
            f"interval ({BOOT} replicates) resampling seeds and test images; a difference whose interval holds 0 is "
            "no win and no loss. *oracle* is the fixed variant with the best mean test accuracy on each dataset, "
            "known only in hindsight; *ceiling* is, on each seed, the fixed run with the best test accuracy: a perfect "
            "chooser's score, an upper bound of choosing and no method (auto − it is what choosing alone cannot "
            "reach); *loo-rule* is the fixed variant a threshold on the BatchNorm shift picks "
            "when the threshold is fitted on the other datasets' val accuracy; *auto-before-averaging* is the race's "
            "winner before the soup and WiSE-FT (so auto − it is their gain); *auto+tta* is auto's own runs scored with "
            "the views of `--tta auto` (so auto − it is minus their gain). *the same run* marks a pair whose "
            "outcomes agree image for image on every seed.", "", "## Mean over the suite", ""]
    rows = summary(records) or ["No dataset has every variant at every reported seed yet."]
    return "\n".join([*head, *rows, "", *averaging(records), "## Per dataset", "", *per_dataset(records)]) + "\n"


RACED = ("auto", "auto+race-2.5")  # the variants that race: auto where its budget affords it, and at 2.5x


def averaging(records: Sequence[dict], variants: Sequence[str] = RACED) -> list[str]:
    """The soup's and WiSE-FT's own gains after each variant's race, each paired against what it
    started from: the soup against the race's winner, WiSE-FT against the soup (the winner where
    the soup kept it alone), over the complete datasets. A run that did not race had nothing to
    average: it counts as its own winner, soup and result (a gain of 0)."""
    data = complete(records)
    head = ["## Averaging after the race", "",
            "Test accuracy, points [95 % interval]; a run that did not race counts as no change.", "",
            "| variant | races | the soup − the winner | WiSE-FT − the soup | both − the winner |", "|---|---:|---|---|---|"]
    rows = []
    for v in variants:
        runs = {d: rs[v] for d, rs in sorted(data.items()) if v in rs}
        if not runs:
            continue
        parts: list[list[np.ndarray]] = [[], [], []]
        raced = 0
        for rs in runs.values():
            race = [r.get("race", {}) for r in rs]
            raced += sum("winner_test" in x for x in race)
            winner = [r | x.get("winner_test", {}) for r, x in zip(rs, race)]
            soup = [r | x.get("soup_test", x.get("winner_test", {})) for r, x in zip(rs, race)]
            for part, (a, b) in zip(parts, ((soup, winner), (rs, soup), (rs, winner))):
                part.append(paired_matrix(a, b))
        total = sum(len(rs) for rs in runs.values())
        rows.append(f"| {v} | {raced} of {total} | " + " | ".join(suite_diff(m).cell() for m in parts) + " |")
    if not rows:
        return [*head[:2], "No complete dataset yet.", ""]
    return [*head, *rows, ""]


# The README's summary: auto against the rows a skeptic asks about first (suite-test.md has all).
README_ROWS = ("auto", "oracle", "ceiling", "loo-rule", "discriminative+bn-eval", "full", "plain", "fastai", "fastai-lrfind")
README_BEGIN = "<!-- held-out summary: written by `python bench/heldout.py --readme` from bench/results/suite-test.json -->"
README_END = "<!-- end of the held-out summary -->"


def readme_block(records: Sequence[dict], img: int, seeds: Sequence[int] | None) -> str:
    """The README's held-out table: suite-test.md's summary at the same seeds, its main rows."""
    records = [r for r in records if r["img"] == img and (seeds is None or r["seed"] in seeds)]
    rows = summary(records)
    keep = rows[:4] + [line for line in rows[4:] if line.split(" | ")[0].removeprefix("| ") in README_ROWS]
    return "\n".join([README_BEGIN, *keep, README_END])


def with_block(text: str, block: str, begin: str = README_BEGIN, end: str = README_END) -> str:
    """``text`` with the part from ``begin`` to ``end`` (README markers) replaced by ``block``."""
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"README.md has no markers {begin!r} ... {end!r}")
    return text[:i] + block + text[j + len(end):]


if __name__ == "__main__":
    import argparse
    import json
    from pathlib import Path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", action="store_true", help="rewrite README.md's held-out summary at suite-test.md's seeds")
    ap.add_argument("--json", type=Path, default=None, help="the records (default bench/results/suite-test.json)")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    if args.readme:
        results = root / "bench" / "results"
        recs = list(json.loads((args.json or results / "suite-test.json").read_text()).values())
        readme = root / "README.md"
        block = readme_block(recs, 112, report_seeds((results / "suite-test.md").read_text()))
        readme.write_text(with_block(readme.read_text(), block))
        print(f"wrote {readme}'s held-out summary")

"""Tables of the transfer suite, and the leave-one-dataset-out choice of auto's rule.

Pure functions over the records bench/suite.py stores, so they are tested on made-up tables.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def by_dataset(records: Sequence[dict]) -> dict[str, dict[str, list[dict]]]:
    out: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        out.setdefault(r["dataset"], {}).setdefault(r["variant"], []).append(r)
    return out


def ranks(scores: dict[str, float]) -> dict[str, float]:
    """1 = best; tied scores share the mean of their places."""
    order = sorted(scores, key=lambda k: -scores[k])
    out: dict[str, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def fastai_final(runs: dict[str, list[dict]]) -> float | None:
    """fastai ``fine_tune``'s final val accuracy on a dataset (mean over seeds): the bar to reach."""
    fastai = runs.get("fastai")
    return statistics.fmean(r["curve"][-1][1] for r in fastai) if fastai else None


def time_to(curve: Sequence[Sequence[float]], target: float) -> float | None:
    """Seconds until a run's val accuracy first reaches ``target`` (None: never)."""
    return next((t for t, acc in curve if acc >= target), None)


def _rule_score(rule: tuple[str, str, float], datasets: Sequence[str], acc: dict[str, dict[str, float]],
                evidence: dict[str, float]) -> tuple[float, float]:
    """Mean accuracy of a threshold rule over ``datasets``, then its margin to the nearest evidence."""
    hi, lo, tau = rule
    mean = statistics.fmean(acc[d][hi if evidence[d] >= tau else lo] for d in datasets)
    return mean, min(abs(evidence[d] - tau) for d in datasets)


def loo_threshold_rule(acc: dict[str, dict[str, float]], evidence: dict[str, float],
                       strategies: Sequence[str]) -> list[dict]:
    """Choose "evidence >= tau -> A, else B" by leaving each dataset out: fit (A, B, tau) on the
    others (highest mean accuracy; ties: the larger margin to the nearest evidence value), then
    apply it to the held-out dataset. Returns one row per dataset with the choice and its
    distance from that dataset's best strategy."""
    rows = []
    for held in acc:
        rest = [d for d in acc if d != held]
        cuts = sorted({evidence[d] for d in rest})
        taus = [-1.0] + [(a + b) / 2 for a, b in itertools.pairwise(cuts)] + [2.0]

        rules = [(hi, lo, tau) for hi in strategies for lo in strategies for tau in taus]
        best = max(rules, key=lambda rule, rest=rest: _rule_score(rule, rest, acc, evidence))
        hi, lo, tau = best
        pick = hi if evidence[held] >= tau else lo
        top = max(strategies, key=lambda s: acc[held][s])
        rows.append({"dataset": held, "evidence": evidence[held], "rule": f"evidence >= {tau:.2f} -> {hi}, else {lo}",
                     "choice": pick, "acc": acc[held][pick], "best": top, "best_acc": acc[held][top],
                     "regret": acc[held][top] - acc[held][pick]})
    return rows


def summary_tables(records: Sequence[dict], img: int, evidence: dict[str, dict] | None = None) -> str:
    """``evidence``: dataset -> measured evidence (bench/evidence.py), next to what auto's runs
    recorded. A dataset with fewer runs than the most complete one is still running: it is
    named, and left out of every table (its best fixed strategy would be among the few done)."""
    everything = by_dataset(records)
    count = {d: sum(map(len, v.values())) for d, v in everything.items()}
    running = {d: n for d, n in count.items() if n < max(count.values(), default=0)}
    data = {d: v for d, v in everything.items() if d not in running}
    lines = [f"# Transfer suite ({img} px)", "",
             "**Superseded** by [suite-test.md](suite-test.md): the held-out test split, three paired seeds, 95 % "
             "intervals, fastai run as its docs teach. Every figure below is best val accuracy on the split that "
             "also made the choices, with fastai at `base_lr=1e-3` and no `aug_transforms`: the record of the "
             "suite that set auto's thresholds, kept for that.", "",
             "Written by `bench/suite.py` from `bench/results/suite.json`. Best val accuracy is the mean ± std over "
             "seeds; wall time is the whole process (start-up, data, probe); *to fastai* is the time until the "
             "run first reaches fastai `fine_tune`'s final accuracy on that dataset.", "",
             f"{sum(count[d] for d in data)} runs recorded, over {len(data)} datasets ({', '.join(sorted(data))}); a dataset's "
             "row means cover the seeds recorded for it."
             + (" Still running, left out: " + ", ".join(f"{d} ({n} runs)" for d, n in sorted(running.items())) + "."
                if running else ""), ""]
    means: dict[str, dict[str, float]] = {}
    for name, by_var in sorted(data.items()):
        target = fastai_final(by_var)
        r0 = next(iter(by_var.values()))[0]
        lines += [f"## {name}", "", f"{r0['epochs']} epochs at batch {r0['batch']} for every tool."
                  + (f" fastai's final accuracy: {target:.3f}." if target is not None else ""), "",
                  "| variant | best val acc | wall s | to fastai |", "|---|---:|---:|---:|"]
        means[name] = {}
        for v, rs in sorted(by_var.items(), key=lambda kv: -statistics.fmean(r["best"] for r in kv[1])):
            m, sd = _mean_std([r["best"] for r in rs])
            means[name][v] = m
            hits = [time_to(r["curve"], target) for r in rs] if target is not None else []
            reach = (f"{statistics.fmean(hits):.0f}" if hits and None not in hits else "never") if hits else "-"
            label = v if "chosen" not in rs[0] else _auto_label(rs[0])
            lines.append(f"| {label} | {m:.3f} ± {sd:.3f} | {statistics.fmean(r['wall'] for r in rs):.0f} | {reach} |")
        lines.append("")
    common = set.intersection(*(set(m) for m in means.values())) if means else set()
    rank = {d: ranks({v: means[d][v] for v in common}) for d in means}
    lines += ["## Over the suite", "", "| variant | mean rank | mean best val acc |", "|---|---:|---:|"]
    for v in sorted(common, key=lambda v: statistics.fmean(rank[d][v] for d in means)):
        lines.append(f"| {v} | {statistics.fmean(rank[d][v] for d in means):.2f} | "
                     f"{statistics.fmean(means[d][v] for d in means):.3f} |")
    lines += auto_checks(means, data, evidence or {})
    return "\n".join(lines) + "\n"


FIXED_EXCLUDED = ("auto", "auto+no-race", "auto+race-2.5", "plain", "fastai", "fastai-lrfind")
EVIDENCE = {"bn_shift": "the BatchNorm shift", "skill": "the probe's skill", "knn_acc": "10-NN accuracy",
            "hscore": "the H-score",
            "depth_gain": "the depth gain (the earlier depth's probe skill minus the last's; bench/evidence.py)"}


def _auto_label(r: dict) -> str:
    shift = f"shift {r['bn_shift']:.2f}, " if r.get("bn_shift") is not None else ""
    return f"auto → {r['chosen'].removeprefix('auto:')} ({shift}skill {r['skill']:.2f}, probe {r['probe_acc']:.3f})"


def _fmt(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _verdict(d: str, m: dict[str, float], gap: float | None, probe: float | None,
             runs: dict[str, list[dict]]) -> dict:
    """Issue 11's per-dataset checks: within a point of the best fixed strategy, at or above
    fastai and reaching fastai's final accuracy within fastai's wall time, at or above the probe."""
    target, in_time = fastai_final(runs), None
    if target is not None:
        hits = [time_to(r["curve"], target) for r in runs["auto"]]
        in_time = None not in hits and statistics.fmean(hits) <= statistics.fmean(r["wall"] for r in runs["fastai"])
    return {"dataset": d, "near_best": gap is not None and gap >= -0.01,
            "over_fastai": None if "fastai" not in m else m["auto"] >= m["fastai"] and bool(in_time),
            "over_probe": None if probe is None else m["auto"] >= probe}


def _tally(verdicts: list[dict], means: dict[str, dict[str, float]]) -> list[str]:
    def line(key: str, what: str) -> str:
        judged = [v for v in verdicts if v[key] is not None]
        misses = [v["dataset"] for v in judged if not v[key]]
        return f"- {what}: {len(judged) - len(misses)} of {len(judged)}" + (f" (not: {', '.join(misses)})" if misses else "")

    out = [line("near_best", "auto within 1 point of the best fixed strategy"),
           line("over_fastai", "auto at or above fastai, reaching fastai's final accuracy within fastai's wall time"),
           line("over_probe", "auto at or above its own probe")]
    common = [d for d in means if "auto" in means[d]]
    fixed = set.intersection(*({v for v in means[d] if v not in FIXED_EXCLUDED} for d in common)) if common else set()
    if fixed:
        top = max(fixed, key=lambda v: statistics.fmean(means[d][v] for d in common))
        out.append(f"- mean over these datasets: auto {statistics.fmean(means[d]['auto'] for d in common):.3f}, "
                   f"the best fixed strategy ({top}) {statistics.fmean(means[d][top] for d in common):.3f}")
    return out


def auto_checks(means: dict[str, dict[str, float]], data: dict[str, dict[str, list[dict]]],
                evidence: dict[str, dict]) -> list[str]:
    """auto against the best fixed strategy, fastai and its own probe, per dataset; then the
    rule auto would use if chosen by leaving each dataset out."""
    rows, fixed_acc, verdicts = [], {}, []
    for d, m in sorted(means.items()):
        if "auto" not in m:
            continue
        fixed = {v: a for v, a in m.items() if v not in FIXED_EXCLUDED}
        best = max(fixed, key=fixed.get) if fixed else None
        auto = data[d]["auto"][0]
        fixed_acc[d] = fixed
        probe = statistics.fmean(r["probe_acc"] for r in data[d]["auto"] if "probe_acc" in r) \
            if any("probe_acc" in r for r in data[d]["auto"]) else None
        gap = m["auto"] - fixed[best] if best else None
        verdicts.append(_verdict(d, m, gap, probe, data[d]))
        rows.append(f"| {d} | {auto.get('chosen', 'auto')} | {m['auto']:.3f} | "
                    f"{best or '-'} {_fmt(fixed.get(best), '.3f')} | {_fmt(gap, '+.3f')} | "
                    f"{_fmt(m.get('fastai'), '.3f')} | {_fmt(probe, '.3f')} |")
    if not rows:
        return []
    out = ["", "## auto against the best fixed strategy, fastai and its own probe", "",
           "| dataset | auto chose | auto | best fixed | auto − best fixed | fastai | probe |",
           "|---|---|---:|---:|---:|---:|---:|", *rows, "", *_tally(verdicts, means)]
    strategies = sorted(set.intersection(*(set(f) for f in fixed_acc.values())))
    for key, label in EVIDENCE.items():
        values = {d: data[d]["auto"][0].get(key, evidence.get(d, {}).get(key)) for d in fixed_acc}
        if len(fixed_acc) < 3 or not strategies or None in values.values():
            continue
        loo = loo_threshold_rule(fixed_acc, values, strategies)
        out += ["", f"### A threshold on {label}, chosen leaving each dataset out", "",
                "For each dataset, the rule `evidence >= tau -> A, else B` that scores best on the *other* datasets, "
                "applied to it:", "", "| dataset | evidence | rule (from the others) | choice | best | regret |",
                "|---|---:|---|---|---|---:|"]
        out += [f"| {r['dataset']} | {r['evidence']:.2f} | {r['rule']} | {r['choice']} {r['acc']:.3f} | "
                f"{r['best']} {r['best_acc']:.3f} | {r['regret']:.3f} |" for r in loo]
        out.append(f"\nMean regret of the left-out choice ({label}): "
                   f"{statistics.fmean(r['regret'] for r in loo):.3f}.")
    return out


RACE_CANDIDATES = ("discriminative+bn-eval", "full", "lp-ft+bn-eval")  # race.CANDIDATES as suite variants


def rung_regret(records: Sequence[dict], epochs: int, img: int = 112,
                candidates: Sequence[str] = RACE_CANDIDATES, on_test: bool = False) -> tuple[int, int, float, float]:
    """How well a race of ``epochs`` epochs would have chosen, per dataset and seed: the
    candidate leading on val after that many epochs (ties: the earlier in ``candidates``)
    against the one with the best val accuracy at the end (``on_test``: the best test accuracy,
    for the held-out suite, where val chose the epoch). Returns (times the leader was the final
    best, races, mean and max shortfall of the leader's final accuracy)."""
    runs = {(r["dataset"], r["seed"], r["variant"]): r for r in records if r["img"] == img}
    keys = sorted({(d, s) for d, s, _ in runs if all((d, s, c) in runs for c in candidates)})
    hits, gaps = 0, []
    for d, s in keys:
        curves = {c: [a for _, a in runs[d, s, c]["curve"]] for c in candidates}
        lead = max(candidates, key=lambda c: (curves[c][min(epochs, len(curves[c])) - 1], -candidates.index(c)))
        final = {c: runs[d, s, c]["test"] if on_test else max(curves[c]) for c in candidates}
        hits += final[lead] == max(final.values())
        gaps.append(max(final.values()) - final[lead])
    return hits, len(keys), statistics.fmean(gaps), max(gaps)

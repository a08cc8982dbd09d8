"""``layerwise compare``: every strategy on the same data, split, seed and budget; which wins.

Each run is an ordinary run folder under CMP/ (inspect, resume, evaluate or export it). A
finished run is skipped when compare runs again; an interrupted one resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path

from layerwise import rundir
from layerwise.checkpoint import atomic_write_text, read_jsonl, write_json
from layerwise.config import RunConfig
from layerwise.errors import LayerwiseError, UnknownNameError
from layerwise.rundir import CompareDir, RunDir
from layerwise.strategies import STRATEGIES

DEFAULT_STRATEGIES = ("head", "lp-ft", "gradual", "discriminative", "full")


def is_finished(run: Path) -> bool:
    return RunDir(run).report.is_file()


def run_all(base: RunConfig, strategies: Sequence[str], out: Path, *, repeats: int = 1,
            overwrite: bool = False) -> list[Path]:
    """Fit each strategy ``repeats`` times (seeds base.seed, base.seed + 1, ...). A run already
    in ``out`` counts only if its fingerprint (data files, settings) matches this call's."""
    from layerwise.race import fit

    twice = sorted({s for s in strategies if list(strategies).count(s) > 1})
    if not strategies or twice:
        raise LayerwiseError(f"compare needs one or more distinct strategies, got {list(strategies)}"
                             + (f" ({', '.join(twice)} twice; --repeats gives more seeds)" if twice else ""))
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise UnknownNameError("strategy", unknown[0], STRATEGIES)
    if repeats < 1:
        raise LayerwiseError(f"--repeats must be >= 1, got {repeats}")
    runs = []
    for strategy in strategies:
        for r in range(repeats):
            seed = base.seed + r
            run = CompareDir(out).run_for(strategy, seed, repeats)
            runs.append(run)
            cfg = dataclasses.replace(base, strategy=strategy, seed=seed, out=str(run))
            stale = rundir.holds_run(run) and rundir.fingerprint_mismatch(run, rundir.run_fingerprint(cfg))
            if stale and not overwrite:
                raise LayerwiseError(
                    f"compare: {run} was made with other inputs (differs in: {', '.join(stale)}); pass --overwrite "
                    "to redo such runs, or choose another --out")
            if not stale and is_finished(run):
                print(f"compare: {run} is finished with the same inputs, skipped", flush=True)
                continue
            resume = not stale and rundir.holds_run(run)
            what = "redoing (inputs changed)" if stale else "resuming" if resume else "running"
            print(f"compare: {what} {strategy} (seed {seed}) -> {run}", flush=True)
            with _run_log(run, quiet=base.quiet):
                fit(cfg, resume=resume, overwrite=bool(stale))
    return runs


@contextlib.contextmanager
def _run_log(run: Path, *, quiet: bool) -> Iterator[None]:
    """With --quiet, each run's own log (banner, plan, epochs) goes to RUN/train.log instead
    of the terminal, where compare prints one line per run."""
    if not quiet:
        yield
        return
    run.mkdir(parents=True, exist_ok=True)
    with open(RunDir(run).log, "a") as f, contextlib.redirect_stdout(f):
        yield


def run_row(run: Path) -> dict:
    """One run's summary, straight from its metrics.jsonl and plan.json."""
    rows = read_jsonl(RunDir(run).metrics)
    plan = json.loads(RunDir(run).plan.read_text())
    best = max(rows, key=lambda r: r["val_acc"])  # auto's probe row (epoch -1) counts: it may be the best
    trained = [r for r in rows if r["epoch"] >= 0]
    last = trained[-1]
    probe_file = RunDir(run).probe
    probe = json.loads(probe_file.read_text()) if probe_file.is_file() else None
    race_file = RunDir(run).race
    race = json.loads(race_file.read_text()) if race_file.is_file() else {}
    return {
        "run": str(run),
        "strategy": plan["strategy"],
        "best_val_acc": best["val_acc"],
        "best_epoch": best["epoch"],
        "final_val_acc": last["val_acc"],
        "gap": last["train_acc"] - last["val_acc"],
        # From the start of fit: data scan, model set-up and auto's probe (and race) count too.
        "wall_seconds": race.get("wall_seconds", rows[-1]["elapsed_seconds"]),
        "probe": probe,
        "images_per_second": statistics.fmean(r["images_per_second"] for r in trained),
        "trainable_params": [r["trainable_params"] for r in trained],
        "val_acc": [r["val_acc"] for r in trained],
        "elapsed": [r.get("elapsed_seconds", 0.0) for r in trained],
    }


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def best_acc_text(row: dict) -> str:
    """A strategy's best val accuracy, with ``± std`` over its repeats when it has several."""
    sd = f" ± {row['best_val_acc_std']:.3f}" if row["repeats"] > 1 else ""
    return f"{row['best_val_acc']:.3f}{sd}"


def summarise(rows: Sequence[dict], strategies: Sequence[str], n_val: int) -> dict:
    """Per-strategy means (± std over repeats) of :func:`run_row` rows, and a
    recommendation that says when the winner's margin is within noise."""
    by: dict[str, list[dict]] = {s: [] for s in strategies}
    for row in rows:
        by[CompareDir.strategy_of(row["run"])].append(row)
    table = []
    for s, rows in by.items():
        acc, acc_sd = _mean_std([r["best_val_acc"] for r in rows])
        table.append({
            "strategy": s, "chosen": rows[0]["strategy"], "repeats": len(rows), "best_val_acc": acc,
            "best_val_acc_std": acc_sd, "best_epoch": rows[0]["best_epoch"],
            "final_val_acc": statistics.fmean(r["final_val_acc"] for r in rows),
            "gap": statistics.fmean(r["gap"] for r in rows),
            "wall_seconds": statistics.fmean(r["wall_seconds"] for r in rows),
            "images_per_second": statistics.fmean(r["images_per_second"] for r in rows),
            "trainable_params": rows[0]["trainable_params"], "runs": [r["run"] for r in rows],
            "evidence": rows[0].get("probe") and rows[0]["probe"]["reason"],
        })
    return {"strategies": table, "recommendation": recommend(table, n_val)}


def noise(row: dict, n_val: int) -> float:
    """Measured spread over repeats, or the binomial standard error of one accuracy."""
    if row["repeats"] > 1:
        return row["best_val_acc_std"]
    p = row["best_val_acc"]
    return math.sqrt(max(p * (1 - p), 1e-9) / max(1, n_val))


def recommend(table: Sequence[dict], n_val: int) -> dict:
    ranked = sorted(table, key=lambda r: r["best_val_acc"], reverse=True)
    best = ranked[0]
    if len(ranked) == 1:
        return {"strategy": best["strategy"], "reason": "only one strategy was compared"}
    second = ranked[1]
    margin = best["best_val_acc"] - second["best_val_acc"]
    tol = max(noise(best, n_val), noise(second, n_val))
    how = "std over repeats" if best["repeats"] > 1 else f"binomial s.e. over {n_val} val images"
    if margin <= tol:
        cheap = min((best, second), key=lambda r: r["wall_seconds"])
        return {"strategy": cheap["strategy"], "within_noise": True, "margin": margin, "noise": tol,
                "reason": f"{best['strategy']} leads {second['strategy']} by {margin:.3f}, within noise "
                          f"({tol:.3f}, {how}); {cheap['strategy']} is the cheaper of the two"}
    return {"strategy": best["strategy"], "within_noise": False, "margin": margin, "noise": tol,
            "reason": f"{best['strategy']} beats {second['strategy']} by {margin:.3f} (noise {tol:.3f}, {how})"}


def write_summary(out: Path, summary: dict, rows: Sequence[dict]) -> None:
    from layerwise.report import plot_compare

    write_json(CompareDir(out).summary_json, summary)
    pngs = plot_compare(rows, out)
    rec = summary["recommendation"]
    lines = ["# layerwise compare", "", f"**Recommendation: {rec['strategy']}** — {rec['reason']}.", "",
             "| strategy | best val acc | final val acc | train−val gap | wall s | img/s | trainable params (per epoch) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in summary["strategies"]:
        name = r["strategy"] if r["chosen"] == r["strategy"] else f"{r['strategy']} ({r['chosen']})"
        params = " → ".join(f"{p / 1e6:.2f}M" for p in r["trainable_params"])
        lines.append(f"| {name} | {best_acc_text(r)} (epoch {r['best_epoch']}) | {r['final_val_acc']:.3f} | "
                     f"{r['gap']:+.3f} | {r['wall_seconds']:.0f} | {r['images_per_second']:.0f} | {params} |")
    lines += [f"\n{r['strategy']} chose {r['chosen']}: {r['evidence']}." for r in summary["strategies"] if r["evidence"]]
    if "soup" in summary:
        s = summary["soup"]
        lines.append(f"\nGreedy soup (`soup/`, a run folder): {len(s['members'])} of {len(s['tried'])} run(s) averaged, "
                     f"val acc {s['val_acc']:.3f} (fp32; the best single run first, each next one kept only if the "
                     "average scored at least as well)" + (f"; test acc {s['test_acc']:.3f}" if "test_acc" in s else "") + ".")
    lines += ["", *(f"![{p}]({p})" for p in pngs)]
    atomic_write_text(CompareDir(out).summary_md, "\n".join(lines) + "\n")
    atomic_write_text(CompareDir(out).report_html, html_report(summary, [out / p for p in pngs]))


def html_report(summary: dict, pngs: Sequence[Path]) -> str:
    """One self-contained page: the table and the plots inlined as base64 PNG, no network."""
    import base64
    import html

    rec = summary["recommendation"]
    head = ("strategy", "best val acc", "final val acc", "train−val gap", "wall s", "img/s")
    rows = []
    for r in summary["strategies"]:
        name = r["strategy"] if r["chosen"] == r["strategy"] else f"{r['strategy']} ({r['chosen']})"
        cells = (name, best_acc_text(r), f"{r['final_val_acc']:.3f}", f"{r['gap']:+.3f}",
                 f"{r['wall_seconds']:.0f}", f"{r['images_per_second']:.0f}")
        cls = ' class="pick"' if r["strategy"] == rec["strategy"] else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    evidence = "".join(f'<p class="evidence">{html.escape(r["strategy"])} chose {html.escape(r["chosen"])}: '
                       f'{html.escape(r["evidence"])}.</p>' for r in summary["strategies"] if r.get("evidence"))
    imgs = "".join(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
                   f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
                   for p in pngs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>layerwise compare</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
tr.pick{{background:#e6f4ea;font-weight:600}}img{{max-width:100%}}figure{{margin:1.5em 0}}</style></head>
<body><h1>layerwise compare</h1>
<p id="recommendation"><strong>Recommendation: {html.escape(rec['strategy'])}</strong> — {html.escape(rec['reason'])}.</p>
<table id="summary"><thead><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr></thead><tbody>{''.join(rows)}</tbody></table>
{evidence}
{imgs}
<script>window.addEventListener("load", () => {{
  document.body.dataset.imagesLoaded = [...document.images].every(i => i.complete && i.naturalWidth > 0);
}});</script>
</body></html>
"""


def equal_budget(base: RunConfig) -> RunConfig:
    """One budget for every strategy: the one auto would choose for this data (an explicit
    --epochs or --batch-size wins), so no strategy wins by training longer."""
    from layerwise.budget import resolve_budget
    from layerwise.data import load_splits

    n_train = len(load_splits(base.data, val_split=base.val_split, seed=base.seed).train)
    chosen, why = resolve_budget(dataclasses.replace(base, strategy="auto"), n_train)
    if why:
        print(f"compare: every strategy gets auto's {why}", flush=True)
    return dataclasses.replace(base, epochs=chosen.epochs, batch_size=chosen.batch_size, patience=chosen.patience)


def compare(base: RunConfig, strategies: Sequence[str], out: Path, *, repeats: int = 1,
            overwrite: bool = False, soup: bool = False) -> dict:
    """Run (or resume, or skip) every strategy, then write summary.json/.md and plots;
    ``soup``: also a greedy soup of the runs (soup.py) in CMP/soup/."""
    runs = run_all(equal_budget(base), strategies, out, repeats=repeats, overwrite=overwrite)
    n_val = rundir.read_model_info(runs[0])["val_images"]
    rows = [run_row(r) for r in runs]  # each run's metrics read once, for table and plots
    summary = summarise(rows, strategies, n_val)
    if soup:
        from layerwise.soup import cook

        summary["soup"] = cook(runs, [r["best_val_acc"] for r in rows], base, CompareDir(out).soup)
    write_summary(out, summary, rows)
    return summary

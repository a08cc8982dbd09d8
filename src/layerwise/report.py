"""Plots and ``report.md`` for a run: curves, per-group LRs, unfreezing timeline, confusion."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from layerwise import rundir  # noqa: E402
from layerwise.checkpoint import atomic_write_bytes, atomic_write_text, read_jsonl  # noqa: E402
from layerwise.evaluation import EvalResult  # noqa: E402
from layerwise.lrfind import LRFind  # noqa: E402
from layerwise.resolution import describe as describe_sizes  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> str:
    """Render to memory, then write atomically: a full disk leaves no 0-byte PNG behind."""
    import io

    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path.name


def plot_curves(rows: Sequence[dict], path: Path) -> str:
    """Loss and accuracy per epoch; auto's probe row (epoch -1) has validation values only."""
    epochs = [r["epoch"] for r in rows]
    trained = [r for r in rows if r["train_loss"] is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot([r["epoch"] for r in trained], [r["train_loss"] for r in trained], "o-", label="train")
    a.plot(epochs, [r["val_loss"] for r in rows], "o-", label="val")
    a.set(title="loss", xlabel="epoch")
    for ax in (a, b):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    b.plot([r["epoch"] for r in trained], [r["train_acc"] for r in trained], "o-", label="train")
    b.plot(epochs, [r["val_acc"] for r in rows], "o-", label="val")
    b.set(title="accuracy", xlabel="epoch")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_lrs(steps: Sequence[dict], path: Path) -> str:
    """LR of every group over steps; a frozen group has no LR, so its line has a gap."""
    fig, ax = plt.subplots(figsize=(10, 4))
    groups = list(steps[0]["lr"]) if steps else []
    x = [s["step"] for s in steps]
    for g in groups:
        ax.plot(x, [math.nan if s["lr"][g] is None else s["lr"][g] for s in steps], label=g)
    ax.set(title="learning rate per group (gaps: frozen)", xlabel="step", ylabel="lr", yscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=max(1, len(groups) // 8), loc="lower left")
    return save_figure(fig, path)


def plot_trainable(plan: dict, path: Path) -> str:
    """The unfreezing timeline: trainable parameters per epoch, and which groups."""
    eps = plan["epochs"]
    names = [g["name"] for g in plan["groups"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 1.3]})
    xs = [e["epoch"] for e in eps] + [len(eps)]  # the last epoch runs to its end
    ys = [e["trainable_params"] / 1e6 for e in eps]
    a.step(xs, ys + ys[-1:], where="post")
    a.set(title="trainable parameters (M)", xlabel="epoch", ylim=(0, plan["total_params"] / 1e6 * 1.05))
    a.grid(alpha=0.3)
    grid = [[1.0 if n in e["trainable_groups"] else 0.0 for e in eps] for n in names]
    b.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1.3, interpolation="nearest")
    b.set_yticks(range(len(names)), names, fontsize=7)
    b.set_xticks(range(len(eps)), [str(e["epoch"]) for e in eps], fontsize=7)
    b.set(title="trainable groups (green)", xlabel="epoch")
    return save_figure(fig, path)


def plot_confusion(cm: list[list[int]], classes: Sequence[str], path: Path) -> str:
    n = len(classes)
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.5 * n), min(11, 1.6 + 0.45 * n)))
    ax.imshow(cm, cmap="Blues")
    ticks = range(n)
    ax.set_xticks(ticks, classes, rotation=90 if n > 8 else 0, fontsize=7)
    ax.set_yticks(ticks, classes, fontsize=7)
    if n <= 20:
        top = max(max(r) for r in cm) or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, cm[i][j], ha="center", va="center", fontsize=7,
                        color="white" if cm[i][j] > top / 2 else "black")
    ax.set(title="confusion matrix (best weights, val)", xlabel="predicted", ylabel="true")
    return save_figure(fig, path)


def write_run_report(run: Path, classes: Sequence[str], best: EvalResult, *, test: dict | None = None) -> Path:
    """Write the PNGs and ``report.md`` of a finished run."""
    files = rundir.RunDir(run)
    rows = read_jsonl(files.metrics)
    steps = read_jsonl(files.steps)
    plan = json.loads(files.plan.read_text())
    cm = best.confusion(len(classes)).tolist()
    per_class = best.per_class_acc(len(classes))
    curves, lr, trainable, confusion = (run / name for name in rundir.PLOTS)
    pngs = [plot_curves(rows, curves), plot_lrs(steps, lr), plot_trainable(plan, trainable),
            plot_confusion(cm, classes, confusion)]
    best_row = max(rows, key=lambda r: r["val_acc"])
    sizes = describe_sizes(tuple(e["train_size"] for e in plan["epochs"] if e.get("train_size")),
                           plan["training"]["img_size"])
    lines = [
        f"# layerwise run: {plan['model']} · {plan['strategy']}",
        "",
        f"Best val accuracy **{best_row['val_acc']:.4f}** at epoch {best_row['epoch']} "
        f"(final {rows[-1]['val_acc']:.4f}). {plan['reason']}".rstrip(),
        "",
        *([f"Test accuracy **{test['test_acc']:.4f}** on {test['images']} images of DATA/test, with the best "
           "weights" + _tta_note(test) + "; the test split was never used for a choice (val chose the strategy "
           "and the epoch).", ""] if test else []),
        f"Images: {sizes}.",
        "",
        "| epoch | train px | train loss | train acc | val loss | val acc | trainable params | s | img/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {'probe' if r['epoch'] < 0 else r['epoch']} | {_cell(r.get('train_size'), 'd')} | "
              f"{_cell(r['train_loss'], '.4f')} | {_cell(r['train_acc'], '.4f')} | {r['val_loss']:.4f} | "
              f"{r['val_acc']:.4f} | {r['trainable_params']:,} | {r['epoch_seconds']:.1f} | "
              f"{_cell(r['images_per_second'], '.0f')} |" for r in rows]
    lines += ["", "## Curves", "", f"![curves]({pngs[0]})", "", "## Learning rate per group", "",
              f"![lr]({pngs[1]})", "", "## Unfreezing timeline", "", f"![trainable]({pngs[2]})", "",
              "## Confusion matrix and per-class accuracy", "", f"![confusion]({pngs[3]})", "",
              "| class | accuracy |", "|---|---:|"]
    lines += [f"| {c} | {a:.4f} |" for c, a in zip(classes, per_class)]
    out = rundir.RunDir(run).report
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def _cell(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def plot_compare(rows: Sequence[dict], out: Path) -> list[str]:
    """Val accuracy per epoch, one colour per strategy (thin: each seed, bold: their mean),
    and training time against best accuracy."""
    import numpy as np

    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(rundir.CompareDir.strategy_of(r["run"]), []).append(r)
    colours = matplotlib.colormaps["tab10"] if len(by) <= 10 else matplotlib.colormaps["tab20"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    fig2, ax2 = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, runs) in enumerate(by.items()):
        c = colours(i)
        n = min(len(r["val_acc"]) for r in runs)
        for r in runs:
            ax.plot(range(len(r["val_acc"])), r["val_acc"], color=c, lw=0.8, alpha=0.45)
            ax2.scatter(r["wall_seconds"], r["best_val_acc"], color=c, s=30)
        mean = np.mean([r["val_acc"][:n] for r in runs], axis=0)
        ax.plot(range(n), mean, "o-", color=c, lw=2, label=name)
        ax2.annotate(name, (runs[0]["wall_seconds"], runs[0]["best_val_acc"]), fontsize=8,
                     xytext=(4, 4), textcoords="offset points")
    ax.set(title="validation accuracy per epoch (bold: mean over seeds)", xlabel="epoch", ylabel="val acc")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.set(title="time vs best accuracy", xlabel="training seconds", ylabel="best val acc")
    ax2.grid(alpha=0.3)
    val_acc_png, time_acc_png = rundir.CompareDir(out).plots
    return [save_figure(fig, val_acc_png), save_figure(fig2, time_acc_png)]


def plot_lr_find(res: LRFind, path: Path) -> Path:
    """The LR range test's smoothed loss against the base LR, with the suggestion marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(res.lrs, res.losses)
    ax.axvline(res.suggestion, color="tab:red", ls="--", label=f"suggested {res.suggestion:.2e}")
    ax.set(xscale="log", xlabel="base LR (head); other groups keep their multipliers", ylabel="smoothed loss",
           title="LR range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, path)
    return path


def _tta_note(test: dict) -> str:
    """What the test score's TTA views were, and the score without them."""
    plain = test.get("without_views")
    return (f" and TTA views {', '.join(test['views'])} ({plain['test_acc']:.4f} without them)"
            if plain and test.get("views") else "")

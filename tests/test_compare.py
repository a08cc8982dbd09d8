from __future__ import annotations

import json

import pytest

from conftest import make_image_folder
from layerwise.checkpoint import read_jsonl
from layerwise.cli import main
from layerwise.compare import recommend

TINY = ["--model", "timm/test_efficientnet", "--weights", "none", "--img-size", "32", "--batch-size", "8",
        "--workers", "0", "--quiet", "--epochs", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=8)


def test_compare_runs_skips_finished_and_summarises(data, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(data), *TINY, "--strategies", "head,full", "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "recommendation:" in first
    summary = json.loads((out / "summary.json").read_text())
    assert [r["strategy"] for r in summary["strategies"]] == ["head", "full"]
    for row in summary["strategies"]:
        metrics = read_jsonl(out / row["strategy"] / "metrics.jsonl")
        assert row["best_val_acc"] == max(m["val_acc"] for m in metrics)
        assert row["final_val_acc"] == metrics[-1]["val_acc"]
        assert row["trainable_params"] == [m["trainable_params"] for m in metrics]
    assert summary["recommendation"]["strategy"] in ("head", "full")
    for f in ("summary.md", "compare_val_acc.png", "compare_time_acc.png"):
        assert (out / f).is_file()
    stamp = (out / "head" / "metrics.jsonl").stat().st_mtime_ns
    assert main(["compare", str(data), *TINY, "--strategies", "head,full", "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert again.count("is finished with the same inputs, skipped") == 2
    assert (out / "head" / "metrics.jsonl").stat().st_mtime_ns == stamp


def test_compare_resumes_an_interrupted_run(data, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["fit", str(data), *TINY, "--strategy", "head", "--out", str(out / "head")]) == 0
    (out / "head" / "report.md").unlink()  # as if it had been killed before finishing
    assert main(["compare", str(data), *TINY, "--strategies", "head", "--out", str(out)]) == 0
    assert "resuming head" in capsys.readouterr().out


def test_repeats_give_mean_and_std(data, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(data), *TINY, "--strategies", "head", "--repeats", "2", "--out", str(out)]) == 0
    row = json.loads((out / "summary.json").read_text())["strategies"][0]
    assert row["repeats"] == 2 and len(row["runs"]) == 2
    assert (out / "head-seed0").is_dir() and (out / "head-seed1").is_dir()
    # the mean and the sample std of the two runs' best val accuracies, recomputed from their logs
    best = [max(r["val_acc"] for r in read_jsonl(out / f"head-seed{s}" / "metrics.jsonl")) for s in (0, 1)]
    assert row["best_val_acc"] == pytest.approx((best[0] + best[1]) / 2)
    assert row["best_val_acc_std"] == pytest.approx(abs(best[0] - best[1]) / 2 ** 0.5)
    assert f"{row['best_val_acc']:.3f} ± {row['best_val_acc_std']:.3f}" in (out / "summary.md").read_text()


def test_summarise_means_and_stds_on_known_rows():
    from layerwise.compare import summarise

    def row(run, acc):
        return {"run": run, "strategy": "head", "best_val_acc": acc, "best_epoch": 0, "final_val_acc": acc,
                "gap": 0.0, "wall_seconds": 1.0, "images_per_second": 10.0, "trainable_params": [1]}

    s = summarise([row("c/head-seed0", 0.5), row("c/head-seed1", 0.7), row("c/head-seed2", 0.9)], ["head"], 100)
    (r,) = s["strategies"]
    assert r["repeats"] == 3 and r["best_val_acc"] == pytest.approx(0.7) and r["best_val_acc_std"] == pytest.approx(0.2)


def test_auto_row_shows_its_choice_evidence_and_probe_time(data, tmp_path):
    out = tmp_path / "cmp"
    # 24 images: a race costs more there than the 1.5x bound allows; --race-cost lets it run
    assert main(["compare", str(data), *TINY, "--strategies", "auto", "--race-cost", "10", "--out", str(out)]) == 0
    row = json.loads((out / "summary.json").read_text())["strategies"][0]
    probe = json.loads((out / "auto" / "probe.json").read_text())
    metrics = read_jsonl(out / "auto" / "metrics.jsonl")
    race = json.loads((out / "auto" / "race.json").read_text())
    assert row["chosen"] == probe["strategy"] and row["evidence"] == probe["reason"]
    assert "won auto's race" in probe["reason"] and probe["race"]["winner"] == race["winner"]
    # From fit's start: set-up, the probe and every candidate's rung count, not just the winner's epochs.
    assert row["wall_seconds"] == race["wall_seconds"]
    rungs = sum(r["epoch_seconds"] for name, r in race["rungs"].items() if name != race["winner"])
    assert row["wall_seconds"] > sum(m["epoch_seconds"] for m in metrics) + rungs + probe["seconds"]
    assert f"auto chose {probe['strategy']}: {probe['reason']}" in (out / "summary.md").read_text()
    assert "linear-probe skill" in (out / "report.html").read_text()


def test_repeats_differ_by_seed(data, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(data), *TINY, "--strategies", "full", "--repeats", "2", "--out", str(out)]) == 0
    accs = [read_jsonl(out / f"full-seed{s}" / "metrics.jsonl")[0]["train_loss"] for s in (0, 1)]
    assert accs[0] != accs[1]  # two seeds, two runs: a std over repeats measures something


@pytest.mark.parametrize("change", [["--epochs", "3"], ["--lr", "3e-3"], "data"])
def test_compare_refuses_runs_made_with_other_inputs(data, tmp_path, capsys, change):
    out = tmp_path / "cmp"
    assert main(["compare", str(data), *TINY, "--strategies", "head", "--out", str(out)]) == 0
    capsys.readouterr()
    args = [str(data), *TINY, "--strategies", "head", "--out", str(out)]
    if change == "data":
        other = make_image_folder(tmp_path / "other", classes=3, per_class=9)  # same classes, other files
        args[0] = str(other)
        what = "data files"
    else:
        args += change
        what = change[0][2:]
    assert main(["compare", *args]) == 2
    assert f"differs in: {what}" in capsys.readouterr().err
    assert main(["compare", *args, "--overwrite"]) == 0
    assert "redoing (inputs changed) head" in capsys.readouterr().out
    assert main(["compare", *args]) == 0  # now it matches: skipped
    assert "finished with the same inputs, skipped" in capsys.readouterr().out


def test_compare_quiet_keeps_each_runs_log_out_of_the_terminal(data, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(data), *TINY, "--strategies", "head,full", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "trainable" not in text and "epoch 1/2" not in text  # no plans, no epoch lines
    assert "epoch 1/2" in (out / "full" / "train.log").read_text()


def _row(name, acc, wall, repeats=1, sd=0.0):
    return {"strategy": name, "best_val_acc": acc, "wall_seconds": wall, "repeats": repeats, "best_val_acc_std": sd}


def test_recommendation_prefers_cheaper_within_noise():
    rec = recommend([_row("full", 0.80, 100), _row("head", 0.79, 10)], n_val=500)
    assert rec["within_noise"] and rec["strategy"] == "head"
    rec = recommend([_row("full", 0.90, 100), _row("head", 0.70, 10)], n_val=500)
    assert not rec["within_noise"] and rec["strategy"] == "full"
    rec = recommend([_row("full", 0.80, 100, 3, 0.001), _row("head", 0.79, 10, 3, 0.001)], n_val=500)
    assert rec["strategy"] == "full"  # measured spread is small: the 1-point lead counts


def test_compare_needs_out(data, capsys):
    assert main(["compare", str(data), *TINY, "--strategies", "head"]) == 2
    assert "--out" in capsys.readouterr().err


CHROMIUM = next((p for p in map(__import__("shutil").which, ("chromium", "chromium-browser")) if p), None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it with apt)")
def test_html_report_renders_in_headless_chromium(data, tmp_path):
    import subprocess

    out = tmp_path / "cmp"
    assert main(["compare", str(data), *TINY, "--strategies", "head,full", "--out", str(out)]) == 0
    page = (out / "report.html").as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000"]
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert 'data-images-loaded="true"' in dom  # both inlined plots decoded
    assert dom.count("<tr") == 3 and "Recommendation:" in dom  # header + one row per strategy
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,1400", page], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_a_time_budget_stops_every_strategy_after_the_epoch_that_spends_it(data, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(data), *TINY, "--strategies", "head,full", "--epochs", "30", "--budget", "time:0.001",
                 "--out", str(out)]) == 0
    for s in ("head", "full"):
        rows = read_jsonl(out / s / "metrics.jsonl")
        assert [r["epoch"] for r in rows if r["epoch"] >= 0] == [0]  # the first epoch spends it: one epoch of 30

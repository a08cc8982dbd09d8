from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY, make_image_folder
from layerwise import trainer
from layerwise.checkpoint import read_jsonl
from layerwise.cli import main
from layerwise.config import RunConfig
from layerwise.engine import fit


def last_weights(run):
    from layerwise.checkpoint import load_state

    return load_state(run / "last" / "state.pt")["model"]


def _fit(*args) -> int:
    return main(["fit", *args])


def test_tiny_fit_writes_the_contract(data, tmp_path):
    run = tmp_path / "run"
    assert _fit(str(data), *TINY, "--strategy", "gradual", "--epochs", "3", "--out", str(run)) == 0
    for name in ("config.yaml", "plan.json", "metrics.jsonl", "best.safetensors", "report.md", "model.json",
                 "last/state.pt", "curves.png", "lr.png", "trainable.png", "confusion.png"):
        assert (run / name).is_file(), name
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "trainable_params",
                "epoch_seconds", "images_per_second"} <= set(r)
        assert 0 <= r["val_acc"] <= 1 and r["images_per_second"] > 0
    plan = json.loads((run / "plan.json").read_text())
    assert [r["trainable_params"] for r in rows] == [e["trainable_params"] for e in plan["epochs"]]
    assert set(rows[0]["lr"]) == {g["name"] for g in plan["groups"]}
    assert rows[0]["trainable_params"] < rows[-1]["trainable_params"]
    assert "![curves](curves.png)" in (run / "report.md").read_text()


def test_frozen_groups_stay_untouched_and_unfrozen_ones_train(data, tmp_path):
    """Gradual with every=1: stem never unfreezes in 2 epochs; the head trains throughout."""
    run = tmp_path / "run"
    cfg = RunConfig(data=str(data), model="timm/test_efficientnet", weights="none", img_size=32, batch_size=8,
                    workers=0, quiet=True, strategy="gradual", every=1, epochs=2, out=str(run), augment="none")
    from layerwise.engine import prepare

    torch.manual_seed(0)
    p = prepare(cfg)
    initial = {k: v.clone() for k, v in p.model.loaded.model.state_dict().items()}
    fit(cfg)
    final = last_weights(run)
    assert torch.equal(final["conv_stem.weight"], initial["conv_stem.weight"])
    assert torch.equal(final["bn1.running_mean"], initial["bn1.running_mean"])  # frozen BN stats kept
    assert not torch.equal(final["classifier.weight"], initial["classifier.weight"])


def test_resume_equals_uninterrupted_run(data, tmp_path, monkeypatch):
    from layerwise import engine

    a, b = tmp_path / "a", tmp_path / "b"
    common = [str(data), *TINY, "--strategy", "lp-ft", "--probe-epochs", "1", "--seed", "3", "--epochs", "3"]
    assert _fit(*common, "--out", str(a)) == 0
    real = engine.Trainer.train_epoch

    def interrupted_in_epoch_2(self, epoch, stop, batches=None, progress=None, **kw):
        if epoch == 2:
            stop.flag = True  # as if SIGINT arrived during epoch 2: it stops after one step
        return real(self, epoch, stop, batches, progress, **kw)

    monkeypatch.setattr(engine.Trainer, "train_epoch", interrupted_in_epoch_2)
    assert _fit(*common, "--out", str(b)) == 130
    assert len(read_jsonl(b / "metrics.jsonl")) == 2
    monkeypatch.setattr(engine.Trainer, "train_epoch", real)
    assert _fit("--resume", str(b), "--quiet") == 0
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["epoch"] for r in rb] == [0, 1, 2]
    for x, y in zip(ra, rb):
        for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-7), (k, x["epoch"])
    wa, wb = last_weights(a), last_weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


def test_config_yaml_reruns_to_the_same_plan(data, tmp_path):
    run = tmp_path / "run"
    assert _fit(str(data), *TINY, "--strategy", "discriminative", "--decay", "3", "--epochs", "1",
                "--out", str(run)) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["strategy"] == "discriminative" and cfg["decay"] == 3 and cfg["img_size"] == 32
    again = tmp_path / "again"
    assert _fit("--config", str(run / "config.yaml"), "--out", str(again)) == 0
    assert json.loads((run / "plan.json").read_text()) == json.loads((again / "plan.json").read_text())


def test_recipe_run_uses_mlp_head_and_label_smoothing(data, tmp_path):
    run = tmp_path / "run"
    assert _fit(str(data), *TINY, "--strategy", "recipe", "--epochs", "1", "--out", str(run)) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["head"], cfg["scheduler"], cfg["label_smoothing"], cfg["t0"]) == ("mlp", "cosine-restarts", 0.1, 5)


def test_fit_in_bf16_records_and_runs_it(data, tmp_path, capsys):
    run = tmp_path / "r"
    assert _fit(str(data), *TINY, "--strategy", "full", "--epochs", "1", "--precision", "bf16", "--out", str(run)) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["precision"] == "bf16"
    assert "· cpu · bf16 ·" in capsys.readouterr().out  # the banner says what ran


def test_fit_with_ema_keeps_the_averaged_weights_as_best(data, tmp_path):
    run = tmp_path / "r"
    assert _fit(str(data), *TINY, "--strategy", "full", "--epochs", "1", "--ema", "0.9", "--mixup", "0.2",
                "--clip-grad", "1.0", "--out", str(run)) == 0
    best, raw = load_file(str(run / "best.safetensors")), last_weights(run)
    assert best.keys() == raw.keys()
    assert not torch.equal(best["classifier.weight"], raw["classifier.weight"])  # the EMA, not the raw weights


def test_early_stopping(data, tmp_path):
    run = tmp_path / "run"
    assert _fit(str(data), *TINY, "--strategy", "head", "--epochs", "6", "--lr", "1e-7", "--patience", "1",
                "--out", str(run)) == 0
    assert len(read_jsonl(run / "metrics.jsonl")) < 6


@pytest.mark.parametrize("args,msg", [
    (["/nonexistent/folder"], "does not exist"),
    (["--model", "resnet5O"], "unknown model"),
    (["--strategy", "nope"], "invalid choice"),
    (["--augment", "heavy"], "invalid choice"),
])
def test_cli_errors_exit_2(data, tmp_path, capsys, args, msg):
    argv = ["fit", *(args if args[0].startswith("/") else [str(data), *args]), "--quiet", "--out", str(tmp_path / "r")]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse choices
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_empty_class_folder_is_a_clear_error(tmp_path, capsys):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=4, split=False)
    (root / "empty_class").mkdir()
    assert main(["fit", str(root), *TINY, "--out", str(tmp_path / "r")]) == 2
    assert "empty_class" in capsys.readouterr().err


def test_resume_refuses_another_model(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _fit(str(data), *TINY, "--strategy", "head", "--epochs", "1", "--out", str(run)) == 0
    assert main(["fit", "--resume", str(run), "--model", "resnet18"]) == 2
    assert "cannot change model" in capsys.readouterr().err


def _spawn_fit(args, **kw):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "layerwise", "fit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def bigger(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("bigger"), classes=3, per_class=40)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(bigger, tmp_path):
    import signal
    import time

    common = [str(bigger), *TINY, "--strategy", "gradual", "--every", "1", "--seed", "5", "--epochs", "6"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _fit(*common, "--out", str(a)) == 0
    proc = _spawn_fit([*common, "--out", str(b)])
    deadline = time.time() + 120
    while len(read_jsonl(b / "metrics.jsonl")) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_jsonl(b / "metrics.jsonl"))
    assert proc.returncode == -signal.SIGKILL and 2 <= done < 6, done  # really killed mid-run
    assert _fit("--resume", str(b), "--quiet") == 0
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["epoch"] for r in rb] == list(range(6))
    for x, y in zip(ra, rb):
        assert x["val_acc"] == y["val_acc"] and x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-6)
    wa, wb = load_file(str(a / "best.safetensors")), load_file(str(b / "best.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


def test_sigterm_stops_with_resume_hint(bigger, tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    proc = _spawn_fit([str(bigger), *TINY, "--strategy", "full", "--epochs", "50", "--out", str(run)])
    deadline = time.time() + 120
    while not read_jsonl(run / "metrics.jsonl") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert f"layerwise fit --resume {run}" in out
    assert (run / "last" / "state.pt").is_file()


def test_resume_refuses_other_classes(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _fit(str(data), *TINY, "--strategy", "head", "--epochs", "1", "--out", str(run)) == 0
    other = make_image_folder(tmp_path / "other", classes=4, per_class=4)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"] = str(other)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--resume", str(run)]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_nan_loss_stops_with_step_number(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _fit(str(data), *TINY, "--strategy", "full", "--epochs", "2", "--lr", "1e30", "--optimizer", "sgd",
                "--out", str(run)) == 2
    err = capsys.readouterr().err
    assert "loss became" in err and "at step" in err


def test_nan_skip_keeps_going(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _fit(str(data), *TINY, "--strategy", "full", "--epochs", "2", "--lr", "1e30", "--optimizer", "sgd",
                "--nan", "skip", "--out", str(run)) == 0
    assert "batch skipped (--nan skip)" in capsys.readouterr().out
    assert len(read_jsonl(run / "metrics.jsonl")) == 2


def test_disk_full_while_saving_keeps_previous_checkpoint(data, tmp_path, capsys, monkeypatch):

    run = tmp_path / "run"
    common = [str(data), *TINY, "--strategy", "full", "--epochs", "2", "--out", str(run)]
    real = trainer.save_state
    calls = []

    def full_disk_on_second_save(path, state):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, state)

    monkeypatch.setattr(trainer, "save_state", full_disk_on_second_save)
    assert _fit(*common) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "previous checkpoint is intact" in err
    from layerwise.checkpoint import load_state

    assert load_state(run / "last" / "state.pt")["epoch"] == 0  # epoch 0's checkpoint survived



def test_fit_tta_evaluates_best_weights_with_views(data, tmp_path, capsys):
    import json as _json

    run = tmp_path / "run"
    assert _fit(str(data), *TINY, "--strategy", "full", "--epochs", "1", "--tta", "hflip", "--out", str(run)) == 0
    tta = _json.loads((run / "tta.json").read_text())
    assert tta["views"] == ["hflip"] and 0 <= tta["val_acc"] <= 1
    from layerwise.inference import evaluate_run

    assert evaluate_run(run, str(data), views=["hflip"])["accuracy"] == pytest.approx(tta["val_acc"])
    assert "with TTA hflip" in capsys.readouterr().out


@pytest.mark.parametrize("args,hint", [
    (["--strategy", "discriminative"], True),  # every group below the head at a low LR
    (["--strategy", "gradual", "--every", "1"], True),  # groups start late
    (["--strategy", "discriminative", "--bn", "frozen"], False),  # the user chose: no nagging
    (["--strategy", "full"], False),
])
def test_bn_hint_for_slow_groups_on_batch_statistics(data, tmp_path, capsys, args, hint):
    assert _fit(str(data), *TINY[:-1], *args, "--epochs", "2", "--out", str(tmp_path / "run")) == 0
    assert ("hint:" in capsys.readouterr().out) == hint


# --- issue 13: the run folder, resume at any moment, NaN policy ---------------------------


def test_fit_refuses_an_existing_run_unless_resume_or_overwrite(data, tmp_path, capsys):
    run = tmp_path / "run"
    args = [str(data), *TINY, "--strategy", "head", "--epochs", "1", "--out", str(run)]
    assert _fit(*args) == 0
    before = (run / "best.safetensors").read_bytes()
    other = make_image_folder(tmp_path / "other", classes=4, per_class=4)
    assert _fit(str(other), *args[1:]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert (run / "best.safetensors").read_bytes() == before and len(read_jsonl(run / "metrics.jsonl")) == 1
    assert _fit(str(other), *args[1:], "--overwrite") == 0
    assert json.loads((run / "model.json").read_text())["num_classes"] == 4


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(data, tmp_path, capsys):
    from layerwise.rundir import writer_lock

    run = tmp_path / "run"
    with writer_lock(run):  # as a fit in another process would hold it
        assert _fit(str(data), *TINY, "--strategy", "head", "--epochs", "1", "--out", str(run)) == 2
    assert "another layerwise process is writing" in capsys.readouterr().err
    assert _fit(str(data), *TINY, "--strategy", "head", "--epochs", "1", "--out", str(run)) == 0  # released


def test_config_error_after_the_data_scan_leaves_no_folder(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _fit(str(data), *TINY, "--strategy", "gradual", "--schedule", "0:head,1:nosuchgroup", "--epochs", "2",
                "--out", str(run)) == 2
    assert "nosuchgroup" in capsys.readouterr().err
    assert not run.exists()


def test_resume_before_the_first_checkpoint_starts_from_step_zero(data, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [str(data), *TINY, "--strategy", "full", "--epochs", "2", "--seed", "2"]
    assert _fit(*common, "--out", str(a)) == 0
    assert _fit(*common, "--out", str(b)) == 0
    import shutil

    shutil.rmtree(b / "last")  # as if killed in the first epoch: config.yaml and plan.json are there
    (b / "best.safetensors").unlink()
    (b / "metrics.jsonl").write_text("")
    capsys.readouterr()
    assert _fit("--resume", str(b)) == 0
    assert "has no checkpoint yet" in capsys.readouterr().out
    assert [r["val_acc"] for r in read_jsonl(a / "metrics.jsonl")] == [r["val_acc"] for r in read_jsonl(b / "metrics.jsonl")]


def test_resume_with_no_run_is_a_clear_error(tmp_path, capsys):
    assert _fit("--resume", str(tmp_path / "nothing")) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_kill_between_checkpoint_and_log_row_resumes_with_the_row(data, tmp_path, monkeypatch):
    from layerwise import rundir

    a, b = tmp_path / "a", tmp_path / "b"
    common = [str(data), *TINY, "--strategy", "full", "--epochs", "3", "--seed", "4"]
    assert _fit(*common, "--out", str(a)) == 0
    real = rundir.append_jsonl

    class Killed(BaseException):
        pass

    def die_on_second_row(path, row):
        if row["epoch"] == 1:
            raise Killed  # the checkpoint of epoch 1 is written, its log row is not
        real(path, row)

    monkeypatch.setattr(rundir, "append_jsonl", die_on_second_row)
    with pytest.raises(Killed):
        _fit(*common, "--out", str(b))
    assert [r["epoch"] for r in read_jsonl(b / "metrics.jsonl")] == [0]  # the log lags, never leads
    monkeypatch.setattr(rundir, "append_jsonl", real)
    assert _fit("--resume", str(b)) == 0
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["epoch"] for r in rb] == [0, 1, 2]
    assert [r["val_acc"] for r in ra] == [r["val_acc"] for r in rb]


def test_resume_accepts_the_documented_overrides_and_records_them(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _fit(str(data), *TINY, "--strategy", "full", "--epochs", "1", "--out", str(run)) == 0
    assert _fit("--resume", str(run), "--epochs", "2", "--lr", "1e-4", "--clip-grad", "1.0", "--nan", "skip") == 0
    assert "resume: from epoch 1" in capsys.readouterr().out
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["lr"] == 1e-4 and cfg["clip_grad"] == 1.0 and cfg["nan"] == "skip"
    assert cfg["resumed"] == [{"epoch": 1, "step": cfg["resumed"][0]["step"],
                               "changed": {"epochs": 2, "lr": 1e-4, "clip_grad": 1.0, "nan": "skip"}}]
    rows = read_jsonl(run / "metrics.jsonl")
    assert max(rows[1]["lr"].values()) <= 1e-4 < max(rows[0]["lr"].values())  # the new LR took effect


@pytest.mark.parametrize("flag,value", [("--strategy", "head"), ("--batch-size", "4"), ("--label-smoothing", "0.2")])
def test_resume_refuses_flags_that_would_change_the_run(data, tmp_path, capsys, flag, value):
    run = tmp_path / "run"
    assert _fit(str(data), *TINY, "--strategy", "full", "--epochs", "1", "--out", str(run)) == 0
    assert _fit("--resume", str(run), flag, value) == 2
    err = capsys.readouterr().err
    assert f"cannot change {flag[2:].replace('-', '_')}" in err and "may change only epochs, lr" in err


def test_nan_skip_stops_after_a_run_of_bad_batches_and_saves_no_nan(data, tmp_path, capsys, monkeypatch):

    run = tmp_path / "run"
    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    assert _fit(str(bigger_data(tmp_path)), *TINY, "--strategy", "full", "--epochs", "2", "--nan", "skip",
                "--out", str(run)) == 2
    err = capsys.readouterr().err
    assert f"{trainer.MAX_SKIPPED_IN_A_ROW} batches in a row had a non-finite loss" in err
    assert f"layerwise fit --resume {run} --lr" in err
    assert not (run / "best.safetensors").exists()


def test_nan_skip_keeps_going_past_one_bad_batch(data, tmp_path, capsys, monkeypatch):

    run = tmp_path / "run"
    real, calls = torch.nn.functional.cross_entropy, []

    def nan_once(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_once)
    assert _fit(str(data), *TINY, "--strategy", "full", "--epochs", "2", "--nan", "skip", "--out", str(run)) == 0
    assert capsys.readouterr().out.count("batch skipped (--nan skip)") == 1
    assert all(torch.isfinite(t).all() for t in load_file(str(run / "best.safetensors")).values())


def test_a_skipped_batch_leaves_the_running_statistics_as_they_were(data, tmp_path, capsys, monkeypatch):
    """Issue 24.4: the skipped batch's forward pass had already written inf into BatchNorm's
    running statistics, and best.safetensors and last/ were saved with them."""
    from layerwise.checkpoint import load_state

    run = tmp_path / "run"
    real, calls = trainer.train_step, []

    def poisoned_once(model, batch, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # inf pixels: inf activations, a NaN loss, and inf batch statistics
            batch = (torch.full_like(batch[0], float("inf")), batch[1])
        return real(model, batch, *a, **k)

    monkeypatch.setattr(trainer, "train_step", poisoned_once)
    assert _fit(str(data), *TINY, "--strategy", "full", "--epochs", "2", "--nan", "skip", "--out", str(run)) == 0
    assert capsys.readouterr().out.count("batch skipped (--nan skip)") == 1
    saved = [*load_file(str(run / "best.safetensors")).values(), *load_state(run / "last" / "state.pt")["model"].values()]
    assert any("running_var" in k for k in load_file(str(run / "best.safetensors")))
    assert all(torch.isfinite(x).all() for x in saved if x.is_floating_point())


def test_check_finite_reads_the_statistics_too(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    trainer.check_finite(model, 0, tmp_path)
    model[1].running_var.fill_(float("inf"))
    with pytest.raises(trainer.NonFiniteError, match="statistics became non-finite"):
        trainer.check_finite(model, 0, tmp_path)


def test_non_finite_weights_are_never_saved(data, tmp_path, capsys, monkeypatch):
    from layerwise import engine

    run = tmp_path / "run"
    real = engine.Trainer._step

    def poison(self, *a, **k):  # the epoch's last step leaves an inf weight behind
        real(self, *a, **k)
        if self.state.step == len(self.kit.loaders.train):
            with torch.no_grad():
                next(self.kit.model.parameters()).fill_(float("inf"))

    monkeypatch.setattr(engine.Trainer, "_step", poison)
    assert _fit(str(data), *TINY, "--strategy", "full", "--epochs", "1", "--out", str(run)) == 2
    assert "weights or normalisation statistics became non-finite" in capsys.readouterr().err
    assert not (run / "best.safetensors").exists() and not (run / "last" / "state.pt").exists()


def bigger_data(tmp_path):
    return make_image_folder(tmp_path / "bigger", classes=3, per_class=30)


def test_full_disk_at_the_first_checkpoint_does_not_claim_a_previous_one(data, tmp_path, capsys, monkeypatch):

    def full(path, state):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer, "save_state", full)
    assert _fit(str(data), *TINY, "--strategy", "full", "--epochs", "1", "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "No checkpoint was written yet" in err and "previous checkpoint is intact" not in err


def test_unwritable_report_is_a_clear_error_and_leaves_no_empty_png(data, tmp_path, capsys, monkeypatch):
    from layerwise import report

    run = tmp_path / "run"
    real = report.atomic_write_bytes

    def full(path, data):
        if path.suffix == ".png":
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(report, "atomic_write_bytes", full)
    assert _fit(str(data), *TINY, "--strategy", "head", "--epochs", "1", "--out", str(run)) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not list(run.glob("*.png")) and not list(run.glob(".*.tmp"))


def test_sigkill_at_each_observed_moment_then_resume_ends_with_the_same_weights(bigger, tmp_path):
    """Kills keyed to events the test observes, not to fractions of a timed run: as the run
    folder appears (set-up), as config.yaml appears (before any checkpoint), as the first
    mid-epoch checkpoint appears, and as an epoch-end checkpoint appears (before or after its
    log row). Every run then finishes with `fit --resume` (or a plain re-run, if killed
    before config.yaml existed) and ends where an uninterrupted run ends."""
    import signal
    import time

    from layerwise.checkpoint import load_state

    common = [str(bigger), *TINY, "--img-size", "64", "--strategy", "gradual", "--every", "1", "--seed", "7",
              "--epochs", "8", "--checkpoint-every", "2"]
    ref = tmp_path / "ref"
    proc = _spawn_fit([*common, "--out", str(ref)])
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    ref_w = load_state(ref / "last" / "state.pt")["model"]
    ref_acc = [r["val_acc"] for r in read_jsonl(ref / "metrics.jsonl")]

    def kind(state: Path) -> str:
        return "no checkpoint" if not state.is_file() else "mid-epoch" if load_state(state)["progress"] else "epoch end"

    events = {
        "set-up": lambda run, state: run.is_dir(),
        "no checkpoint": lambda run, state: (run / "config.yaml").is_file(),
        "mid-epoch": lambda run, state: kind(state) == "mid-epoch",
        "epoch end": lambda run, state: kind(state) == "epoch end" and load_state(state)["epoch"] >= 1,
    }
    for name, happened in events.items():
        run = tmp_path / name.replace(" ", "-")
        state = run / "last" / "state.pt"
        proc = _spawn_fit([*common, "--out", str(run)])
        while proc.poll() is None and not happened(run, state):
            time.sleep(0.01)
        assert proc.poll() is None, f"{name}: the run ended before the event"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (run / "config.yaml").is_file():
            assert _fit("--resume", str(run), "--quiet") == 0, name
        else:
            assert _fit(*common, "--out", str(run)) == 0, name
        w = load_state(run / "last" / "state.pt")["model"]
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-6, atol=1e-7, msg=f"{name}: {k}")
        assert [r["val_acc"] for r in read_jsonl(run / "metrics.jsonl")] == ref_acc, name
        assert not list(run.rglob(".*.tmp")), name  # a write cut short left nothing behind


def test_batch_of_one_with_batch_statistics_is_a_clear_error(data, tmp_path, capsys):
    """Found by the CLI fuzz test: BatchNorm cannot train on one value per channel."""
    assert _fit(str(data), *TINY, "--strategy", "full", "--epochs", "1", "--batch-size", "1",
                "--out", str(tmp_path / "r")) == 2
    assert "--batch-size 1 cannot train" in capsys.readouterr().err
    assert _fit(str(data), *TINY, "--strategy", "full", "--epochs", "1", "--batch-size", "1", "--bn", "eval",
                "--out", str(tmp_path / "e")) == 0


def test_resume_refuses_what_it_cannot_honour(tmp_path, capsys):
    """Issue 24.8: added images were taken in silently, --out and --config ignored."""
    import shutil

    d = make_image_folder(tmp_path / "d", classes=3, per_class=8)
    run = tmp_path / "run"
    assert _fit(str(d), *TINY, "--strategy", "full", "--epochs", "1", "--out", str(run)) == 0
    capsys.readouterr()
    assert _fit("--resume", str(run), "--out", str(tmp_path / "elsewhere")) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()
    assert _fit("--resume", str(run), "--config", str(run / "config.yaml")) == 2
    assert "--config" in capsys.readouterr().err
    first = sorted((d / "train").rglob("*.png"))[0]
    shutil.copy(first, first.with_name("added.png"))
    assert _fit("--resume", str(run), "--epochs", "2") == 2
    assert "data changed since the run started" in capsys.readouterr().err
    first.with_name("added.png").unlink()
    assert _fit("--resume", str(run), "--epochs", "2") == 0


def test_a_test_folder_is_scored_once_at_the_end_apart_from_val(tmp_path, capsys):
    """Issue 21: fit DATA with a test/ folder reports a test accuracy that no choice saw."""
    import shutil

    from layerwise.inference import evaluate_run

    d = make_image_folder(tmp_path / "d", classes=3, per_class=8)
    other = make_image_folder(tmp_path / "other", classes=3, per_class=4, size=20)
    shutil.copytree(other / "val", d / "test")
    run = tmp_path / "run"
    assert _fit(str(d), *TINY, "--strategy", "full", "--epochs", "2", "--out", str(run)) == 0
    test = json.loads((run / "test.json").read_text())
    assert test["images"] == len(list((d / "test").rglob("*.png"))) and "never used for a choice" in test["note"]
    assert test["test_acc"] == pytest.approx(evaluate_run(run, str(d))["accuracy"])  # evaluate scores test/ too
    files = {f"{f.parent.name}/{f.name}" for f in (d / "test").rglob("*.png")}
    assert set(test["correct"]) == files and sum(test["correct"].values()) == round(test["test_acc"] * len(files))
    assert all("test_acc" not in r for r in read_jsonl(run / "metrics.jsonl"))  # the epochs saw val only
    assert f"Test accuracy **{test['test_acc']:.4f}**" in (run / "report.md").read_text()
    assert "test accuracy" in capsys.readouterr().out


def test_tta_auto_scores_test_with_and_without_its_views_and_evaluate_reuses_them(tmp_path, capsys):
    """--tta auto: val and test with the views light augmentation trains for; test.json also
    holds the score without them, image by image; evaluate defaults to the run's views."""
    import shutil

    from layerwise.config import load_yaml
    from layerwise.inference import evaluate_run

    d = make_image_folder(tmp_path / "d", classes=3, per_class=8)
    shutil.copytree(make_image_folder(tmp_path / "other", classes=3, per_class=4, size=20) / "val", d / "test")
    run = tmp_path / "run"
    # fp32 pinned: evaluate scores in fp32, and a timed numerics choice may pick bf16 under load
    assert _fit(str(d), *TINY, "--strategy", "full", "--epochs", "1", "--tta", "auto", "--precision", "fp32",
                "--no-channels-last", "--out", str(run)) == 0
    assert load_yaml(run / "config.yaml")["tta"] == ["hflip", "multi-scale"]
    assert "tta auto: hflip, multi-scale, the views --augment light trains for" in capsys.readouterr().out
    test = json.loads((run / "test.json").read_text())
    plain = test["without_views"]
    assert test["views"] == ["hflip", "multi-scale"] and set(plain["correct"]) == set(test["correct"])
    assert json.loads((run / "tta.json").read_text())["views"] == test["views"]
    # losses, not accuracies: an untrained tiny model's accuracy rarely moves, and its loss by
    # about 1e-4 (relative) between the views and none, so the comparisons are exact to 1e-6
    assert test["test_loss"] != pytest.approx(plain["test_loss"], rel=1e-6)
    same = evaluate_run(run, str(d))
    assert (same["accuracy"], same["loss"]) == (pytest.approx(test["test_acc"]), pytest.approx(test["test_loss"], rel=1e-6))
    for off in (["identity"], []):
        assert evaluate_run(run, str(d), views=off)["loss"] == pytest.approx(plain["test_loss"], rel=1e-6)
    assert f"({plain['test_acc']:.4f} without them)" in (run / "report.md").read_text()


def test_lr_and_weight_decay_maps_reach_the_optimizer(data, tmp_path):
    """differential's --lr-map and any strategy's --wd-map, as the optimizer ran them."""
    from layerwise.checkpoint import load_state

    run = tmp_path / "run"
    assert _fit(str(data), *TINY, "--strategy", "differential", "--lr-map", "head=1,stage5=0.5", "--wd-map",
                "head=0.05", "--epochs", "1", "--lr", "0.01", "--out", str(run)) == 0
    first = read_jsonl(run / "steps.jsonl")[0]["lr"]
    assert first["stage5"] == pytest.approx(first["head"] / 2) and first["stem"] is None  # unmapped: frozen
    groups = load_state(run / "last" / "state.pt")["optimizer"]["param_groups"]
    head_decay = {pg["weight_decay"] for pg in groups if pg["group"] == "head" and pg["decay"]}
    body_decay = {pg["weight_decay"] for pg in groups if pg["group"] == "stage5" and pg["decay"]}
    assert head_decay == {0.05} and body_decay == {1e-4}


@pytest.mark.parametrize("bn,moved", [("adapt", True), ("eval", False)])
def test_bn_adapt_re_estimates_the_statistics_of_a_frozen_body(data, tmp_path, capsys, bn, moved):
    from layerwise.engine import prepare

    run = tmp_path / "run"
    cfg = RunConfig(data=str(data), model="timm/test_efficientnet", weights="none", img_size=32, seed=0)
    before = prepare(cfg).model.loaded.model.state_dict()["bn1.running_mean"].clone()
    assert _fit(str(data), *TINY, "--strategy", "head", "--bn", bn, "--epochs", "1", "--out", str(run)) == 0
    after = last_weights(run)["bn1.running_mean"]
    assert (not torch.equal(after, before)) == moved  # the head alone trains: only adapt moves the stem's stats
    assert ("bn adapt: re-estimated BatchNorm statistics" in capsys.readouterr().out) == moved


def test_fp16_trains_through_the_grad_scaler_and_saves_its_state(data, tmp_path, monkeypatch):
    """A real fp16 fit: every step goes through the scaler, and last/ holds its state for a resume."""
    from torch.amp import GradScaler

    from layerwise.checkpoint import load_state

    scaled = []
    real = GradScaler.scale
    monkeypatch.setattr(GradScaler, "scale", lambda self, loss: scaled.append(1) or real(self, loss))
    run = tmp_path / "run"
    assert _fit(str(data), *TINY, "--strategy", "full", "--precision", "fp16", "--no-channels-last", "--epochs", "1",
                "--out", str(run)) == 0  # a fixed layout: no timed numerics trial steps
    steps = read_jsonl(run / "steps.jsonl")
    assert len(scaled) == len(steps) > 0
    state = load_state(run / "last" / "state.pt")
    assert "scaler" in state and state["scaler"]["scale"] > 0
    assert yaml.safe_load((run / "config.yaml").read_text())["precision"] == "fp16"


def test_a_probe_on_the_same_inputs_runs_once_per_process(tmp_path, monkeypatch):
    """--model auto probes each backbone, then auto probes the chosen one again: the result is
    reused, and any change of what the probe reads runs it anew."""
    from layerwise import engine
    from layerwise.config import RunConfig

    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    calls = []
    real = engine.run_probe
    monkeypatch.setattr(engine, "run_probe", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = RunConfig(data=str(data), model="timm/test_efficientnet", weights="none", img_size=32, batch_size=4,
                    workers=0, quiet=True, strategy="auto", epochs=2)
    first = engine.probe_result(engine.prepare(cfg))
    again = engine.probe_result(engine.prepare(cfg))
    assert len(calls) == 1 and again is first
    engine.probe_result(engine.prepare(dataclasses.replace(cfg, seed=1)))
    engine.probe_result(engine.prepare(dataclasses.replace(cfg, img_size=48)))
    assert len(calls) == 3

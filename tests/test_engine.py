from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_image_folder
from layerwise.checkpoint import read_jsonl
from layerwise.cli import main
from layerwise.config import RunConfig
from layerwise.engine import fit

TINY = ["--model", "timm/test_efficientnet", "--weights", "none", "--img-size", "32", "--batch-size", "8",
        "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=8)


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
    s, _ = prepare(RunConfig(**{**cfg.__dict__}))
    initial = {k: v.clone() for k, v in s.loaded.model.state_dict().items()}
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

    def interrupted_in_epoch_2(self, epoch, stop, batches=None, progress=None):
        if epoch == 2:
            stop.flag = True  # as if SIGINT arrived during epoch 2: it stops after one step
        return real(self, epoch, stop, batches, progress)

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


@pytest.mark.parametrize("extra", [["--precision", "bf16"], ["--ema", "0.9", "--mixup", "0.2", "--clip-grad", "1.0"]])
def test_fit_options_run(data, tmp_path, extra):
    assert _fit(str(data), *TINY, "--strategy", "full", "--epochs", "1", "--out", str(tmp_path / "r"), *extra) == 0
    assert read_jsonl(tmp_path / "r" / "metrics.jsonl")[0]["train_loss"] > 0


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
    from layerwise import engine

    run = tmp_path / "run"
    common = [str(data), *TINY, "--strategy", "full", "--epochs", "2", "--out", str(run)]
    real = engine.save_state
    calls = []

    def full_disk_on_second_save(path, state):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, state)

    monkeypatch.setattr(engine, "save_state", full_disk_on_second_save)
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

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml

from conftest import make_image_folder
from layerwise.cli import main
from layerwise.config import RunConfig
from layerwise.engine import build_trainer, prepare, range_test
from layerwise.lrfind import lr_find, steepest, sweep_lr
from layerwise.step import train_step
from layerwise.trainer import EpochProgress


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=8)


def test_lr_find_restores_model_and_optimizer_exactly(data, tmp_path):
    cfg = RunConfig(data=str(data), model="timm/test_efficientnet", weights="none", img_size=32, batch_size=8,
                    workers=0, quiet=True, strategy="discriminative")
    t = build_trainer(cfg, tmp_path / "run")
    # Give the optimizer some state first, so restoring it is a real check.
    t.apply_plan(0)
    t._step(next(iter(t.kit.loaders.train)), EpochProgress(0), t.net)
    model_before = {k: v.clone() for k, v in t.kit.model.state_dict().items()}
    opt_before = copy.deepcopy(t.kit.optimizer.state_dict())  # state_dict() holds live tensors
    mults = [pg["lr_mult"] for pg in t.kit.optimizer.param_groups]
    res = lr_find(t.kit.model, t.kit.optimizer, t.kit.loaders.train,
                  lambda batch: train_step(t.kit.model, batch, t.kit.optimizer, t.kit.amp, t.kit.device), steps=30, quiet=True)
    for k, v in t.kit.model.state_dict().items():
        assert torch.equal(v, model_before[k]), k
    after = t.kit.optimizer.state_dict()
    assert after["param_groups"] == opt_before["param_groups"]
    for pid, st in opt_before["state"].items():
        for k, v in st.items():
            assert torch.equal(after["state"][pid][k], v)
    assert [pg["lr_mult"] for pg in t.kit.optimizer.param_groups] == mults  # ratios kept
    assert math.isfinite(res.suggestion) and res.lrs[0] <= res.suggestion <= res.lrs[-1]


def test_range_test_runs_in_the_epoch0_plan_and_leaves_the_model_as_it_was(data):
    cfg = RunConfig(data=str(data), model="timm/test_efficientnet", weights="none", img_size=32, batch_size=8,
                    workers=0, quiet=True, strategy="gradual", every=1, epochs=3)
    p = prepare(cfg)
    model = p.model.loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    res = range_test(p, p.resolved, steps=20)
    assert torch.equal(rng, torch.get_rng_state())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # epoch 0 of gradual trains the head alone: only its parameters may require grad
    head = p.model.groups[-1]
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if any(n.startswith(m + ".") for m in head.modules)}
    assert math.isfinite(res.suggestion)


def test_sweep_and_steepest():
    assert sweep_lr(0, 10, 1e-6, 1.0) == pytest.approx(1e-6) and sweep_lr(9, 10, 1e-6, 1.0) == pytest.approx(1.0)
    lrs = [10 ** (-6 + i * 0.25) for i in range(25)]
    losses = [2.0] * 8 + [2.0 - 0.2 * i for i in range(1, 8)] + [0.6 + 0.5 * i for i in range(10)]
    lr, reason = steepest(lrs, losses)
    assert lrs[8] <= lr <= lrs[14] and "steepest" in reason


def test_fit_lr_auto_records_the_found_lr(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", str(data), "--model", "timm/test_efficientnet", "--weights", "none", "--img-size", "32",
                 "--batch-size", "8", "--workers", "0", "--quiet", "--epochs", "1", "--strategy", "full",
                 "--lr", "auto", "--out", str(run)]) == 0
    assert "lr auto:" in capsys.readouterr().out
    lr = yaml.safe_load((run / "config.yaml").read_text())["lr"]
    assert isinstance(lr, float) and 1e-7 <= lr <= 1.0 and lr != 1e-3
    assert (run / "lr_find.png").is_file()
    # resolved once: the plan, the config and the optimizer's first step agree on the found LR
    plan = json.loads((run / "plan.json").read_text())
    assert plan["training"]["lr"] == lr and plan["groups"][-1]["lr"] == pytest.approx(lr)
    first = json.loads((run / "steps.jsonl").read_text().splitlines()[0])
    assert first["lr"]["head"] == pytest.approx(lr)


def test_lr_find_cli(data, tmp_path, capsys):
    assert main(["lr-find", str(data), "--model", "timm/test_efficientnet", "--weights", "none", "--img-size", "32",
                 "--batch-size", "8", "--workers", "0", "--quiet", "--steps", "20", "--out", str(tmp_path)]) == 0
    assert "suggested base lr" in capsys.readouterr().out
    assert (tmp_path / "lr_find.png").is_file() and (tmp_path / "lr_find.json").is_file()


def test_lr_find_shows_progress_unless_quiet(data, tmp_path, capsys):
    args = ["lr-find", str(data), "--model", "timm/test_efficientnet", "--weights", "none", "--img-size", "32",
            "--batch-size", "8", "--workers", "0", "--steps", "20", "--out", str(tmp_path)]
    assert main(args) == 0
    assert "lr-find:" in capsys.readouterr().err  # the bar, on stderr
    assert main([*args, "--quiet"]) == 0
    assert "lr-find:" not in capsys.readouterr().err

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layerwise.budget import DEFAULT_BATCH, DEFAULT_EPOCHS, MAX_EPOCHS, MIN_STEPS, auto_batch, resolve_budget
from layerwise.config import RunConfig
from layerwise.errors import LayerwiseError


@pytest.mark.parametrize("n,batch,epochs", [
    (245, 8, 4),  # the reported case: 245 images were 3 steps per epoch at batch 64, 15 steps in all
    (100, 8, 10),
    (1000, 32, 4),
    (5000, 64, 4),
    (20, 8, MAX_EPOCHS),
])
def test_auto_budget_on_made_up_sizes(n, batch, epochs):
    cfg, why = resolve_budget(RunConfig(strategy="auto"), n)
    assert (cfg.batch_size, cfg.epochs) == (batch, epochs)
    assert cfg.patience == max(2, -(-epochs // 2))  # half the run without a gain
    assert f"{n} training images -> batch {batch}, {epochs} epochs" in why


@given(st.integers(1, 10**6))
def test_auto_budget_gives_enough_steps_or_the_epoch_cap(n):
    cfg, _ = resolve_budget(RunConfig(strategy="auto"), n)
    steps = max(1, n // cfg.batch_size) * cfg.epochs
    assert 8 <= cfg.batch_size <= DEFAULT_BATCH and DEFAULT_EPOCHS <= cfg.epochs <= MAX_EPOCHS
    assert steps >= MIN_STEPS or cfg.epochs == MAX_EPOCHS
    assert cfg.batch_size == auto_batch(n)


def test_explicit_flags_win():
    cfg, why = resolve_budget(RunConfig(strategy="auto", epochs=3, batch_size=32), 245)
    assert (cfg.epochs, cfg.batch_size, cfg.patience) == (3, 32, None)  # asked for 3 epochs: all of them run
    assert "--epochs 3, --batch-size 32 as given" in why
    cfg, _ = resolve_budget(RunConfig(strategy="auto", patience=5), 245)
    assert cfg.patience == 5


@pytest.mark.parametrize("strategy", ["gradual", "full", "lp-ft"])
def test_fixed_strategies_get_the_data_sized_batch_and_keep_their_epochs(strategy):
    cfg, why = resolve_budget(RunConfig(strategy=strategy), 1000)
    assert (cfg.epochs, cfg.batch_size, cfg.patience) == (DEFAULT_EPOCHS, 32, None)  # 31 steps an epoch, not 15
    assert "1000 training images -> batch 32, 31 steps an epoch" in why
    cfg, why = resolve_budget(RunConfig(strategy=strategy, batch_size=64, epochs=3), 1000)
    assert (cfg.epochs, cfg.batch_size, why) == (3, 64, "")  # given: kept, and nothing to explain
    assert resolve_budget(RunConfig(strategy=strategy), None)[0].batch_size == DEFAULT_BATCH  # no data: plan at 64


def test_relations_are_checked_once_the_budget_is_known():
    with pytest.raises(LayerwiseError, match="warmup_epochs must be shorter than the run"):
        resolve_budget(RunConfig(strategy="full", warmup_epochs=5), 1000)


def test_fit_auto_records_the_budget(tmp_path, capsys):
    from conftest import make_image_folder
    from layerwise.cli import main

    data = make_image_folder(tmp_path / "d", classes=3, per_class=12, size=16)
    run = tmp_path / "run"
    assert main(["fit", str(data), "--model", "timm/test_efficientnet", "--weights", "none", "--img-size", "32",
                 "--workers", "0", "--quiet", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "budget: 36 training images -> batch 8, 30 epochs" in out
    text = (run / "config.yaml").read_text()
    assert text.startswith("# budget: 36 training images") and "batch_size: 8" in text and "patience: 15" in text


def test_early_stopping_waits_for_the_fine_tune_not_the_probe():
    from layerwise.budget import epochs_without_gain

    probe = {"epoch": -1, "val_acc": 0.844}
    climbing = [probe, {"epoch": 0, "val_acc": 0.812}, {"epoch": 1, "val_acc": 0.840}]
    assert epochs_without_gain(climbing) == 0  # still rising, though below the probe
    flat = [*climbing, {"epoch": 2, "val_acc": 0.83}, {"epoch": 3, "val_acc": 0.84}]
    assert epochs_without_gain(flat) == 2  # the tie at epoch 3 is no gain
    assert epochs_without_gain([probe]) == 0

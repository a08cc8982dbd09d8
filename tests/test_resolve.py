"""resolve(): the one place settings are decided, and strategies added from user code."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import pytest
import yaml

from conftest import make_image_folder
from layerwise.cli import main
from layerwise.config import RunConfig
from layerwise.errors import LayerwiseError, UnknownNameError
from layerwise.groups import LayerGroup
from layerwise.resolve import Evidence, Facts, apply_overrides, resolve
from layerwise.strategies import STRATEGIES, GroupState, Strategy, StrategyOptions, register_strategy

NAMES = ("stem", "body", "head")
FACTS = Facts(num_classes=3, groups=tuple(LayerGroup(n, (n,), ((n,),)) for n in NAMES), sizes={n: 10 for n in NAMES},
              model_img_size=224, n_train=600, images_per_class=200)


def sharp(names: Sequence[str], opts: StrategyOptions) -> Strategy:
    """A strategy from user code: the head alone, and three training settings it implies."""
    states = {n: GroupState(n == names[-1]) for n in names}
    return Strategy("sharp", lambda epoch: states, "head only, smoothed, small batches",
                    overrides={"label_smoothing": 0.25, "lr": 0.02, "batch_size": 4})


@pytest.fixture
def registered():
    register_strategy("sharp", sharp)
    yield
    del STRATEGIES["sharp"]


def test_registered_strategy_overrides_reach_plan_json_and_fit(registered, tmp_path, capsys):
    common = ["--model", "timm/test_efficientnet", "--weights", "none", "--strategy", "sharp", "--epochs", "2"]
    assert main(["plan", *common, "--num-classes", "3", "--json"]) == 0
    training = json.loads(capsys.readouterr().out)["training"]
    assert training["label_smoothing"] == 0.25 and training["lr"] == 0.02
    data = make_image_folder(tmp_path / "data", classes=3, per_class=8)
    run = tmp_path / "run"
    assert main(["fit", str(data), *common, "--img-size", "32", "--workers", "0", "--quiet", "--out", str(run)]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["strategy"], cfg["label_smoothing"], cfg["lr"], cfg["batch_size"]) == ("sharp", 0.25, 0.02, 4)
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    # 24 images, 4 per batch: 6 steps an epoch (4 would be 64's single step), at the implied LR
    assert sum(r["epoch"] == 0 for r in steps) == 6
    assert steps[0]["lr"]["head"] == pytest.approx(0.02) and steps[0]["lr"]["stem"] is None


def test_the_user_beats_the_strategy_and_the_strategy_beats_the_default(registered):
    r = resolve(RunConfig(strategy="sharp", epochs=2, label_smoothing=0.05), FACTS)
    assert r.config.label_smoothing == 0.05  # given by the user
    assert r.config.lr == 0.02 and r.config.batch_size == 4  # implied by the strategy
    assert r.config.scheduler == "cosine" and r.config.img_size == 224  # the library's and the model's
    assert r.plan.lr == r.config.lr  # one decision, read twice


def test_an_unknown_override_is_an_error_not_a_silent_drop():
    with pytest.raises(LayerwiseError, match="strategy 'x' overrides unknown setting.*'labelsmoothing'"):
        apply_overrides(RunConfig(), "x", {"labelsmoothing": 0.1})


def test_an_override_no_run_can_use_is_an_error_naming_the_strategy():
    with pytest.raises(LayerwiseError, match="strategy 'x' implies .*label_smoothing must be"):
        apply_overrides(RunConfig(), "x", {"label_smoothing": 3.0})


def test_register_strategy_refuses_a_taken_name_and_a_non_function():
    with pytest.raises(LayerwiseError, match="already registered"):
        register_strategy("full", sharp)
    with pytest.raises(LayerwiseError, match="must be a function"):
        register_strategy("nope", "full")  # type: ignore[arg-type]
    with pytest.raises(UnknownNameError, match="unknown strategy 'nope'"):
        resolve(RunConfig(strategy="nope"), FACTS)


def test_the_budget_and_the_plan_are_complete_at_birth():
    r = resolve(RunConfig(strategy="auto"), dataclasses.replace(FACTS, train_batches=37))
    assert r.config.batch_size == 32 and r.config.epochs is not None and "budget: 600 training images" in r.budget
    assert r.plan.steps_per_epoch == 37 and r.plan.epochs == r.config.epochs


def test_evidence_moves_auto_and_what_it_implies():
    cfg = RunConfig(strategy="auto", epochs=4, batch_size=8)
    near = resolve(cfg, FACTS, Evidence(probe_skill=0.95, bn_shift=0.1, probe_head="/tmp/h.safetensors"))
    far = resolve(cfg, FACTS, Evidence(probe_skill=0.5, bn_shift=0.5, probe_head="/tmp/h.safetensors"))
    assert near.strategy.name == "auto:lp-ft" and near.config.bn == "eval" and near.config.probe_epochs == 0
    assert far.strategy.name == "auto:full" and far.config.bn == "frozen" and far.config.probe_epochs is None
    assert resolve(dataclasses.replace(cfg, bn="train"), FACTS, Evidence(0.5, 0.5)).config.bn == "train"


def test_resolve_is_pure_and_the_config_is_frozen():
    cfg = RunConfig(strategy="recipe", epochs=3)
    a, b = resolve(cfg, FACTS), resolve(cfg, FACTS)
    assert a.config == b.config and cfg == RunConfig(strategy="recipe", epochs=3)
    assert a.config.head == "mlp" and a.config.scheduler == "cosine-restarts"
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.config.lr = 1.0  # type: ignore[misc]


def test_lr_auto_waits_for_its_evidence():
    cfg = RunConfig(strategy="full", epochs=2, lr="auto")
    assert resolve(cfg, FACTS).config.lr == 1e-3  # the range test's base, until it has run
    found = resolve(cfg, FACTS, Evidence(lr=3e-4))
    assert found.config.lr == found.plan.lr == 3e-4


def test_every_knob_is_declared_once_and_reaches_the_strategy_and_the_flags(capsys):
    from dataclasses import fields

    from layerwise.config import knobs

    options = {f.name for f in fields(StrategyOptions)}
    assert knobs() and all(f.name in options for f in knobs())  # read by field name
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    help_text = capsys.readouterr().out
    assert all(f"--{f.name.replace('_', '-')}" in help_text for f in knobs())
    assert "discriminative: LR divisor per group (2.6)" in help_text  # the default, from StrategyOptions only
    assert main(["plan", "--model", "resnet18", "--weights", "none", "--strategy", "discriminative", "--epochs", "2",
                 "--num-classes", "3", "--json", "--decay", "4"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert groups[-2]["lr"] == pytest.approx(groups[-1]["lr"] / 4)
    assert resolve(RunConfig(strategy="discriminative", epochs=2), FACTS).config.decay == StrategyOptions.decay


def test_the_embedded_digits_resolve_to_the_data_modules_size_and_no_augmentation():
    """The one constant (data.DEFAULT_IMG_SIZE): a second copy of it once changed make demo."""
    from layerwise.data import DEFAULT_IMG_SIZE

    r = resolve(RunConfig(strategy="full", epochs=1), dataclasses.replace(FACTS, embedded=True))
    assert (r.config.img_size, r.config.augment) == (DEFAULT_IMG_SIZE, "none")
    given = resolve(RunConfig(strategy="full", epochs=1, img_size=48, augment="light"),
                    dataclasses.replace(FACTS, embedded=True))
    assert (given.config.img_size, given.config.augment) == (48, "light")


def test_an_override_reaches_a_list_setting_left_empty_but_not_one_given():
    assert apply_overrides(RunConfig(), "x", {"tta": ["hflip"]}).tta == ["hflip"]
    assert apply_overrides(RunConfig(tta=["five-crop"]), "x", {"tta": ["hflip"]}).tta == ["five-crop"]


def test_tta_auto_resolves_to_the_views_the_augmentation_trains_for():
    cfg = RunConfig(strategy="full", epochs=2, tta=["auto"])
    assert resolve(cfg, FACTS).config.tta == ["hflip", "multi-scale"]
    assert resolve(dataclasses.replace(cfg, augment="none"), FACTS).config.tta == []
    assert resolve(dataclasses.replace(cfg, tta=["five-crop"]), FACTS).config.tta == ["five-crop"]  # the user's views stay
    with pytest.raises(LayerwiseError, match="stands alone"):
        resolve(dataclasses.replace(cfg, tta=["auto", "hflip"]), FACTS)
    with pytest.raises(UnknownNameError, match="auto"):  # the error lists auto beside the views
        resolve(dataclasses.replace(cfg, tta=["spin"]), FACTS)

from __future__ import annotations

import json

import pytest

from layerwise.cli import main


def run_plan(capsys, *args):
    code = main(["plan", "--weights", "none", "--json", *args])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out)


def test_plan_json_contract_gradual_resnet50(capsys):
    d = run_plan(capsys, "--model", "resnet50", "--strategy", "gradual", "--epochs", "8", "--num-classes", "10")
    assert set(d) >= {"model", "strategy", "groups", "epochs", "total_params", "reason"}
    assert [g["name"] for g in d["groups"]] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    for g in d["groups"]:
        assert set(g) >= {"name", "params", "trainable_params", "unfreeze_epoch", "lr", "weight_decay"}
    assert sum(g["params"] for g in d["groups"]) == d["total_params"]
    assert [g["unfreeze_epoch"] for g in d["groups"]] == [5, 4, 3, 2, 1, 0]
    assert d["groups"][-1]["params"] == 2048 * 10 + 10
    assert len(d["epochs"]) == 8
    counts = [e["trainable_params"] for e in d["epochs"]]
    assert counts == sorted(counts) and counts[0] == d["groups"][-1]["params"] and counts[-1] == d["total_params"]
    assert d["epochs"][1]["trainable_groups"] == ["layer4", "head"]


@pytest.mark.parametrize("model", ["resnet50", "efficientnet_b0", "convnext_tiny", "vit_b_16",
                                   "efficientnet_lite0", "timm/vit_tiny_patch16_224"])
def test_plans_for_the_required_architectures(capsys, model):
    d = run_plan(capsys, "--model", model, "--strategy", "discriminative", "--epochs", "2")
    lrs = [g["lr"] for g in d["groups"]]
    assert lrs[-1] == pytest.approx(1e-3) and lrs == sorted(lrs)
    n = len(lrs)
    assert lrs[0] == pytest.approx(1e-3 / 2.6 ** (n - 1))


def test_recipe_plan_uses_mlp_head_and_boundary(capsys):
    d = run_plan(capsys, "--model", "resnet50", "--strategy", "recipe", "--epochs", "3", "--num-classes", "5")
    by = {g["name"]: g for g in d["groups"]}
    assert by["head"]["params"] == 2048 * 512 + 512 + 512 * 5 + 5
    assert [g["name"] for g in d["groups"] if g["unfreeze_epoch"] == 0] == ["layer3", "layer4", "head"]
    assert by["layer3"]["lr"] == pytest.approx(1e-4) and by["layer4"]["lr"] == pytest.approx(5e-4)


def test_auto_plan_prints_its_reason(capsys):
    d = run_plan(capsys, "--model", "resnet18", "--strategy", "auto", "--images-per-class", "12")
    assert d["strategy"] == "auto:head" and "12 images per class" in d["reason"]


def test_plan_table_is_readable(capsys):
    assert main(["plan", "--model", "resnet18", "--weights", "none", "--strategy", "lp-ft", "--epochs", "4"]) == 0
    out = capsys.readouterr().out
    assert "layer4" in out and "never" not in out and "epoch" in out


@pytest.mark.parametrize("args,msg", [
    (["--strategy", "nope"], "invalid choice"),
])
def test_argparse_choices(capsys, args, msg):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--model", "resnet18", *args])
    assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [
    (["--model", "resnet5O"], "unknown model"),
    (["--model", "resnet18", "--strategy", "partial", "--from-group", "layer3x"], "layer3x"),
    (["--model", "resnet18", "--lr", "-1"], "lr must be > 0"),
    (["--model", "resnet18", "--epochs", "0"], "epochs must be"),
    (["--model", "resnet18", "--strategy", "gradual", "--schedule", "0:head,2:layer1,4:layer4", "--epochs", "6"], "from the head down"),
])
def test_user_errors_exit_2_with_message(capsys, args, msg):
    assert main(["plan", "--weights", "none", *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_plan_json_shows_layer_decay(capsys):
    plain = run_plan(capsys, "--model", "resnet18", "--strategy", "full")
    decayed = run_plan(capsys, "--model", "resnet18", "--strategy", "full", "--layer-decay", "0.5")
    lrs = {g["name"]: g["lr"] for g in decayed["groups"]}
    assert {g["name"]: g["lr"] for g in plain["groups"]} == dict.fromkeys(lrs, 1e-3)
    assert lrs["head"] == pytest.approx(1e-3) and lrs["layer4"] < 1e-3 and lrs["stem"] < lrs["layer1"] < lrs["layer4"]


def test_plan_json_shows_the_recipe_restart_and_its_settings(capsys):
    d = run_plan(capsys, "--model", "resnet50", "--strategy", "recipe", "--epochs", "12")
    head = [e["lr"]["head"] for e in d["epochs"]]
    assert head[0] == pytest.approx(1e-3) and head[4] < head[3] < head[0]  # cosine within the first period
    assert head[5] == pytest.approx(1e-3)  # warm restart after t0 = 5 epochs
    t = d["training"]
    assert (t["optimizer"], t["scheduler"], t["t0"], t["t_mult"], t["label_smoothing"], t["head"]) == (
        "adamw", "cosine-restarts", 5, 2, 0.1, "mlp")


def test_frozen_groups_have_no_lr(capsys):
    d = run_plan(capsys, "--model", "resnet18", "--strategy", "head")
    assert [g["lr"] for g in d["groups"]][:-1] == [None] * 5 and d["groups"][-1]["lr"] == pytest.approx(1e-3)
    assert d["epochs"][0]["lr"]["stem"] is None
    assert main(["plan", "--model", "resnet18", "--weights", "none", "--strategy", "head"]) == 0
    assert "     -        -" in capsys.readouterr().out  # the table's frozen rows


@pytest.mark.parametrize("args", [
    ["--strategy", "gradual", "--every", "1"],
    ["--strategy", "discriminative", "--scheduler", "warmup-cosine", "--warmup-epochs", "1"],
    ["--strategy", "recipe", "--t0", "1"],
    ["--strategy", "full", "--layer-decay", "0.7", "--scheduler", "onecycle"],
])
def test_logged_lrs_are_the_plans_function(tmp_path, args):
    """Every group's LR in steps.jsonl (what the optimizer used) and metrics.jsonl equals the
    plan's lr_at at that step: one function, no drift."""
    from conftest import make_image_folder
    from layerwise.checkpoint import read_jsonl
    from layerwise.config import from_mapping, load_yaml
    from layerwise.engine import prepare

    data = make_image_folder(tmp_path / "data", classes=3, per_class=8)
    run = tmp_path / "run"
    assert main(["fit", str(data), "--model", "timm/test_efficientnet", "--weights", "none", "--img-size", "32",
                 "--batch-size", "8", "--workers", "0", "--quiet", "--epochs", "3", "--augment", "none",
                 "--out", str(run), *args]) == 0
    steps = read_jsonl(run / "steps.jsonl")
    per_epoch = sum(r["epoch"] == 0 for r in steps)
    plan = prepare(from_mapping(load_yaml(run / "config.yaml"))).resolved.plan
    assert plan.steps_per_epoch == per_epoch  # complete at birth: the loader's real count
    assert plan.to_dict()["epochs"] == json.loads((run / "plan.json").read_text())["epochs"]
    for r in steps:
        want = plan.lrs_at(r["epoch"], r["step"])
        assert r["lr"].keys() == want.keys()
        for g, lr in r["lr"].items():
            assert (lr is None) == (want[g] is None), (r, g)
            if lr is not None:
                assert lr == pytest.approx(want[g], rel=1e-9), (r, g)
    for m in read_jsonl(run / "metrics.jsonl"):
        assert m["lr"] == pytest.approx(plan.lrs_at(m["epoch"], m["epoch"] * per_epoch))
    assert any(v is None for r in steps for v in r["lr"].values()) == ("gradual" in args or "recipe" in args)

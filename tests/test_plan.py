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

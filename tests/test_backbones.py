"""--model auto (backbones.py): the rule, and a real choice recorded in backbone.json."""

from __future__ import annotations

import json

import yaml

from layerwise.backbones import FINE_TUNE_GAIN, Candidate, available, choose, forward_gflops
from layerwise.cli import main


def _row(name, acc, gflops):
    return Candidate(name, acc, acc, None, 224, gflops, 1.0)


def test_the_clearly_best_probe_wins_whatever_it_costs():
    name, why = choose([_row("small", 0.70, 0.5), _row("big", 0.90, 1.7)], n_val=500, gains={})
    assert name == "big" and why.startswith("best expected accuracy: probe 0.900 + fine-tuning gain +0.000 = 0.900")
    assert "next small 0.700" in why and "inside the noise" not in why


def test_a_backbone_that_fine_tunes_worse_loses_a_probe_lead():
    # a frozen probe measures the features as they are; the gain is what fine-tuning added on the suite
    rows = [_row("ahead-frozen", 0.80, 0.5), _row("fine-tunes", 0.75, 1.7)]
    assert choose(rows, n_val=10_000, gains={})[0] == "ahead-frozen"
    name, why = choose(rows, n_val=10_000, gains={"ahead-frozen": -0.02, "fine-tunes": 0.08})
    assert name == "fine-tunes" and "probe 0.750 + fine-tuning gain +0.080 = 0.830" in why


def test_inside_the_noise_the_expectation_still_decides_and_says_so():
    rows = [_row("small", 0.88, 0.5), _row("big", 0.90, 1.7), _row("mid", 0.60, 0.1)]
    name, why = choose(rows, n_val=100, gains={})  # 2 points on 100 images is noise (s.e. 3 points)
    assert name == "big" and "next small 0.880 (inside the noise, ±0.059 on 100 val images)" in why
    assert choose([_row("a", 0.9, 1.0), _row("b", 0.9, 0.5)], n_val=100, gains={})[0] == "b"  # a tie: the cheaper


def test_the_shipped_gains_cover_every_offline_backbone():
    from layerwise.backbones import OFFLINE

    assert set(FINE_TUNE_GAIN) == set(OFFLINE)


def test_flops_are_counted_not_timed():
    from layerwise.models import create_model

    lite0 = create_model("efficientnet_lite0", 3, weights="none").model
    assert 0.7 < forward_gflops(lite0, 224) < 0.85  # Lite0: 0.39 G multiply-adds
    assert forward_gflops(lite0, 112) < forward_gflops(lite0, 224) / 3


def test_fit_model_auto_probes_each_offline_backbone_and_records_the_choice(data, tmp_path):
    run = tmp_path / "run"
    assert main(["fit", str(data), "--model", "auto", "--img-size", "32", "--batch-size", "8", "--workers", "0",
                 "--epochs", "1", "--quiet", "--out", str(run)]) == 0
    record = json.loads((run / "backbone.json").read_text())
    assert [c["name"] for c in record["candidates"]] == available() and len(available()) == 4
    assert record["chosen"] in available() and record["reason"].startswith("best expected accuracy")
    # the recorded evidence gives the recorded choice: the best probe plus its recorded gain
    assert record["gains"] == {k: FINE_TUNE_GAIN[k] for k in available()}
    expected = {c["name"]: c["val_acc"] + record["gains"][c["name"]] for c in record["candidates"]}
    assert record["chosen"] == max(record["candidates"], key=lambda c: (expected[c["name"]], -c["gflops"]))["name"]
    assert record["n_val"] == sum(1 for f in (data / "val").rglob("*") if f.is_file())  # what the rule's noise is on
    assert yaml.safe_load((run / "config.yaml").read_text())["model"] == record["chosen"]
    assert json.loads((run / "model.json").read_text())["name"] == record["chosen"]


def test_model_auto_is_refused_where_it_cannot_be_chosen(data, tmp_path, capsys):
    assert main(["plan", "--model", "auto", "--num-classes", "3"]) == 2
    assert main(["fit", str(data), "--model", "auto", "--weights", "none", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "chosen on your images when fit starts" in err and "drop --weights" in err

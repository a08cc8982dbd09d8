from __future__ import annotations

import json

import pytest
import torch

from conftest import TinyNet
from layerwise import numerics
from layerwise.numerics import Numerics, candidates, choose, fastest

FP32, FP32_CL = Numerics("fp32", False), Numerics("fp32", True)
BF16, BF16_CL = Numerics("bf16", False), Numerics("bf16", True)


@pytest.mark.parametrize("seconds,expected", [
    ({FP32: 1.0, FP32_CL: 0.9, BF16: 0.5, BF16_CL: 0.45}, BF16_CL),  # ResNet on an AVX512-BF16 CPU
    ({FP32: 1.0, FP32_CL: 0.9, BF16: 1.6, BF16_CL: 1.4}, FP32_CL),  # depthwise convs: bf16 slower
    ({FP32: 1.0, FP32_CL: 1.2, BF16: 0.97, BF16_CL: 1.1}, FP32),  # 3 % faster is not worth bf16
    ({FP32_CL: 2.0}, FP32_CL),
])
def test_the_fastest_wins_and_fp32_keeps_ties(seconds, expected):
    assert fastest(seconds) == expected


def test_candidates_are_what_was_left_to_auto(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(numerics, "cpu_has_fast_bf16", lambda: True)
    assert candidates("auto", None, cpu) == [FP32, FP32_CL, BF16, BF16_CL]
    assert candidates("fp32", None, cpu) == [FP32, FP32_CL]
    assert candidates("auto", False, cpu) == [FP32, BF16]
    assert candidates("bf16", True, cpu) == [BF16_CL]
    monkeypatch.setattr(numerics, "cpu_has_fast_bf16", lambda: False)  # emulated bf16: not worth timing
    assert candidates("auto", None, cpu) == [FP32, FP32_CL]


def test_measured_once_then_reused_from_the_cache(tmp_path, monkeypatch):
    calls = []

    def made_up(model, o, device, **kw):
        calls.append(o)
        return {FP32: 1.0, FP32_CL: 0.5}[o]

    monkeypatch.setattr(numerics, "time_step", made_up)
    kw = dict(model_name="tiny", img_size=32, batch=8, num_classes=3, cache_dir=tmp_path)
    choice, how = choose(TinyNet(), [FP32, FP32_CL], torch.device("cpu"), **kw)
    assert choice == FP32_CL and how.startswith("measured") and calls == [FP32, FP32_CL]
    again, how = choose(TinyNet(), [FP32, FP32_CL], torch.device("cpu"), **kw)
    assert again == FP32_CL and "cached" in how and len(calls) == 2  # no second trial
    _, how = choose(TinyNet(), [FP32, FP32_CL], torch.device("cpu"), **{**kw, "img_size": 64})
    assert how.startswith("measured") and len(calls) == 4  # another size is another question
    saved = json.loads((tmp_path / "numerics.json").read_text())
    assert len(saved) == 2 and all(v["channels_last"] for v in saved.values())


def test_a_damaged_cache_is_measured_again(tmp_path, monkeypatch):
    (tmp_path / "numerics.json").write_text("{not json")
    monkeypatch.setattr(numerics, "time_step", lambda m, o, d, **kw: 1.0 if o.channels_last else 2.0)
    choice, how = choose(TinyNet(), [FP32, FP32_CL], torch.device("cpu"), model_name="t", img_size=16, batch=4,
                         num_classes=3, cache_dir=tmp_path)
    assert choice == FP32_CL and how.startswith("measured")


def test_the_trial_leaves_the_model_untouched():
    model = TinyNet().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = numerics.time_step(model, FP32_CL, torch.device("cpu"), img_size=16, batch=4, num_classes=3)
    assert seconds > 0 and not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())
    assert model.conv1.weight.is_contiguous()  # the copy went channels_last, not the model


def test_fit_prints_and_records_the_choice(tmp_path, capsys):
    import yaml

    from layerwise.cli import main

    run = tmp_path / "run"
    assert main(["fit", "--model", "timm/test_efficientnet", "--weights", "none", "--img-size", "32", "--epochs", "1",
                 "--strategy", "head", "--workers", "0", "--out", str(run), "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert f"numerics: {Numerics(cfg['precision'], cfg['channels_last']).label}, the fastest of" in out
    assert isinstance(cfg["channels_last"], bool) and (tmp_path / "numerics.json").is_file()


@pytest.mark.parametrize("damage", ["[]", "{", "[" * 50_000, '{"k": 1}'])
def test_a_damaged_cache_is_ignored_and_rewritten(tmp_path, damage):
    from layerwise.numerics import CACHE_FILE, Numerics, choose

    (tmp_path / CACHE_FILE).write_text(damage)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    options = [Numerics("fp32", False), Numerics("fp32", True)]
    choice, how = choose(model, options, torch.device("cpu"), model_name="tiny", img_size=16, batch=2,
                         num_classes=2, cache_dir=tmp_path)
    assert choice in options and how.startswith("measured")
    assert isinstance(json.loads((tmp_path / CACHE_FILE).read_text()), dict)

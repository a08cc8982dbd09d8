"""The command line as an adversarial user drives it: every numeric flag, any value, ends in
exit 0 or exit 2 with a message, never a hang and never a traceback."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import hang_guard, make_image_folder
from layerwise.cli import main

TINY = ["--model", "timm/test_efficientnet", "--weights", "none", "--batch-size", "8", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=8, size=16)


def run_cli(argv: list[str]) -> int:
    """Exit code of ``layerwise ARGV``; argparse's own exit 2 counts as a clean refusal.
    Anything else that escapes (a traceback) fails the test."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


# Values around every boundary, and the absurd: each flag is given one.
_numbers = st.sampled_from(["-1", "0", "0.5", "1", "2", "1e-9", "-0.0", "nan", "inf", "-inf", "1e300", "10**6",
                            "1000000", "x", ""])
# Flags whose largest valid values would make a fit long (not hang): kept small when valid.
_small = st.sampled_from(["-1", "0", "1", "2", "nan", "1000000", "x"])
FLAGS = {
    "--lr": _numbers, "--decay": _numbers, "--every": _small, "--probe-epochs": _small, "--ft-lr-mult": _numbers,
    "--layer-decay": _numbers, "--weight-decay": _numbers, "--hidden": _small, "--probe-skill": _numbers,
    "--val-split": _numbers, "--warmup-epochs": _small, "--t0": _small, "--t-mult": _small,
    "--label-smoothing": _numbers, "--clip-grad": _numbers, "--ema": _numbers, "--mixup": _numbers,
    "--cutmix": _numbers, "--patience": _small, "--workers": st.sampled_from(["-1", "0", "1000", "x"]),
    "--feature-cache-views": _small, "--seed": _numbers, "--img-size": st.sampled_from(["-1", "0", "15", "16",
                                                                                        "100000", "x"]),
    "--batch-size": st.sampled_from(["-3", "0", "1", "1000000000", "x"]), "--epochs": _small,
    "--checkpoint-every": st.sampled_from(["0", "-5", "1", "1s", "10m", "off", "nan", "1e9h", "x"]),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=st.dictionaries(st.sampled_from(sorted(FLAGS)), st.just(None), min_size=1, max_size=4).flatmap(
    lambda d: st.fixed_dictionaries({k: FLAGS[k] for k in d})),
    scheduler=st.sampled_from(["cosine", "cosine-restarts", "warmup-cosine", "onecycle"]),
    strategy=st.sampled_from(["full", "gradual", "lp-ft", "discriminative", "recipe"]))
def test_fuzz_fit_numeric_flags_no_hang_no_traceback(data, tmp_path_factory, capsys, flags, scheduler, strategy):
    argv = ["fit", str(data), *TINY, "--epochs", "1", "--img-size", "16", "--strategy", strategy,
            "--scheduler", scheduler, "--out", str(tmp_path_factory.mktemp("run") / "r")]
    for flag, value in flags.items():
        argv += [f"{flag}={value}"]  # later flags win: the fuzzed value replaces the safe default
    with hang_guard(120):
        code = run_cli(argv)
    err = capsys.readouterr().err
    event(f"exit {code}")
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err
    if code == 2:
        assert "error:" in err  # one message that names the problem


@settings(max_examples=60, deadline=None)
@given(flags=st.fixed_dictionaries({}, optional={"--num-classes": _numbers, "--epochs": _numbers, "--lr": _numbers,
                                                 "--decay": _numbers, "--layer-decay": _numbers,
                                                 "--images-per-class": _numbers, "--probe-skill": _numbers,
                                                 "--hidden": _small, "--every": _small, "--t0": _small}),
       strategy=st.sampled_from(["auto", "gradual", "discriminative", "recipe", "lp-ft"]))
def test_fuzz_plan_numeric_flags(flags, strategy):
    argv = ["plan", "--model", "resnet18", "--weights", "none", "--strategy", strategy]
    for flag, value in flags.items():
        argv += [f"{flag}={value}"]
    with hang_guard(60):
        assert run_cli(argv) in (0, 2), argv


def test_cosine_restarts_t0_zero_is_refused_not_a_hang(data, tmp_path, capsys):
    """The reported hang: this spun at 100% CPU for 25 minutes."""
    with hang_guard(60):
        code = run_cli(["fit", str(data), *TINY, "--scheduler", "cosine-restarts", "--t0", "0",
                        "--out", str(tmp_path / "r")])
    assert code == 2 and "t0 must be in [1, 100000]" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv,message", [
    (["plan", "--images-per-class", "nan"], "--images-per-class: must be a finite number above 0"),
    (["plan", "--images-per-class", "-3"], "--images-per-class: must be a finite number above 0"),
    (["compare", "--strategies", ",", "--out", "x"], "--strategies: expected one or more strategies"),
    (["compare", "--strategies", "head,head", "--out", "x"], "head listed more than once; use --repeats"),
    (["compare", "--budget", "time:0", "--out", "x"], "--budget: expected time:SECONDS with SECONDS > 0"),
])
def test_bad_numbers_and_lists_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_config_file_leaves_out_the_probe_head_and_what_came_with_it(tmp_path, capsys):
    """A race's lp-ft winner ran from the probe's head with zero head-only epochs; re-run from its
    config.yaml without that head, lp-ft probes for its own epochs again."""
    import dataclasses

    from layerwise.cli import _config_file
    from layerwise.config import RunConfig

    ran = dataclasses.replace(RunConfig(), strategy="lp-ft", probe_head="/old/run/probe_head.safetensors", probe_epochs=0,
                              probe_skill=0.95, bn_shift=0.1, epochs=4)
    (tmp_path / "config.yaml").write_text(ran.to_yaml())
    cfg = _config_file(str(tmp_path / "config.yaml"))
    assert (cfg.probe_head, cfg.probe_epochs, cfg.probe_skill, cfg.bn_shift) == (None, None, None, None)
    assert cfg.strategy == "lp-ft" and cfg.epochs == 4
    assert "probe_epochs" in capsys.readouterr().out
    kept = dataclasses.replace(ran, probe_head=None, probe_epochs=0)  # chosen by hand: no head came with it
    (tmp_path / "config.yaml").write_text(kept.to_yaml())
    assert _config_file(str(tmp_path / "config.yaml")).probe_epochs == 0

"""bench/suite.py's held-out split: the rule that carves a test split no choice sees."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from suite import held_out  # noqa: E402

from conftest import make_image_folder  # noqa: E402


def _names(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*.png")}


def test_held_out_halves_each_val_class_deterministically_and_keeps_train(tmp_path):
    data = make_image_folder(tmp_path / "d", classes=3, per_class=9)
    a = held_out("x", data, tmp_path / "a")
    b = held_out("x", data, tmp_path / "b")
    val, test = _names(a / "val"), _names(a / "test")
    assert val and test and not val & test and val | test == _names(data / "val")  # a partition of val
    assert _names(a / "train") == _names(data / "train")
    assert (val, test) == (_names(b / "val"), _names(b / "test"))  # the same rule, the same split
    for cls in (data / "val").iterdir():  # every class in both halves, half each
        n = len(list(cls.iterdir()))
        assert len(list((a / "val" / cls.name).iterdir())) == n // 2
        assert len(list((a / "test" / cls.name).iterdir())) == n - n // 2
    assert held_out("x", data, tmp_path / "a") == a  # written once, then reused


def test_each_layerwise_variant_runs_the_command_its_name_says(tmp_path, monkeypatch):
    import json

    import suite

    seen = {}

    def fake_child(cmd):
        run = Path(cmd[cmd.index("--out") + 1])
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text(json.dumps({"elapsed_seconds": 1.0, "val_acc": 0.5, "epoch": 0}) + "\n")
        seen[run.name.split("-112px")[0]] = cmd
        return "", 1.0, None

    monkeypatch.setattr(suite, "ROOT", tmp_path)
    monkeypatch.setattr(suite, "run_child", fake_child)
    for v in ("auto", "auto+no-race", "auto+race-2.5", "full+bn-eval", "gradual"):
        suite.run_layerwise("ds", tmp_path, v, 0, 112, (4, 32, 2, ""))

    def flags(cmd):
        return cmd[cmd.index("--strategy") + 1], cmd[cmd.index("--overwrite") + 1:]

    assert flags(seen["auto"]) == ("auto", ["--tta", "auto", "--patience", "2"])
    assert flags(seen["auto+no-race"]) == ("auto", ["--no-race", "--patience", "2"])
    assert flags(seen["auto+race-2.5"]) == ("auto", ["--race-cost", "2.5", "--patience", "2"])
    assert flags(seen["full+bn-eval"]) == ("full", ["--bn", "eval", "--patience", "2"])
    assert flags(seen["gradual"]) == ("gradual", ["--patience", "2"])
    assert set(suite.AUTO_VARIANTS) <= set(suite.variants(quick=False))


def test_another_backbone_runs_layerwise_alone_into_its_own_runs(tmp_path, monkeypatch):
    """--model squeezenet1_1: no competitor (their scripts load Lite0), no --bn eval twin (no
    BatchNorm: it would repeat the default run), and its own run folders and --model flag."""
    import json

    import suite

    seen = {}

    def fake_child(cmd):
        run = Path(cmd[cmd.index("--out") + 1])
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text(json.dumps({"elapsed_seconds": 1.0, "val_acc": 0.5, "epoch": 0}) + "\n")
        seen[run.name] = cmd
        return "", 1.0, None

    names = suite.variants(quick=False, model="squeezenet1_1")
    assert not {"plain", "fastai", "fastai-lrfind"} & set(names) and not any("+bn-eval" in v for v in names)
    assert {"auto", "full", "lp-ft", "head"} <= set(names)
    lite2 = suite.variants(quick=False, model="efficientnet_lite2")  # BatchNorm: its --bn eval twins run
    assert "full+bn-eval" in lite2 and "plain" not in lite2
    monkeypatch.setattr(suite, "ROOT", tmp_path)
    monkeypatch.setattr(suite, "run_child", fake_child)
    suite.run_layerwise("ds", tmp_path, "full", 0, 112, (4, 32, 2, ""), "squeezenet1_1")
    cmd = seen["full-112px-seed0-squeezenet1_1"]
    assert cmd[cmd.index("--model") + 1] == "squeezenet1_1"


def test_fit_command_is_a_command_layerwise_parses(tmp_path):
    """Every bench script builds its fit through suite.fit_command: a renamed flag fails here, not
    an hour into a suite run."""
    import suite

    from layerwise.cli import build_parser

    cmd = suite.fit_command(tmp_path, model="efficientnet_lite1", strategy="discriminative", seed=3, img=112,
                            b=(5, 16, 2, "why"), out=tmp_path / "run", extra=["--bn", "eval", "--reg", "l2sp:0.01"])
    args = build_parser().parse_args(cmd[cmd.index("fit"):])
    assert (args.model, args.strategy, args.bn, args.seed, args.img_size) == ("efficientnet_lite1", "discriminative", "eval", 3, 112)
    assert (args.epochs, args.batch_size, args.patience, args.workers) == (5, 16, 2, 1)
    assert args.quiet and args.overwrite and args.out == str(tmp_path / "run")
    no_patience = suite.fit_command(tmp_path, model="m", strategy="full", seed=0, img=64, b=(5, 16, None, ""), out=tmp_path)
    assert "--patience" not in no_patience


def test_a_run_with_tta_views_records_its_score_without_them_and_the_views_apart():
    """auto runs with --tta auto: "test" stays the score without views (comparable with every
    other run), and "tta" holds the views' own score, image by image."""
    import suite

    plain = suite.test_record({"test_acc": 0.5, "correct": {"b/2": 0, "a/1": 1}})
    assert plain == {"test": 0.5, "test_correct": "10"}
    both = suite.test_record({"test_acc": 1.0, "views": ["hflip"], "correct": {"b/2": 1, "a/1": 1},
                              "without_views": {"test_acc": 0.5, "correct": {"b/2": 0, "a/1": 1}}})
    assert both == plain | {"tta": {"views": ["hflip"], "test": 1.0, "test_correct": "11"}}

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


def test_the_test_report_pairs_seeds_and_says_when_a_gap_is_noise():
    from suite import test_report

    def rec(v, seed, acc):
        return {"dataset": "x", "variant": v, "seed": seed, "img": 112, "test": acc}

    results = {i: r for i, r in enumerate([rec("auto", 0, 0.90), rec("auto", 1, 0.80), rec("auto", 2, 0.85),
                                           rec("a", 0, 0.80), rec("a", 1, 0.70), rec("a", 2, 0.75),
                                           rec("b", 0, 0.95), rec("b", 1, 0.75), rec("b", 2, 0.85)])}
    text = test_report(results, 112)
    assert "| a | 0.800 / 0.700 / 0.750 | 0.750 | +0.100 [+0.100, +0.100] |" in text  # the same gap every seed
    assert "| b | 0.950 / 0.750 / 0.850 | 0.850 | +0.000 [" in text and "(inside the noise)" in text

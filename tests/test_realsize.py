"""The real-size benchmark's table (bench/realsize.py): time to fastai's best, speed-up, load."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from realsize import report  # noqa: E402


def _rec(variant, curve, ips, sizes=()):
    return {"dataset": "flowers", "variant": variant, "img": 224, "epochs": 3, "batch": 32, "seed": 0, "curve": curve,
            "wall": curve[-1][0] + 5, "images_per_second": ips, "sizes": list(sizes), "load": [1.0, 1.5]}


def test_report_times_each_tool_to_fastais_best_and_the_progressive_speedup():
    text = report({"f": _rec("fastai", [[100, 0.8], [200, 0.9]], 8.0),
                   "a": _rec("auto", [[30, 0.92], [120, 0.95]], 7.0, [224, 224]),
                   "p": _rec("auto+progressive", [[30, 0.85], [80, 0.94]], 12.0, [112, 224]),
                   "x": _rec("plain", [[90, 0.7], [180, 0.75]], 9.0)}, 224)
    assert "fastai's best: 0.900 in 205 s." in text
    assert "| auto | 1 | 0.950 | 0.950 | 125 | 30 | 0.15 | 7.0 | 224 | 1.0→1.5 |" in text
    assert "| auto+progressive | 1 | 0.940 | 0.940 | 85 | 80 | 0.39 | 12.0 | 112→224 |" in text
    assert "| plain | 1 | 0.750 | 0.750 | 185 | never | - |" in text
    assert "×1.71 training img/s, best val acc -0.010" in text

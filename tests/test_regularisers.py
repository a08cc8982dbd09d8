"""bench/regularisers.py: the committed report is recomputed from its recorded runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def test_the_committed_regulariser_report_is_recomputed_from_its_json():
    from regularisers import report

    records = json.loads((RESULTS / "regularisers.json").read_text())
    text = (RESULTS / "regularisers.md").read_text()
    dataset = next(iter(records.values()))["dataset"]
    assert report(records, dataset) == text
    assert "| none |" in text and "| cotune:2.3 |" in text

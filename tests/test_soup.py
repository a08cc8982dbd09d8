"""Model soups (soup.py) and ``compare --soup``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY
from layerwise.cli import main
from layerwise.soup import average, greedy_soup


def test_average_is_the_mean_and_keeps_counters():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(7)}
    out = average([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0])) and out["n"].item() == 5
    with pytest.raises(ValueError, match="one architecture"):
        average([a, {"v": torch.zeros(2)}])


def test_greedy_soup_keeps_only_ingredients_that_help_on_val():
    states = [{"w": torch.tensor([float(i)])} for i in range(4)]
    # val accuracy of a state: best when its weight is near 1.0
    score = lambda s: 1.0 - abs(s["w"].item() - 1.0) / 10  # noqa: E731
    soup = greedy_soup(states, [0.5, 0.9, 0.8, 0.1], score)
    # best single run first (index 1, w=1); adding w=2 (mean 1.5) or w=0 (mean 0.5 with [1]) lowers the score
    assert soup.members == (1,) and soup.val_acc == 1.0 and [t[2] for t in soup.tried] == [True, False, False, False]
    flat = greedy_soup(states, [0.5, 0.9, 0.8, 0.1], lambda s: 0.7)  # ties: ingredients are kept
    assert flat.members == (1, 2, 0, 3) and torch.equal(flat.state["w"], torch.tensor([1.5]))


def test_compare_soup_writes_a_run_folder_that_evaluates_like_a_run(data, tmp_path):
    from layerwise.inference import evaluate_run

    out = tmp_path / "cmp"
    assert main(["compare", str(data), *TINY, "--strategies", "head,full", "--epochs", "2", "--out", str(out),
                 "--soup"]) == 0
    record = json.loads((out / "soup" / "soup.json").read_text())
    members = [load_file(f"{m}/best.safetensors") for m in record["members"]]
    soup = load_file(out / "soup" / "best.safetensors")
    for k, v in soup.items():  # the soup's weights are the mean of the kept runs'
        if v.is_floating_point():
            assert torch.allclose(v, torch.stack([m[k] for m in members]).mean(0), atol=1e-6), k
    assert evaluate_run(out / "soup", str(data), precision="fp32")["accuracy"] == pytest.approx(record["val_acc"])
    assert json.loads((out / "summary.json").read_text())["soup"]["val_acc"] == record["val_acc"]
    assert "Greedy soup" in (out / "summary.md").read_text()


def test_what_settle_returns_is_scored_and_kept_and_a_known_start_is_not_scored_again():
    states = [{"w": torch.tensor([float(i)])} for i in range(3)]
    seen = []

    def score(s):
        seen.append(s["w"].item())
        return 0.9

    soup = greedy_soup(states, [0.1, 0.2, 0.3], score, settle=lambda s: {"w": s["w"] + 10}, start=(0, 0.9))
    # the start (index 0, not the best on val) is not scored; each average is scored after settle
    assert seen == [11.0, 11.0] and soup.members == (0, 2, 1)
    assert torch.equal(soup.state["w"], torch.tensor([11.0]))  # settle's state of the last average kept

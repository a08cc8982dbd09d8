"""--reg (regularise.py): L2-SP's value, its parsing, and its effect in a real fit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import TINY
from layerwise.cli import main
from layerwise.errors import LayerwiseError
from layerwise.groups import LayerGroup
from layerwise.regularise import l2sp, make_penalty, parse_reg


def _model_and_groups():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    return model, (LayerGroup("body", ("0.weight", "0.bias"), ()), LayerGroup("head", ("1.weight", "1.bias"), ()))


def test_l2sp_is_half_the_squared_distance_of_the_body_from_its_start():
    model, groups = _model_and_groups()
    penalty = l2sp(model, groups, 0.5)
    assert penalty().item() == 0.0
    with torch.no_grad():
        model[0].weight.add_(1.0)  # 12 entries, each 1 away
        model[1].weight.add_(5.0)  # the head: not pulled back
    assert penalty().item() == pytest.approx(0.5 / 2 * 12)
    model[0].weight.requires_grad_(False)  # frozen: sits where it is, no term
    assert penalty().item() == 0.0


@given(st.sampled_from(["l2sp", "l2sp:", "l2sp:x", "l2sp:-1", "nope:1", "l2sp:nan"]))
def test_bad_specs_are_user_errors_naming_the_fix(spec):
    with pytest.raises(LayerwiseError, match="l2sp"):
        parse_reg(spec)


def test_a_good_spec_parses():
    assert parse_reg("l2sp:0.01") == ("l2sp", 0.01) and make_penalty(None, *_model_and_groups()) is None


def _fit(data, run, *extra):
    return main(["fit", str(data), *TINY, "--strategy", "full", "--epochs", "2", "--out", str(run), *extra])


def test_strength_zero_is_no_regulariser_bit_for_bit(data, tmp_path):
    assert _fit(data, tmp_path / "a") == 0 and _fit(data, tmp_path / "b", "--reg", "l2sp:0") == 0
    wa, wb = (torch.load(tmp_path / r / "last" / "state.pt", weights_only=False)["model"] for r in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_strength_keeps_the_body_nearer_its_start_at_equal_steps(data, tmp_path):
    from layerwise.config import RunConfig
    from layerwise.setup import set_up_model

    assert _fit(data, tmp_path / "free") == 0 and _fit(data, tmp_path / "held", "--reg", "l2sp:100") == 0
    cfg = RunConfig(model="timm/test_efficientnet", weights="none", seed=0)
    ms = set_up_model(cfg, 3, n_train=None, images_per_class=None)  # the weights every run starts from
    model = ms.loaded.model
    start = model.state_dict()
    head = {id(p) for p in ms.groups[-1].parameters(model)}
    body = [n for n, p in model.named_parameters() if id(p) not in head]

    def distance(run):
        w = torch.load(tmp_path / run / "last" / "state.pt", weights_only=False)["model"]
        return sum(((w[k].float() - start[k].float()) ** 2).sum().item() for k in body if k in w)

    assert distance("held") < 0.5 * distance("free")

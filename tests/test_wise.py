"""WiSE-FT (wise.py): the endpoints exactly, the mixes in between, BatchNorm re-estimation that
touches only running statistics, and a choice never below either endpoint on val."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from layerwise.wise import interpolate, norm_stats_differ, wise_ft


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2)).eval()


def _endpoints() -> tuple[dict, dict]:
    zero, one = _net(0), _net(1)
    with torch.no_grad():
        zero[1].running_mean.fill_(0.5)
        one[1].running_mean.fill_(-0.5)
    return zero.state_dict(), one.state_dict()


X = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def test_the_endpoints_are_exact_and_the_middle_is_the_average():
    zero, one = _endpoints()
    assert all(torch.equal(interpolate(zero, one, 0.0)[k], zero[k]) for k in zero)
    assert all(torch.equal(interpolate(zero, one, 1.0)[k], one[k]) for k in one)
    mid = interpolate(zero, one, 0.5)
    assert torch.allclose(mid["5.weight"], (zero["5.weight"] + one["5.weight"]) / 2)
    assert torch.equal(mid["1.num_batches_tracked"], one["1.num_batches_tracked"])  # a counter is not averaged


@settings(max_examples=20, deadline=None)
@given(st.floats(0.0, 1.0))
def test_every_mix_lies_between_the_endpoints(alpha):
    zero, one = _endpoints()
    w = interpolate(zero, one, alpha)["5.weight"]
    lo, hi = torch.minimum(zero["5.weight"], one["5.weight"]), torch.maximum(zero["5.weight"], one["5.weight"])
    assert bool(((w >= lo - 1e-6) & (w <= hi + 1e-6)).all())


def test_different_architectures_are_refused():
    with pytest.raises(ValueError, match="one architecture"):
        interpolate({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 0.5)


def test_alpha_zero_and_one_reproduce_the_endpoints_logits():
    zero, one = _endpoints()
    model = _net(2)
    logits = {}

    def score(m):
        logits[len(logits)] = m(X)
        return 0.0

    wise_ft(model, zero, one, score, lambda: [X], alphas=(0.0, 1.0))
    for i, sd in enumerate((zero, one)):
        ref = _net(5)
        ref.load_state_dict(sd)
        assert torch.equal(logits[i], ref(X))


def test_re_estimation_changes_only_running_statistics():
    zero, one = _endpoints()
    model = _net(2)
    seen = []
    wise_ft(model, zero, one, lambda m: seen.append({k: v.clone() for k, v in m.state_dict().items()}) or 0.0,
            lambda: [X], alphas=(0.5,))
    mixed, plain = seen[0], interpolate(zero, one, 0.5)
    for k in plain:
        same = torch.equal(mixed[k], plain[k])
        assert same != k.endswith(("running_mean", "running_var", "num_batches_tracked")), k


def test_equal_statistics_are_kept_as_they_are():
    """After --bn eval both endpoints hold the pretrained statistics: nothing to re-estimate."""
    zero, one = _endpoints()
    one = dict(one) | {k: zero[k] for k in ("1.running_mean", "1.running_var")}
    assert not norm_stats_differ(_net(2), zero, one) and norm_stats_differ(_net(2), *_endpoints())


def test_the_choice_is_never_below_either_endpoint_and_ties_go_to_the_fine_tune():
    zero, one = _endpoints()
    accs = iter([0.80, 0.70, 0.80, 0.82, 0.78])  # in the order scored: 1, 0, .75, .5, .25
    res, best = wise_ft(_net(2), zero, one, lambda m: next(accs), lambda: [X])
    assert res.alphas == (0.0, 0.25, 0.5, 0.75, 1.0) and res.val_acc == (0.70, 0.78, 0.82, 0.80, 0.80)
    assert res.alpha == 0.5 and max(res.val_acc) == 0.82
    accs = iter([0.9, 0.9, 0.9, 0.8])
    res, best = wise_ft(_net(2), zero, one, lambda m: next(accs), lambda: [X])
    assert res.alpha == 1.0 and all(torch.equal(best[k], one[k]) for k in one)


def test_the_walk_stops_at_the_first_mix_that_loses():
    """A fine-tune that left the probe's basin (full on gtsrb: 0.82, then 0.58 at 0.75) costs
    one mix and one re-estimation, not three."""
    zero, one = _endpoints()
    accs = iter([0.82, 0.62, 0.58])
    recals = []
    res, _ = wise_ft(_net(2), zero, one, lambda m: next(accs), lambda: recals.append(1) or [X])
    assert res.alphas == (0.0, 0.75, 1.0) and res.alpha == 1.0 and len(recals) == 1
    # the probe endpoint wins: kept, still only one mix tried
    accs = iter([0.60, 0.70, 0.50])
    res, _ = wise_ft(_net(2), zero, one, lambda m: next(accs), lambda: [X])
    assert res.alphas == (0.0, 0.75, 1.0) and res.alpha == 0.0


@given(st.lists(st.floats(0, 1), min_size=5, max_size=5))
def test_the_walk_never_scores_twice_and_always_scores_both_endpoints(values):
    zero, one = _endpoints()
    accs = iter(values)
    res, _ = wise_ft(_net(2), zero, one, lambda m: next(accs), lambda: [X])
    assert res.alphas[0] == 0.0 and res.alphas[-1] == 1.0 and len(set(res.alphas)) == len(res.alphas)
    assert res.val_acc[res.alphas.index(res.alpha)] == max(res.val_acc)


def test_the_models_own_state_dict_may_be_an_endpoint():
    """A state dict aliases its model's tensors; loading the first mix must not change the
    endpoint passed in."""
    zero, _ = _endpoints()
    model = _net(7)
    one = model.state_dict()  # aliases model's tensors
    want = {k: v.clone() for k, v in one.items()}
    logits = []
    wise_ft(model, zero, one, lambda m: logits.append(m(X)) or 0.0, lambda: [X], alphas=(0.0, 1.0))
    ref = _net(5)
    ref.load_state_dict(want)
    assert torch.equal(logits[1], ref(X))


def test_a_known_fine_tune_score_is_not_scored_again():
    model = nn.Linear(2, 2)
    zero, one = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}, model.state_dict()
    scored = []
    res, _ = wise_ft(model, zero, one, lambda m: scored.append(m.weight.abs().sum().item()) or 0.5, lambda: [],
                     one_acc=0.7)
    assert res.val_acc[res.alphas.index(1.0)] == 0.7 and res.alpha == 1.0
    assert len(scored) == len(res.alphas) - 1  # alpha 0 and the walk's one mix, not alpha 1

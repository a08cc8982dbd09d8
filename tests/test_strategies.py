from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layerwise.errors import LayerwiseError, UnknownNameError
from layerwise.strategies import (
    AUTO_FAR,
    AUTO_NEAR,
    RECIPE_SETTINGS,
    STRATEGIES,
    StrategyOptions,
    auto_choice,
    geometric_mults,
    make_strategy,
    tutorial_differential_mults,
)

RESNET = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def trainable(strategy, epoch):
    return [n for n, s in strategy.states(epoch).items() if s.trainable]


@given(st.integers(1, 30), st.floats(1.0, 10.0))
def test_geometric_decay_formula(n, decay):
    names = [f"g{i}" for i in range(n)]
    mults = geometric_mults(names, decay)
    assert mults[names[-1]] == 1.0
    for i, name in enumerate(names):
        assert mults[name] == pytest.approx(1 / decay ** (n - 1 - i))


def test_tutorial_factor_gives_the_right_lrs():
    # The tutorial prints 1e-1 for fc with base 1e-3 and factor 0.1; the head gets the base.
    lrs = {n: 1e-3 * m for n, m in geometric_mults(RESNET, 10).items()}
    assert lrs["head"] == pytest.approx(1e-3) and lrs["stem"] == pytest.approx(1e-8)


def test_decay_below_one_is_rejected():
    with pytest.raises(LayerwiseError, match="decay must be >= 1"):
        geometric_mults(RESNET, 0.5)


def test_tutorial_differential_map_on_resnet():
    m = tutorial_differential_mults(RESNET)
    assert {n: 1e-3 * v for n, v in m.items()} == pytest.approx(
        {"stem": 1e-5, "layer1": 1e-5, "layer2": 1e-4, "layer3": 1e-4, "layer4": 5e-4, "head": 1e-3})


def test_head_partial_full():
    assert trainable(make_strategy("head", RESNET), 0) == ["head"]
    assert trainable(make_strategy("partial", RESNET), 0) == ["layer3", "layer4", "head"]
    opts = StrategyOptions(from_group="layer2")
    assert trainable(make_strategy("partial", RESNET, opts), 3) == ["layer2", "layer3", "layer4", "head"]
    assert trainable(make_strategy("full", RESNET), 0) == RESNET


def test_gradual_every_k_is_cumulative_from_the_top():
    s = make_strategy("gradual", RESNET, StrategyOptions(epochs=12, every=2))
    assert trainable(s, 0) == trainable(s, 1) == ["head"]
    assert trainable(s, 2) == ["layer4", "head"]
    assert trainable(s, 10) == RESNET


def test_gradual_tutorial_schedule():
    sched = {0: "head", 2: "layer4", 4: "layer3", 6: "layer2"}
    s = make_strategy("gradual", RESNET, StrategyOptions(epochs=8, schedule=sched))
    assert trainable(s, 3) == ["layer4", "head"]
    assert trainable(s, 7) == ["layer2", "layer3", "layer4", "head"]  # stem, layer1 never


@pytest.mark.parametrize("sched,msg", [
    ({0: "head", 2: "layer2", 4: "layer4"}, "from the head down"),
    ({0: "head", 2: "layer4", 4: "layer4"}, "more than once"),
    ({0: "head", 2: "layer9"}, "unknown group"),
])
def test_gradual_schedule_errors(sched, msg):
    with pytest.raises(LayerwiseError, match=msg):
        make_strategy("gradual", RESNET, StrategyOptions(schedule=sched))


def test_lp_ft_switches_after_probe():
    s = make_strategy("lp-ft", RESNET, StrategyOptions(epochs=6, probe_epochs=2, ft_lr_mult=0.1))
    assert trainable(s, 1) == ["head"]
    assert trainable(s, 2) == RESNET
    assert {x.lr_mult for x in s.states(2).values()} == {0.1}


def test_recipe_is_the_tutorials():
    s = make_strategy("recipe", RESNET)
    st0 = s.states(0)
    assert trainable(s, 0) == ["layer3", "layer4", "head"]
    assert (st0["layer3"].lr_mult, st0["layer4"].lr_mult, st0["head"].lr_mult) == (0.1, 0.5, 1.0)
    assert s.overrides == RECIPE_SETTINGS and s.overrides["head"] == "mlp" and s.overrides["label_smoothing"] == 0.1


def test_differential_map_and_missing_groups_frozen():
    s = make_strategy("differential", RESNET, StrategyOptions(lr_map={"layer4": 0.1, "head": 1.0}))
    assert trainable(s, 0) == ["layer4", "head"]
    with pytest.raises(UnknownNameError):
        make_strategy("differential", RESNET, StrategyOptions(lr_map={"fc": 1.0}))


def test_wd_map_sets_per_group_weight_decay():
    s = make_strategy("full", RESNET, StrategyOptions(wd_map={"head": 1e-2}))
    assert s.states(0)["head"].weight_decay == 1e-2 and s.states(0)["stem"].weight_decay is None


@pytest.mark.parametrize("n,expected", [(10, "head"), (100, "gradual"), (1000, "discriminative")])
def test_auto_without_probe_follows_the_table(n, expected):
    choice, reason = auto_choice(n, 10)
    assert choice == expected and str(n) in reason
    s = make_strategy("auto", RESNET, StrategyOptions(images_per_class=n, num_classes=10))
    assert s.name == f"auto:{expected}" and s.reason


@pytest.mark.parametrize("n,skill,expected", [
    (20, 0.95, "lp-ft"),  # features that already fit: keep them, whatever the size
    (144, 0.95, "lp-ft"),  # the digits: lp-ft 0.975 = discriminative 0.975 > gradual 0.953 > head 0.916
    (5000, 0.92, "lp-ft"),
    (20, 0.45, "discriminative"),  # cifar10-mini, 20 per class: discriminative 0.485, gradual 0.499, head 0.361
    (20, 0.84, "discriminative"),  # digits, 20 per class: discriminative 0.860, gradual 0.834, head 0.642
    (100, 0.59, "discriminative"),  # cifar10-mini at 64 px: the body has to adapt
    (50, 0.54, "discriminative"),
    (31, 0.89, "discriminative"),
])
def test_auto_uses_the_probe(n, skill, expected):
    choice, reason = auto_choice(n, 10, skill)
    assert choice == expected
    assert f"skill {skill:.2f}" in reason and f"{n} images per class" in reason
    s = make_strategy("auto", RESNET, StrategyOptions(images_per_class=n, num_classes=10, probe_skill=skill))
    assert s.name == f"auto:{expected}" and dict(s.overrides) == {"bn": "eval"}


@pytest.mark.parametrize("skill,shift,expected", [
    (0.58, 0.36, "full"),  # traffic signs at 96 px: full 0.826, discriminative+bn-eval 0.728
    (0.94, 0.44, "full"),  # the digits: a high skill, yet full 0.986 > lp-ft 0.967
    (0.80, 0.44, "full"),  # blood cells: full 0.938 > discriminative+bn-eval 0.870
    (0.65, 0.27, "discriminative"),  # CIFAR photos: discriminative+bn-eval 0.774 > full 0.672
    (0.99, 0.23, "lp-ft"),  # natural objects
    (0.90, None, "lp-ft"),  # no BatchNorm to compare with: the skill alone decides
])
def test_auto_trains_everything_on_batch_statistics_when_the_data_is_far(skill, shift, expected):
    choice, reason = auto_choice(100, 10, skill, shift)
    assert choice == expected and (shift is None or ("BatchNorm shift" in reason) == (expected == "full"))
    s = make_strategy("auto", RESNET, StrategyOptions(images_per_class=100, num_classes=10, probe_skill=skill,
                                                      bn_shift=shift))
    # far: the default --bn (batch statistics wherever a group trains); near: the pretrained ones
    assert dict(s.overrides) == ({} if expected == "full" else {"bn": "eval"})
    assert s.trains_from_probe == (expected == "lp-ft")  # only lp-ft's gentle fine-tune starts from the probe
    if expected == "full":
        assert all(g.trainable and g.lr_mult == 1 for g in s.states(0).values())


@pytest.mark.parametrize("shift,other", [(0.308, "--strategy discriminative --bn eval"), (0.28, "--strategy full")])
def test_auto_says_when_the_shift_is_a_near_call_and_names_the_other_side(shift, other):
    _, reason = auto_choice(100, 10, 0.7, shift)
    assert "near call" in reason and other in reason
    _, clear = auto_choice(100, 10, 0.7, AUTO_FAR + 3 * AUTO_NEAR)
    assert "near call" not in clear


@given(st.one_of(st.none(), st.floats(0, 1e6)), st.one_of(st.none(), st.floats(-1, 1)),
       st.one_of(st.none(), st.floats(0, 1000)))
def test_auto_always_picks_one_of_its_five(n, skill, shift):
    choice, reason = auto_choice(n, 10, skill, shift)
    assert choice in {"head", "lp-ft", "gradual", "discriminative", "full"} and reason
    if skill is not None:
        assert "probe" in reason
    assert (choice == "full") == (skill is not None and shift is not None and shift >= AUTO_FAR)


def test_unknown_strategy_lists_registry():
    with pytest.raises(UnknownNameError) as e:
        make_strategy("freeze-all", RESNET)
    assert all(k in str(e.value) for k in STRATEGIES)


@given(st.sampled_from(sorted(STRATEGIES)), st.integers(2, 20), st.integers(1, 20))
def test_every_strategy_trains_the_head_and_is_pure(name, n_groups, epochs):
    names = [f"g{i}" for i in range(n_groups - 1)] + ["head"]
    s = make_strategy(name, names, StrategyOptions(epochs=epochs, images_per_class=50))
    for e in range(epochs):
        states = s.states(e)
        assert list(states) == names and states["head"].trainable
        assert states == s.states(e)  # pure: same epoch, same answer
        prev = set(trainable(s, e - 1)) if e else set()
        assert prev <= set(trainable(s, e))  # nothing re-freezes

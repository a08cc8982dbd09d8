"""What the race costs (racecost.py): the bound at any sizes and limit, and what gtsrb's
held-out split affords with the costs measured there."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layerwise import race, racecost


@given(st.integers(1, 60), st.integers(2, 100_000), st.integers(1, 20_000), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from(["discriminative", "full", "lp-ft"]), st.floats(1, 4), st.sampled_from([1.0, 0.5, 0.25]))
def test_a_race_costs_at_most_its_limit_probe_soup_and_wise_ft_included(epochs, n_train, n_val, probe, wise, soup, fav,
                                                                         limit, rung):
    order, costs = race.ordered(fav), racecost.COSTS
    parts = {"probe": probe, "wise": wise, "soup": soup, "rung": rung}
    raced = racecost.affordable(order, epochs, n_train, n_val, costs, **parts, limit=limit)
    if raced:
        assert raced[0] == order[0] and len(raced) >= 2 and all(c in order for c in raced)
        losers = len(raced) - 1 if soup else 0
        # both auto and the fixed run it is measured against end with one val pass of their best weights
        end = 0.4 * n_val / (n_train + 0.4 * n_val)
        cost = (racecost.overhead(n_train, n_val, costs, probe=probe, wise=wise, soup_losers=losers)
                + (epochs - rung) + end
                + sum(racecost.rung_cost(n_train, n_val, costs, rung=rung, first=i == 0, norm=i == 0)
                      for i in range(len(raced))))
        assert cost <= limit * (epochs + end) + 1e-9
        assert (racecost.estimate(raced, epochs, n_train, n_val, costs, **parts, order=order) * (epochs + end)
                == pytest.approx(cost))
    # whether a race happens does not depend on the favourite: it can be known before the probe
    assert all(bool(racecost.affordable(race.ordered(f), epochs, n_train, n_val, costs, **parts,
                                        limit=limit)) == bool(raced) for f in ("discriminative", "full", "lp-ft"))
    # a higher limit never races fewer
    more = racecost.affordable(order, epochs, n_train, n_val, costs, **parts, limit=limit + 0.5)
    assert len(more) >= len(raced)


def test_one_rung_per_candidate_on_batch_statistics_is_priced_with_a_re_estimation():
    """full trains on batch statistics, the others at --bn eval: a race prices one re-estimation
    whoever is the favourite; a --bn the user gives holds for all three."""
    for fav in ("discriminative", "full", "lp-ft"):
        assert [racecost.norm_rungs(race.ordered(fav), k) for k in (2, 3)] == [1, 1]
        assert [racecost.norm_rungs(race.ordered(fav, "eval"), k) for k in (2, 3)] == [0, 0]
        assert [racecost.norm_rungs(race.ordered(fav, "train"), k) for k in (2, 3)] == [2, 3]
    plain = racecost.rung_cost(1000, 250)
    assert racecost.rung_cost(1000, 250, norm=True) - plain == pytest.approx(0.4 * 256 / (1000 + 0.4 * 250))
    assert racecost.rung_cost(100, 25, norm=True) - racecost.rung_cost(100, 25) == pytest.approx(0.4 * 100 / 110)


def test_each_loser_in_the_soup_costs_a_val_pass_and_a_re_estimation():
    """A soup of k racers scores k - 1 averages on val (250 images), each after BatchNorm
    re-estimation on 512 training images: 0.4 of a step per image passed forward."""
    one = racecost.overhead(1000, 250, racecost.COSTS, probe=False, wise=False, soup_losers=1)
    two = racecost.overhead(1000, 250, racecost.COSTS, probe=False, wise=False, soup_losers=2)
    epoch = 1000 + 0.4 * 250
    assert two - one == pytest.approx(0.4 * (250 + 512) / epoch)
    assert one == pytest.approx(0.4 * (250 + 250 + 512) / epoch)  # the winner's own val score, then one average


def test_what_gtsrbs_held_out_split_affords():
    """1,000 training and 250 val images, the costs measured there (race-cost.md): at 3 epochs
    no race (the probe alone is an epoch); at 4 two race for half an epoch each, from 5 for an
    epoch (lp-ft's rung too, from the probe's head); 8 race three (one rung, full's,
    re-estimates its BatchNorm statistics). The averaging comes after the race and only where
    it still fits: at 6 WiSE-FT, at 7 both (at 8, a third racer takes their room again)."""
    def at(epochs, limit=1.5):
        p = racecost.plan(race.ordered("full"), epochs, 1000, 250, racecost.COSTS, probe=True, wise=True, soup=True,
                          limit=limit)
        return [c.strategy for c in p.raced], p.rung if p.raced else None, p.wise, p.soup
    assert racecost.COSTS == racecost.Costs(forward=0.4, probe=0.9, setup=150)
    two, three = ["full", "discriminative"], ["full", "discriminative", "lp-ft"]
    assert [at(e) for e in (3, 4, 5, 6, 7, 8, 9, 10)] == [
        ([], None, False, False), (two, 0.5, False, False), (two, 1.0, False, False), (two, 1.0, True, False),
        (two, 1.0, True, True), (three, 1.0, False, False), (three, 1.0, True, False), (three, 1.0, True, True)]
    # --race-cost 2.5: a user who would rather measure than save time races all three at 4 epochs, and averages
    assert at(4, limit=2.5) == (three, 1.0, True, True)


@given(st.integers(1, 60), st.integers(2, 100_000), st.integers(1, 20_000), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from(["discriminative", "full", "lp-ft"]), st.floats(1, 4))
def test_the_plan_keeps_its_bound_and_races_whatever_the_averaging_and_the_favourite(epochs, n_train, n_val, probe,
                                                                                      wise, soup, fav, limit):
    def at(f, w, s):
        return racecost.plan(race.ordered(f), epochs, n_train, n_val, racecost.COSTS, probe=probe, wise=w, soup=s,
                             limit=limit)
    p = at(fav, wise, soup)
    assert p.cost <= limit + 1e-9 and (p.wise <= wise) and (p.soup <= soup)
    assert (p.wise or p.soup) <= bool(p.raced)  # averaging only after a race
    assert all(bool(at(f, w, s).raced) == bool(p.raced) for f in ("discriminative", "full", "lp-ft")
               for w in (False, True) for s in (False, True))
    if p.raced:
        assert p.cost == pytest.approx(racecost.estimate(p.raced, epochs, n_train, n_val, racecost.COSTS, probe=probe,
                                                         wise=p.wise, soup=p.soup, order=race.ordered(fav),
                                                         rung=p.rung))
        assert p.rung == max(r for r in racecost.RUNGS if racecost.affordable(
            race.ordered(fav), epochs, n_train, n_val, racecost.COSTS, probe=probe, wise=False, soup=False, limit=limit,
            rung=r))  # the longest rung that races
    assert racecost.overhead(1000, 250, racecost.COSTS, probe=False, wise=False) == 0.0


def test_the_sizes_that_afford_no_race_are_the_docs():
    """docs/strategies.md names the training-set sizes where auto's own budget affords no race
    at the default bound (val a quarter of train): recomputed here from budget and racecost."""
    from pathlib import Path

    from layerwise.budget import auto_batch, auto_epochs
    order = race.ordered("discriminative", None)

    def races(n: int) -> bool:
        epochs = auto_epochs(n, auto_batch(n))
        return bool(racecost.plan(order, epochs, n, n // 4, racecost.COSTS, probe=True, wise=False, soup=False, limit=1.5).raced)

    bands, start = [], None
    for n in range(20, 3200):
        raced = races(n)
        if not raced and start is None:
            start = n
        elif raced and start is not None:
            bands.append((start, n - 1))
            start = None
    wide = [b for b in bands if b[1] - b[0] >= 10]  # the docs name these; "a few sizes beside them" the rest
    assert wide == [(192, 255), (480, 511)]
    assert sum(b[1] - b[0] + 1 for b in bands if b not in wide) <= 10
    assert all(races(n) for n in range(3200, 100_001, 997))
    docs = " ".join((Path(__file__).resolve().parents[1] / "docs/strategies.md").read_text().split())
    assert "except at 192–255 and 480–511 training images" in docs
    # with rungs of an epoch only, as before half-epoch rungs
    assert not any(racecost.plan(order, auto_epochs(n, auto_batch(n)), n, n // 4, racecost.COSTS, probe=True,
                                 wise=False, soup=False, limit=1.5, rungs=(1.0,)).raced for n in (160, 384, 960, 1920, 2830))
    assert "An epoch's rungs alone would leave 160–255, 384–511, 960–1,023 and 1,920–2,830 without a race" in docs


def test_the_race_takes_the_longest_rung_that_affords_one():
    """2,000 training and 500 val images over 4 epochs: rungs of an epoch cost 1.57x one run,
    probe included, and afford no race within 1.5x; rungs of half an epoch cost 1.47x. At 5
    epochs an epoch's rungs fit and are taken."""
    order, kw = race.ordered("discriminative"), {"probe": True, "wise": False, "soup": False, "limit": 1.5}
    assert not racecost.plan(order, 4, 2000, 500, **kw, rungs=(1.0,)).raced
    half = racecost.plan(order, 4, 2000, 500, **kw, rungs=(1.0, 0.5))
    assert half.rung == 0.5 and len(half.raced) == 2 and half.cost == pytest.approx(1.467, abs=1e-3)
    assert racecost.plan(order, 5, 2000, 500, **kw, rungs=(1.0, 0.5)).rung == 1.0
    assert not racecost.plan(order, 4, 2000, 500, **(kw | {"limit": 1.2}), rungs=(1.0, 0.5)).raced


def _suite_sizes() -> dict[str, tuple[int, int]]:
    """Each suite dataset's training images and the val half that bench/suite.py's held_out
    keeps (each val class's first half by file name's SHA-1: len // 2 of it)."""
    from collections import Counter

    from conftest import SHARED_DATA
    from layerwise.data import digits, load_splits

    folders = {p.name: p for p in sorted((SHARED_DATA / "suite").iterdir()) if (p / "train").is_dir()}
    folders["cifar10-mini"] = SHARED_DATA / "cifar10-mini"
    out = {name: (len(load_splits(str(p)).train),
                  sum(sum(f.is_file() for f in c.iterdir()) // 2 for c in (p / "val").iterdir() if c.is_dir()))
           for name, p in folders.items()}
    d = digits()
    out["digits"] = (len(d.train), sum(n // 2 for n in Counter(label for _, label in d.val).values()))
    return out


def test_what_the_suites_held_out_splits_afford():
    """docs/strategies.md says how each suite dataset's held-out split races at auto's own budget
    and the default bound: recomputed from the datasets' sizes (fails if a size, the budget rule
    or the price moves the plan the docs describe)."""
    from pathlib import Path

    from layerwise.budget import auto_batch, auto_epochs

    sizes = _suite_sizes()
    assert len(sizes) == 8
    epochs = {k: auto_epochs(n, auto_batch(n)) for k, (n, _) in sizes.items()}
    plans = {k: racecost.plan(race.ordered("discriminative", None), epochs[k], n, v, racecost.COSTS, probe=True,
                              wise=True, soup=True, limit=1.5) for k, (n, v) in sizes.items()}
    assert all(len(p.raced) == 2 for p in plans.values())
    assert {k for k, p in plans.items() if p.rung == 0.5} == {"gtsrb", "cifar10-mini", "fashion-mnist"}
    assert all(sizes[k][0] == 1000 and epochs[k] == 4 for k, p in plans.items() if p.rung == 0.5)
    assert {k for k, p in plans.items() if p.wise} == {"dtd", "digits"}
    assert {k for k, p in plans.items() if p.soup} == {"digits"}
    lo, hi = min(epochs.values()), max(epochs.values())
    small, large = min(n for n, _ in sizes.values()), max(n for n, _ in sizes.values())
    docs = " ".join((Path(__file__).resolve().parents[1] / "docs/strategies.md").read_text().split())
    assert (f"Of the suite's held-out budgets ({lo}–{hi} epochs of {small:,}–{large:,} images), all race two at 1.5x: "
            "gtsrb, cifar10-mini and fashion-mnist (4 epochs of 1,000) for half an epoch, the others for an epoch "
            "(dtd then affords WiSE-FT, the digits both averagings)") in docs

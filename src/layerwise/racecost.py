"""What auto's race costs, priced before it runs: each part in training steps of one image,
from the images it passes forward, so :func:`plan` can keep the whole run within
``--race-cost`` runs of one fixed strategy, probe, soup and WiSE-FT included (issue 22's bound)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from layerwise.probe import PROBE_MAX_IMAGES


@dataclass(frozen=True)
class Candidate:
    name: str  # its run folder under RUN/race/
    strategy: str
    bn: str | None  # None: the strategy's default


# One epoch of each candidate's own schedule. Set on the suite's 112-px runs (2 seeds x 8
# datasets, bench/results/suite.json; docs/strategies.md): the leader after epoch 1 of
# {discriminative --bn eval, full, lp-ft --bn eval} was the final best 10 times in 16, and its
# final best val accuracy trailed the best by 0.5 points on average (2.8 at most: digits, where
# full starts slowest); after epoch 2, 0.3; after epoch 3, 0.04 (best val accuracy on the split
# that picked the epoch: development figures, inside one val set's 1.5-2.3-point standard error).
# The threshold rule, fitted on the other seven datasets each time, trailed the best of all nine
# fixed variants (a wider field than these three) by 1.3.
RUNG_EPOCHS = 1.0
# The rung lengths a race may take, in epochs, longest first: it takes the longest whose race of
# two fits --race-cost. Half an epoch races where the probe (about an epoch) leaves no room for
# an epoch's rungs: at the default bound, most sizes of 1,920-2,830 and 960-1,023 training
# images and some of 160-255 and 384-511 (tests/test_racecost.py). Set on the held-out splits of caltech101,
# cifar10-mini, digits, dtd, flowers17, gtsrb and pbc-blood (Lite0, 112 px, seeds 0 and 1;
# bench/results/rung-schedule.md): the leader of the three after half an epoch of its own
# schedule, scored as the race scores it, ended best as often as after a whole epoch (7 of 14,
# regret 1.4 points on average, 4.4 at most, both), the same candidate on 13, a tie at the end
# on the fourteenth. Shorter rungs were not measured.
RUNGS: tuple[float, ...] = (RUNG_EPOCHS, 0.5)
# Training images for a rung's BatchNorm statistics, for a candidate on batch statistics (race.py):
# mid-schedule, at a high LR, its running statistics lag its weights. On the digits' held-out
# split (112 px, seed 0) full's rung scored 0.528 on val with its running statistics and 0.933 /
# 0.938 / 0.938 after re-estimation on 128 / 256 / 512 images (discriminative --bn eval's rung:
# 0.904); at the end of the same run re-estimation changed nothing (0.994 both ways).
RUNG_NORM_IMAGES = 256
# Training images for a mix's BatchNorm statistics, spread over the classes. The 0.5 mix of
# full's winner on gtsrb's held-out split (112 px) scored 0.264 / 0.296 / 0.304 on val after
# 32 / 256 / all 1,000; each image is a forward pass, paid once per mix.
WISE_NORM_IMAGES = 512


@dataclass(frozen=True)
class Costs:
    """The race's parts in training steps of one image (forward and backward)."""

    forward: float  # an image's forward pass alone
    probe: float  # per image the probe reads: forward, BatchNorm-shift hooks and its C search's fits
    setup: float  # a candidate's set-up beyond the first (model, loaders), and WiSE-FT's probe model


# Measured on gtsrb's held-out split (1,000 training and 250 val images, Lite0, 112 px, 2-core
# CPU, 2 runs each; bench/results/race-cost.md), where one step took 11.5 ms: lp-ft's head-only
# rung took 0.40 of full's; a set-up about 1.7 s (decoded images are shared). The probe took 18 s
# then (1.25 steps per image); since its C search walks warm (commit fc1784d), 10.5 and 11.7 s
# against epochs of 10.1-12.0 s (a step 10.1 ms): 0.88 steps per image, priced at 0.9.
COSTS = Costs(forward=0.4, probe=0.9, setup=150)


def _epoch(n_train: int, n_val: int, costs: Costs) -> float:
    """One epoch in steps: every training image, then val's forward passes."""
    return n_train + costs.forward * n_val


def rung_cost(n_train: int, n_val: int, costs: Costs = COSTS, *, rung: float = RUNG_EPOCHS, first: bool = False,
              norm: bool = False) -> float:
    """A candidate's rung in epochs of one run: ``rung`` epochs of training (lp-ft's too: it starts
    from the probe's head, race.candidate_config), two val passes (lp-ft's probe row and the
    rung's own: priced alike for every candidate, so whether a race happens never depends on
    the favourite), after the first candidate its set-up, and with ``norm`` a BatchNorm
    re-estimation before its score."""
    steps = (rung * n_train + 2 * costs.forward * n_val + (0 if first else costs.setup)
             + (costs.forward * min(n_train, RUNG_NORM_IMAGES) if norm else 0))
    return steps / _epoch(n_train, n_val, costs)


def on_batch_statistics(bn: str | None) -> bool:
    """Whether a candidate at this ``--bn`` moves its BatchNorm running statistics as it trains
    (every mode but ``eval``), so that its rung is scored after re-estimating them."""
    return bn != "eval"


def norm_rungs(order: Sequence[Candidate], raced: int) -> int:
    """Rungs priced with a BatchNorm re-estimation in a race of ``raced`` candidates from
    ``order``: one per candidate on batch statistics in the whole order, at most one per rung,
    so the price never depends on which candidate is the favourite."""
    return min(raced, sum(on_batch_statistics(c.bn) for c in order))


def overhead(n_train: int, n_val: int, costs: Costs = COSTS, *, probe: bool, wise: bool, soup_losers: int = 0) -> float:
    """The probe and the averaging after the race, in epochs of one run. The probe reads the
    training images and val. Averaging scores the winner on val once; the soup (averaging.py)
    scores one average per loser, each with its BatchNorm statistics re-estimated; WiSE-FT builds
    the probe model, scores its endpoint and one mix (its usual walk: wise.walk) and re-estimates
    BatchNorm once."""
    norm = min(n_train, WISE_NORM_IMAGES)
    probe_steps = costs.probe * (min(n_train, PROBE_MAX_IMAGES) + min(n_val, PROBE_MAX_IMAGES)) if probe else 0.0
    winner = costs.forward * n_val if wise or soup_losers else 0.0
    soup_steps = costs.forward * soup_losers * (n_val + norm)
    wise_steps = costs.forward * (2 * n_val + norm) + costs.setup if wise else 0.0
    return (probe_steps + winner + soup_steps + wise_steps) / _epoch(n_train, n_val, costs)


def affordable(order: Sequence[Candidate], epochs: int, n_train: int, n_val: int, costs: Costs = COSTS, *,
               probe: bool, wise: bool, soup: bool, limit: float, rung: float = RUNG_EPOCHS) -> list[Candidate]:
    """The candidates raced within ``limit`` runs (--race-cost): the favourite, then each next one whose
    rung still fits ([] when fewer than two do). The whole race costs the overhead, every
    rung, and the winner's epochs after its rung (``epochs - rung`` of training whoever
    wins)."""
    raced = list(order[:1])
    for c in order[1:]:
        if estimate([*raced, c], epochs, n_train, n_val, costs, probe=probe, wise=wise, soup=soup, order=order,
                    rung=rung) <= limit:
            raced.append(c)
    return raced if len(raced) > 1 else []


def final_eval(n_train: int, n_val: int, costs: Costs = COSTS) -> float:
    """The val pass that ends every run, a fixed strategy's and auto's winner's alike (its best
    weights scored once more: loop.run_epochs), in epochs of one run."""
    return costs.forward * n_val / _epoch(n_train, n_val, costs)


def estimate(raced: Sequence[Candidate], epochs: int, n_train: int, n_val: int, costs: Costs = COSTS, *,
             probe: bool, wise: bool, soup: bool, order: Sequence[Candidate] | None = None,
             rung: float = RUNG_EPOCHS) -> float:
    """What auto's whole run costs with ``raced``, the first candidates of ``order`` (default:
    ``raced`` itself), in runs of one fixed strategy (what ``--race-cost`` bounds): the overhead,
    every rung of ``rung`` epochs (:func:`norm_rungs` of them with a BatchNorm re-estimation),
    the winner's remaining epochs. Both sides end with :func:`final_eval`; the rest of what
    both pay once (start-up, data checks, the test split's pass, the report) is left out of
    both, which only overstates the ratio."""
    norms = norm_rungs(raced if order is None else order, len(raced))
    rungs = sum(rung_cost(n_train, n_val, costs, rung=rung, first=i == 0, norm=i < norms) for i in range(len(raced)))
    losers = len(raced) - 1 if soup else 0
    end = final_eval(n_train, n_val, costs)
    return ((overhead(n_train, n_val, costs, probe=probe, wise=wise, soup_losers=losers) + rungs + epochs - rung + end)
            / (epochs + end))


@dataclass(frozen=True)
class RacePlan:
    """What auto's run does within ``--race-cost``: the candidates raced ([]: no race) and for
    how many epochs each (its rung), then which averaging runs after the race, and what the
    whole costs in runs of one strategy."""

    raced: list[Candidate]
    rung: float
    wise: bool
    soup: bool
    cost: float


def plan(order: Sequence[Candidate], epochs: int, n_train: int, n_val: int, costs: Costs = COSTS, *, probe: bool,
         wise: bool, soup: bool, limit: float, rungs: Sequence[float] = RUNGS) -> RacePlan:
    """The race first, then WiSE-FT, then the soup, each only if it still fits: the race changed
    auto's answer on the held-out suite (cifar10-mini, seed 0), while neither averaging kept
    anything but the winner in any race there (gtsrb, pbc-blood, cifar10-mini, caltech101), so
    the budget goes to measuring before mixing. Whether a race happens never depends on the
    averaging or on the favourite, so it is known before the probe. The rung is the longest of
    ``rungs`` that affords a race."""
    raced: list[Candidate] = []
    for rung in rungs:
        raced = affordable(order, epochs, n_train, n_val, costs, probe=probe, wise=False, soup=False, limit=limit,
                           rung=rung)
        if raced:
            break

    def price(w: bool, s: bool) -> float:
        return estimate(raced, epochs, n_train, n_val, costs, probe=probe, wise=w, soup=s, order=order, rung=rung)

    fits_wise = bool(raced) and wise and price(True, False) <= limit
    fits_soup = bool(raced) and soup and price(fits_wise, True) <= limit
    return RacePlan(raced, rung, fits_wise, fits_soup, price(fits_wise, fits_soup) if raced else 0.0)

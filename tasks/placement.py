"""Placement: which sites may take part in a job, and which of them each round asks, as pure functions.

``eligibility`` applies the job's policy (``placement.require`` against each site's ``tags``) once, at
job start. Each round ``choose`` then orders the eligible sites and takes them, within the job's budget,
until the round has its ``sites_per_round``:

- ``uniform``: the sites :func:`quorum.tasks.strategies.sample_sites` draws from (seed, round), then
  the others in a seeded order as stand-ins should the budget not pay for a drawn site.
- ``guided`` (after Oort, Lai et al., OSDI 2021): first the sites that would fall under the fairness
  floor (asked in ``floor(min_share x rounds)`` of the rounds so far), then sites never measured, then
  the rest by ``(utility + staleness bonus) x speed penalty``, where utility is the site's recent training loss
  times its examples (scaled by the largest), the staleness bonus ``sqrt(0.1 ln(round) / last round
  asked)`` brings back sites not asked for a while, and the speed penalty is ``(T / t) ** speed_weight``
  for a site whose expected reply time ``t`` exceeds ``T``, the time the fastest ``sites_per_round``
  sites take.

Every site of the pool gets a reason, chosen or not, so ``quorum placement explain`` can say why.
Nothing here reads a clock or a file: history and seed in, a decision out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quorum.configs.schema import PlacementConfig, SiteConfig

DURATION_EMA = 0.5  # weight of the newest measured reply time in a site's expected reply time
STALENESS = 0.1  # Oort's temporal-uncertainty constant


@dataclass(frozen=True)
class Eligibility:
    """The sites a job may use and, for every other site, why not."""

    sites: tuple[str, ...]
    left_out: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"sites": list(self.sites), "left_out": dict(self.left_out)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Eligibility:
        return cls(tuple(str(s) for s in data["sites"]), {str(k): str(v) for k, v in data["left_out"].items()})


def eligibility(sites: Sequence[SiteConfig], placement: PlacementConfig) -> Eligibility:
    """Split the configured sites by the job's ``placement.require``; order is the config's."""
    left_out = {site.id: why for site in sites if (why := placement.why_not(site)) is not None}
    return Eligibility(tuple(site.id for site in sites if site.id not in left_out), left_out)


@dataclass(frozen=True)
class Outcome:
    """What one asked site's reply told the coordinator: did it answer, how fast, how useful."""

    answered: bool
    duration_s: float | None = None
    train_loss: float | None = None
    num_examples: int = 0

    @property
    def utility(self) -> float:
        """Recent loss x examples: a site whose data the model still fits badly has most to teach it."""
        if not self.answered or self.train_loss is None or not math.isfinite(self.train_loss):
            return 0.0
        return max(self.train_loss, 0.0) * max(self.num_examples, 0)


@dataclass(frozen=True)
class SiteHistory:
    asked: int = 0
    answered: int = 0
    duration_s: float | None = None  # expected reply time: moving average of the measured ones
    utility: float | None = None  # from the newest reply (0 after a failure)
    last_asked: int = 0


@dataclass(frozen=True)
class History:
    """Everything the sampler knows after ``rounds`` rounds: per-site figures and the money spent."""

    rounds: int = 0
    spent: float = 0.0
    sites: Mapping[str, SiteHistory] = field(default_factory=dict)

    def site(self, site_id: str) -> SiteHistory:
        return self.sites.get(site_id, SiteHistory())

    def after(self, server_round: int, outcomes: Mapping[str, Outcome], cost: float) -> History:
        """The history once the sites in ``outcomes`` (every site asked in ``server_round``) replied or not."""
        sites = dict(self.sites)
        for site_id, outcome in outcomes.items():
            before = self.site(site_id)
            duration = before.duration_s
            if outcome.duration_s is not None:
                measured = max(outcome.duration_s, 0.0)
                duration = measured if duration is None else (1 - DURATION_EMA) * duration + DURATION_EMA * measured
            sites[site_id] = SiteHistory(
                asked=before.asked + 1,
                answered=before.answered + int(outcome.answered),
                duration_s=duration,
                utility=outcome.utility,
                last_asked=server_round,
            )
        return History(max(self.rounds, server_round), self.spent + cost, sites)


@dataclass(frozen=True)
class RoundChoice:
    """Who a round asks and why each site of the pool was or was not asked; ``stop`` ends training."""

    server_round: int
    sampler: str
    asked: tuple[str, ...]
    reasons: dict[str, str]
    cost: float
    spent_before: float
    stop: str = ""

    @property
    def left_out(self) -> dict[str, str]:
        return {s: r for s, r in self.reasons.items() if s not in self.asked}


def uniform_order(pool: Sequence[str], seed: int, server_round: int, count: int) -> list[str]:
    """Every site in a seeded random order: first the ``count`` sites ``sample_sites`` draws (the same
    draw from (seed, round)), then the others, in the order a budget would try them instead."""
    ordered = sorted(pool)
    rng = np.random.default_rng([seed, server_round])
    drawn = [ordered[int(i)] for i in rng.choice(len(ordered), size=min(count, len(ordered)), replace=False)]
    rest = [site for site in ordered if site not in drawn]
    return sorted(drawn) + [rest[int(i)] for i in rng.permutation(len(rest))]


def choose(
    pool: Sequence[str],
    history: History,
    placement: PlacementConfig,
    *,
    server_round: int,
    count: int,
    min_sites: int,
    seed: int,
    costs: Mapping[str, float],
) -> RoundChoice:
    """The sites round ``server_round`` asks: ``count`` of ``pool`` in the sampler's order, within the budget."""
    if placement.sampler == "guided":
        order, reasons = _guided_order(pool, history, placement, server_round, count, seed)
    else:
        order = uniform_order(pool, seed, server_round, count)
        draw = f"uniform draw (seed {seed}, round {server_round})"
        reasons = {s: draw if i < count else f"{draw}: stand-in {i + 1 - count}" for i, s in enumerate(order)}
    asked: list[str] = []
    cost, left = 0.0, _remaining(placement.budget, history.spent)
    for site_id in order:
        site_cost = costs.get(site_id, 0.0)
        if len(asked) >= count:
            reasons[site_id] = f"not asked: the round had its {count} sites; {reasons[site_id]}"
        elif site_cost > left - cost:
            reasons[site_id] = (
                f"not asked: budget, its cost {site_cost:g} would bring the job to "
                f"{history.spent + cost + site_cost:g} > budget {placement.budget:g}; {reasons[site_id]}"
            )
        else:
            asked.append(site_id)
            cost += site_cost
            reasons[site_id] = f"asked: {reasons[site_id]}"
    stop = ""
    if len(asked) < min(min_sites, len(order)):
        stop = (
            f"placement budget: round {server_round} can pay for {len(asked)} site(s) with "
            f"{left:g} of budget {placement.budget:g} left, training.min_sites is {min_sites}; "
            f"training stops after round {server_round - 1}"
        )
        asked, cost = [], 0.0
    return RoundChoice(server_round, placement.sampler, tuple(sorted(asked)), reasons, cost, history.spent, stop)


def _remaining(budget: float | None, spent: float) -> float:
    return math.inf if budget is None else budget - spent


def floor_rounds(min_share: float, rounds: int, phase: float = 0.0) -> int:
    """The fairness floor: in ``rounds`` rounds an eligible site is asked at least ``floor(min_share x rounds)``
    times (a share of one round cannot be met before the round; ``1e-9`` absorbs float error).

    The sampler holds each site to ``floor(min_share x rounds + phase)`` with its own ``phase`` in [0, 1),
    spread evenly over the sites: their floors then step up in different rounds, at most
    ``ceil(min_share x sites)`` (<= sites per round) of them at once, so the floor always fits in the rounds.
    """
    return math.floor(min_share * rounds + phase + 1e-9)


def floor_phases(pool: Sequence[str], seed: int) -> dict[str, float]:
    """Each site's phase of its fairness floor: ``k / sites`` in a seeded order, fixed for the whole job."""
    order = uniform_order(pool, seed, 0, len(pool))
    return {site_id: index / len(order) for index, site_id in enumerate(order)}


def _guided_order(
    pool: Sequence[str], history: History, placement: PlacementConfig, server_round: int, count: int, seed: int
) -> tuple[list[str], dict[str, str]]:
    """Floor first (most behind first), then never-measured sites (seeded order), then by score."""
    shuffled = uniform_order(pool, seed, server_round, len(pool))  # the tie-break among equals
    rank = {s: i for i, s in enumerate(shuffled)}
    reasons: dict[str, str] = {}
    phase = floor_phases(pool, seed)
    needed = {s: floor_rounds(placement.min_share, server_round, phase[s]) for s in pool}
    floor = [s for s in shuffled if history.site(s).asked < needed[s]]
    floor.sort(key=lambda s: (history.site(s).asked - needed[s], rank[s]))
    for s in floor:
        reasons[s] = (
            f"fairness floor: asked in {history.site(s).asked} of {server_round - 1} rounds, min_share "
            f"{placement.min_share:g} needs {needed[s]} by round {server_round}"
        )
    rest = [s for s in shuffled if s not in reasons]
    unmeasured = [s for s in rest if history.site(s).duration_s is None]
    for s in unmeasured:
        reasons[s] = "not measured yet: explored (seeded order)"
    measured = [s for s in rest if s not in reasons]
    scores = guided_scores(history, measured, server_round, count, placement.speed_weight)
    measured.sort(key=lambda s: (-scores[s][0], rank[s]))
    for s in measured:
        score, utility, bonus, penalty = scores[s]
        reasons[s] = (
            f"score {score:.3f} (utility {utility:.3f} + staleness {bonus:.3f}, x speed {penalty:.3f}: "
            f"expected {history.site(s).duration_s:.3f} s)"
        )
    return floor + unmeasured + measured, reasons


def guided_scores(
    history: History, measured: Sequence[str], server_round: int, count: int, speed_weight: float
) -> dict[str, tuple[float, float, float, float]]:
    """Per measured site: (score, scaled utility, staleness bonus, speed penalty)."""
    if not measured:
        return {}
    durations = sorted(history.site(s).duration_s or 0.0 for s in measured)
    preferred_s = durations[min(count, len(durations)) - 1]
    top = max((history.site(s).utility or 0.0) for s in measured)
    out = {}
    for s in measured:
        site = history.site(s)
        utility = (site.utility or 0.0) / top if top > 0 else 1.0
        bonus = math.sqrt(STALENESS * math.log(max(server_round, 1)) / max(site.last_asked, 1))
        duration = site.duration_s or 0.0
        penalty = (preferred_s / duration) ** speed_weight if duration > preferred_s > 0 else 1.0
        out[s] = ((utility + bonus) * penalty, utility, bonus, penalty)
    return out


def shares(history: History, pool: Sequence[str]) -> dict[str, float]:
    """Each site's share of the rounds so far it was asked in."""
    rounds = max(history.rounds, 1)
    return {s: history.site(s).asked / rounds for s in pool}

"""Placement rules as pure functions: eligibility by tags, the uniform draw, the guided sampler's fairness
floor and speed preference, the budget stop, and the config checks that go with them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from quorum.configs.errors import ConfigError
from quorum.configs.schema import FederationConfig, PlacementConfig, SiteConfig, load_federation
from quorum.tasks.placement import History, Outcome, choose, eligibility, floor_rounds, shares, uniform_order
from quorum.tasks.strategies import sample_sites

EU = {"jurisdiction": "eu", "data_class": "clinical"}


def site(site_id: str, **tags: str) -> SiteConfig:
    return SiteConfig(id=site_id, root=Path(site_id), tags=tags)


# --- eligibility ---------------------------------------------------------------------------------


def test_only_sites_with_every_required_tag_are_eligible_and_each_other_site_gets_its_reason() -> None:
    sites = [site("paris", **EU), site("boston", jurisdiction="us", data_class="clinical"), site("bare")]
    placement = PlacementConfig(require={"jurisdiction": "eu", "data_class": ("clinical", "research")})

    decision = eligibility(sites, placement)

    assert decision.sites == ("paris",)
    assert decision.left_out == {
        "boston": "tag jurisdiction is us (required: eu)",
        "bare": "has no tag data_class (required: one of clinical, research); has no tag jurisdiction (required: eu)",
    }


def test_without_requirements_every_site_is_eligible() -> None:
    decision = eligibility([site("a"), site("b", tier="x")], PlacementConfig())
    assert decision.sites == ("a", "b") and decision.left_out == {}


# --- the uniform draw ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_sites", [1, 2, 3, 5, 8, 13])
def test_the_uniform_order_starts_with_exactly_the_sites_sample_sites_draws(num_sites: int) -> None:
    pool = [f"s{i:02d}" for i in range(num_sites)]
    for seed in (0, 7):
        for server_round in range(1, 6):
            for count in range(1, num_sites + 1):
                order = uniform_order(pool, seed, server_round, count)
                drawn = sample_sites(pool, 1e-9, count, server_round, seed)  # exactly `count` sites
                assert sorted(order) == pool
                assert tuple(sorted(order[:count])) == drawn


def test_uniform_choice_without_budget_is_the_seeded_draw_with_a_reason_for_every_site() -> None:
    pool = ["a", "b", "c", "d"]
    choice = choose(pool, History(), PlacementConfig(), server_round=2, count=2, min_sites=1, seed=3, costs={})
    assert choice.asked == sample_sites(pool, 0.5, 1, 2, 3)
    assert set(choice.reasons) == set(pool)
    assert all(choice.reasons[s].startswith("asked: uniform draw") for s in choice.asked)
    assert all(r.startswith("not asked: the round had its 2 sites") for r in choice.left_out.values())


# --- guided sampling -----------------------------------------------------------------------------


def run_rounds(
    pool: list[str], placement: PlacementConfig, rounds: int, count: int, speed_s: dict[str, float], **kw: Any
) -> tuple[History, list[Any]]:
    """Play ``rounds`` rounds in which each asked site answers after its ``speed_s`` with loss 0.5 on 100 rows."""
    history, choices = History(), []
    for server_round in range(1, rounds + 1):
        choice = choose(
            pool,
            history,
            placement,
            server_round=server_round,
            count=count,
            min_sites=1,
            seed=0,
            costs=kw.get("costs", {}),
        )
        choices.append(choice)
        if choice.stop:
            break
        outcomes = {s: Outcome(True, speed_s[s], 0.5, 100) for s in choice.asked}
        history = history.after(server_round, outcomes, choice.cost)
    return history, choices


def test_guided_sampling_prefers_fast_sites_once_measured() -> None:
    pool = ["f1", "f2", "f3", "s1", "s2", "s3"]
    speed = {"f1": 0.1, "f2": 0.1, "f3": 0.1, "s1": 2.0, "s2": 2.0, "s3": 2.0}
    placement = PlacementConfig(sampler="guided", min_share=0.0)

    _, choices = run_rounds(pool, placement, rounds=12, count=3, speed_s=speed)

    later = [c.asked for c in choices[4:]]  # after every site was measured once
    assert all(set(asked) == {"f1", "f2", "f3"} for asked in later)
    assert "expected 2.000 s" in choices[-1].reasons["s1"] and choices[-1].reasons["s1"].startswith("not asked")


@pytest.mark.parametrize(
    ("min_share", "count"),
    [
        (0.2, 3),  # the usual case: the floor is a small share
        (0.5, 3),  # the floor uses every slot the three slow sites can get: min_share x sites = sites per round
        (0.33, 2),  # a floor just under what the rounds can give
    ],
)
def test_the_fairness_floor_keeps_every_eligible_site_in_its_share_of_rounds(min_share: float, count: int) -> None:
    pool = ["f1", "f2", "f3", "s1", "s2", "s3"]
    speed = {"f1": 0.1, "f2": 0.1, "f3": 0.1, "s1": 2.0, "s2": 2.0, "s3": 5.0}
    placement = PlacementConfig(sampler="guided", min_share=min_share)

    history, choices = run_rounds(pool, placement, rounds=20, count=count, speed_s=speed)

    for server_round in range(1, len(choices) + 1):
        for site_id in pool:  # after every round, not only at the end
            asked = sum(site_id in c.asked for c in choices[:server_round])
            assert asked >= floor_rounds(min_share, server_round), (site_id, server_round)
    assert min(shares(history, pool).values()) >= floor_rounds(min_share, 20) / 20
    assert any("fairness floor" in c.reasons["s3"] and "s3" in c.asked for c in choices)
    fast = sum("f1" in c.asked for c in choices)
    assert fast >= sum("s3" in c.asked for c in choices)  # the slow site gets its floor, the fast ones the rest


def test_a_site_that_failed_loses_its_utility_but_keeps_its_floor() -> None:
    history = History().after(1, {"a": Outcome(True, 0.1, 0.5, 100), "b": Outcome(False)}, 0.0)
    choice = choose(
        ["a", "b"],
        history,
        PlacementConfig(sampler="guided", min_share=0.0),
        server_round=2,
        count=1,
        min_sites=1,
        seed=0,
        costs={},
    )
    assert choice.asked == ("b",)  # b never measured: explored
    history = history.after(2, {"b": Outcome(True, 0.1, float("nan"), 100)}, 0.0)
    assert history.site("b").utility == 0.0  # a NaN loss teaches nothing


# --- budget --------------------------------------------------------------------------------------


def test_the_budget_stops_selection_and_then_training_with_the_reason() -> None:
    pool = ["a", "b", "c"]
    costs = {"a": 1.0, "b": 1.0, "c": 3.0}
    placement = PlacementConfig(budget=5.0)

    history, choices = run_rounds(pool, placement, rounds=10, count=2, speed_s=dict.fromkeys(pool, 0.1), costs=costs)

    spent = [c.spent_before + c.cost for c in choices if not c.stop]
    assert all(total <= 5.0 for total in spent) and history.spent <= 5.0
    assert choices[-1].stop.startswith(f"placement budget: round {len(choices)} can pay for")
    assert choices[-1].asked == () and choices[-1].cost == 0.0
    over = [r for c in choices for s, r in c.left_out.items() if "budget" in r]
    assert over and all("> budget 5" in r for r in over)


def test_a_round_takes_cheaper_sites_when_a_costly_one_would_overspend() -> None:
    history = History(rounds=1, spent=8.0)
    placement = PlacementConfig(budget=10.0)
    choice = choose(
        ["a", "b", "c"],
        history,
        placement,
        server_round=2,
        count=3,
        min_sites=1,
        seed=0,
        costs={"a": 1.0, "b": 1.0, "c": 5.0},
    )
    assert choice.asked == ("a", "b") and choice.cost == 2.0 and not choice.stop
    assert "its cost 5 would bring the job to" in choice.reasons["c"]


# --- config --------------------------------------------------------------------------------------


def federation(**placement: Any) -> dict[str, Any]:
    return {
        "name": "f",
        "model_name": "m",
        "features": {"numeric": ["x"]},
        "sites": {
            "paris": {"root": "p", "tags": EU, "cost_per_round": 2.0, "concurrency": 1},
            "boston": {"root": "b", "tags": {"jurisdiction": "us"}, "cost_per_round": 1.0},
        },
        "training": {"min_sites": 1, "sample_fraction": 0.5},
        "placement": placement,
    }


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        # nobody meets the policy: the job could never train
        ({"require": {"jurisdiction": "ch"}}, "placement.require leaves 0 eligible site(s)"),
        # the floor asks for more than the rounds can give
        ({"sampler": "guided", "min_share": 0.8}, "placement.min_share 0.8 exceeds training.sample_fraction"),
        # a budget that cannot pay the cheapest eligible site once
        ({"require": {"jurisdiction": "eu"}, "budget": 1.0}, "placement.budget 1 does not pay for one round"),
        # an unknown sampler
        ({"sampler": "fastest"}, "placement.sampler"),
    ],
)
def test_placement_config_mistakes_are_named(placement: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValueError) as info:
        FederationConfig.model_validate(federation(**placement))
    assert expected in str(info.value)


def test_guided_sampling_is_refused_with_differential_privacy() -> None:
    raw = federation(sampler="guided")
    raw["training"]["privacy"] = {"enabled": True}
    with pytest.raises(ValueError, match="privacy accountant assumes a random draw"):
        FederationConfig.model_validate(raw)


def test_a_bad_placement_key_is_a_config_error_with_the_key(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(federation(sampler="fastest")))
    with pytest.raises(ConfigError) as info:
        load_federation(path)
    assert "placement.sampler" in info.value.message and info.value.fix


def test_a_resumed_job_rebuilds_the_samplers_history_from_its_round_records() -> None:
    from quorum.flows.placement import _outcome_dict, _outcomes

    rounds = [
        {"a": Outcome(True, 0.25, 0.5, 100), "b": Outcome(False)},
        {"a": Outcome(True, 0.75, float("nan"), 100), "c": Outcome(True, 2.0, 0.25, 40)},
    ]
    live, rebuilt = History(), History()
    for server_round, outcomes in enumerate(rounds, start=1):
        live = live.after(server_round, outcomes, 1.5)
        record = {"outcomes": {s: _outcome_dict(o) for s, o in outcomes.items()}}  # as stored, then read back
        rebuilt = rebuilt.after(server_round, _outcomes(record), 1.5)

    assert rebuilt == live
    assert live.site("a").duration_s == 0.5 and live.site("a").utility == 0.0 and live.spent == 3.0

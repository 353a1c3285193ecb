"""Placement in a running job: the policy filter at job start and the sampler between rounds, with records.

The decisions are pure (``quorum.tasks.placement``); this module feeds them the job's history, logs
them, and writes what ``quorum placement explain`` reads back: ``jobs/JOB/placement.json`` (the sites
the job may use and why the others may not) and ``jobs/JOB/rounds/NNNN/placement.json`` per round
(who was asked and why, who answered and how fast, what it cost).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from quorum.configs.errors import QuorumError
from quorum.flows.context import JobContext
from quorum.flows.runners.local import Reply, SiteFailure
from quorum.lineage.artifacts import ArtifactStore
from quorum.tasks.placement import Eligibility, History, Outcome, RoundChoice, choose, eligibility, shares


@dataclass(frozen=True)
class PlacementSummary:
    """What placement did over a job: the sampler, what it spent against the budget, each site's share."""

    sampler: str
    spent: float
    budget: float | None
    shares: dict[str, float] = field(default_factory=dict)
    stopped: str = ""

    def describe(self) -> str:
        budget = "" if self.budget is None else f" of budget {self.budget:g}"
        return f"sampler {self.sampler}, spent {self.spent:g}{budget}"


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The flow run's logger (what the Prefect UI and `quorum run` show), or a plain one outside a flow."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("quorum.placement")


def _job_key(job_id: str) -> str:
    return f"jobs/{job_id}/placement.json"


def _round_key(job_id: str, server_round: int) -> str:
    return f"jobs/{job_id}/rounds/{server_round:04d}/placement.json"


def job_placement(ctx: JobContext, resume: bool = False) -> Eligibility:
    """The sites this job may use, decided once at job start (before any site is contacted) and stored.

    A resumed job keeps the decision it started with.
    """
    key = _job_key(ctx.job_id)
    if resume and ctx.store.exists(key):
        return Eligibility.from_dict(_json(ctx.store.get_json(key)))
    decision = eligibility(ctx.config.sites, ctx.config.placement)
    ctx.store.put_json(key, {"job_id": ctx.job_id, "require": _require(ctx), **decision.to_dict()})
    logger = _logger()
    for site_id, reason in decision.left_out.items():
        logger.info("site %s left out of job %s by placement policy: it %s", site_id, ctx.job_id, reason)
    return decision


def record_placement(ctx: JobContext, run_id: str, decision: Eligibility) -> None:
    """Lineage of the decision: run params ``placement.eligible`` / ``placement.left_out`` and a tag per reason."""
    ctx.tracker.log_params(
        run_id, {"placement.eligible": ",".join(decision.sites), "placement.left_out": ",".join(decision.left_out)}
    )
    ctx.tracker.set_tags(run_id, {f"placement.left_out.{s}": r[:5000] for s, r in decision.left_out.items()})


def _require(ctx: JobContext) -> dict[str, list[str]]:
    placement = ctx.config.placement
    return {tag: list(placement.allowed(tag)) for tag in sorted(placement.require)}


def lineage_tags(decision: Eligibility, summary: PlacementSummary | None) -> dict[str, str]:
    """Placement's tags for the model version: the sites chosen, why the others were not, what was spent."""
    tags = {"placement.sites": ",".join(decision.sites)}
    tags.update({f"placement.left_out.{s}": reason[:5000] for s, reason in decision.left_out.items()})
    if summary is not None:
        tags["placement.sampler"] = summary.sampler
        tags["placement.spent"] = f"{summary.spent:g}"
        if summary.budget is not None:
            tags["placement.budget"] = f"{summary.budget:g}"
    return tags


def outcome_of(reply: Reply) -> tuple[Outcome, str]:
    """A reply as the sampler sees it, and the problem when the site did not answer."""
    if isinstance(reply, SiteFailure):
        return Outcome(answered=False), reply.describe()
    return Outcome(True, reply.train_s, reply.train_loss, reply.num_examples), ""


class RoundPlacer:
    """The sampler's memory across the rounds of one job (rebuilt from the stored records on resume)."""

    def __init__(self, ctx: JobContext, run_id: str, pool: Sequence[str], first_round: int = 1) -> None:
        self.ctx, self.run_id, self.pool = ctx, run_id, tuple(sorted(pool))
        self.history = History()
        self.stopped = ""
        for server_round in range(1, first_round):
            record = read_round(ctx.store, ctx.job_id, server_round)
            if record is not None and record.get("status") == "done":
                self.history = self.history.after(server_round, _outcomes(record), float(record["cost"]))

    def choose(self, server_round: int) -> RoundChoice:
        """This round's sites (or a budget stop), logged and written before any site is asked."""
        config = self.ctx.config
        training = config.training
        choice = choose(
            self.pool,
            self.history,
            config.placement,
            server_round=server_round,
            count=training.sites_per_round(len(self.pool)),
            min_sites=training.min_sites,
            seed=config.seed,
            costs={s.id: s.cost_per_round for s in config.sites},
        )
        logger = _logger()
        if choice.stop:
            self.stopped = choice.stop
            logger.warning("%s; evaluation uses the last model", choice.stop)
            self.ctx.tracker.set_tags(self.run_id, {"placement.budget_exhausted": "true"})
        for site_id, reason in sorted(choice.left_out.items()):
            if "budget" in reason:
                logger.warning("round %d: %s %s", server_round, site_id, reason)
        self._write(choice, "asked", {})
        return choice

    def observe(self, choice: RoundChoice, replies: Mapping[str, Reply]) -> None:
        """Fold the asked sites' replies into the history: who answered, how fast, with what loss."""
        outcomes: dict[str, Outcome] = {}
        problems: dict[str, str] = {}
        for site_id in choice.asked:
            reply = replies.get(site_id)
            outcome, problem = (Outcome(False), "no reply") if reply is None else outcome_of(reply)
            outcomes[site_id], problems[site_id] = outcome, problem
        self.history = self.history.after(choice.server_round, outcomes, choice.cost)
        self._write(choice, "done", {s: {**_outcome_dict(o), "problem": problems[s]} for s, o in outcomes.items()})
        metrics = {"placement.round_cost": choice.cost, "placement.spent": self.history.spent}
        metrics.update({f"site.{s}.reply_s": o.duration_s for s, o in outcomes.items() if o.duration_s is not None})
        self.ctx.tracker.log_metrics(self.run_id, metrics, step=choice.server_round)

    def finish(self) -> PlacementSummary:
        placement = self.ctx.config.placement
        summary = PlacementSummary(
            placement.sampler, self.history.spent, placement.budget, shares(self.history, self.pool), self.stopped
        )
        tags = {"placement.sampler": summary.sampler, "placement.spent": f"{summary.spent:g}"}
        if summary.budget is not None:
            tags["placement.budget"] = f"{summary.budget:g}"
        self.ctx.tracker.set_tags(self.run_id, tags)
        self.ctx.tracker.log_metrics(self.run_id, {f"site.{s}.share": v for s, v in summary.shares.items()})
        return summary

    def _write(self, choice: RoundChoice, status: str, outcomes: dict[str, dict[str, Any]]) -> None:
        self.ctx.store.put_json(
            _round_key(self.ctx.job_id, choice.server_round),
            {
                "server_round": choice.server_round,
                "status": status,
                "sampler": choice.sampler,
                "pool": list(self.pool),
                "asked": list(choice.asked),
                "reasons": choice.reasons,
                "cost": choice.cost,
                "spent_before": choice.spent_before,
                "budget": self.ctx.config.placement.budget,
                "stop": choice.stop,
                "outcomes": outcomes,
            },
        )


def _outcome_dict(outcome: Outcome) -> dict[str, Any]:
    loss = outcome.train_loss
    return {
        "answered": outcome.answered,
        "duration_s": outcome.duration_s,
        "train_loss": loss if loss is None or math.isfinite(loss) else None,
        "num_examples": outcome.num_examples,
    }


def _outcomes(record: Mapping[str, Any]) -> dict[str, Outcome]:
    return {
        str(s): Outcome(bool(o["answered"]), o.get("duration_s"), o.get("train_loss"), int(o.get("num_examples", 0)))
        for s, o in record.get("outcomes", {}).items()
    }


def _json(data: object) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise QuorumError("a placement record is not a JSON object", fix="the artifact store was edited: rerun the job")
    return data


def read_job(store: ArtifactStore, job_id: str) -> dict[str, Any]:
    """The job's placement decision as recorded at its start; a clear error for an unknown job."""
    key = _job_key(job_id)
    if not store.exists(key):
        known = sorted({k.split("/")[1] for k in store.list_keys("jobs") if k.endswith("/placement.json")})
        raise QuorumError(
            f"no placement record of job {job_id} in {store.location}",
            fix="pass a job id `quorum run` printed" + (f"; recorded jobs: {', '.join(known[-5:])}" if known else ""),
        )
    return _json(store.get_json(key))


def read_round(store: ArtifactStore, job_id: str, server_round: int) -> dict[str, Any] | None:
    key = _round_key(job_id, server_round)
    return _json(store.get_json(key)) if store.exists(key) else None


def read_rounds(store: ArtifactStore, job_id: str) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """Each round's placement record with its round manifest (None when the round did not complete)."""
    out = []
    server_round = 1
    while (record := read_round(store, job_id, server_round)) is not None:
        manifest_key = f"jobs/{job_id}/rounds/{server_round:04d}/manifest.json"
        manifest = _json(store.get_json(manifest_key)) if store.exists(manifest_key) else None
        out.append((record, manifest))
        server_round += 1
    return out

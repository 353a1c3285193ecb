"""Stage 2: federated tuning. One readable round loop, the same for every runner.

configure (which sites, which weights) -> dispatch -> validate replies -> aggregate -> evaluate,
with each round's global weights and metrics checkpointed in the artifact store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from prefect import flow, get_run_logger

from configs.errors import NotEnoughSites
from configs.schema import FederationConfig
from evaluation.metrics import merge, summarize
from evaluation.report import SiteEvaluation
from flows.context import JobContext
from flows.jobs import last_checkpoint
from flows.runners import SiteFailure, SiteRunner
from tasks.aggregate import fedavg, weighted_loss_avg
from tasks.features import feature_names, merge_moments
from tasks.model import Weights, initial_weights
from tasks.replies import validate_reply
from tasks.site import DataFingerprint, SiteUpdate


@dataclass(frozen=True)
class RoundRecord:
    server_round: int
    sites: tuple[str, ...]
    rejected: dict[str, str]
    train_loss: float
    metrics: dict[str, float]


@dataclass(frozen=True)
class TuningResult:
    weights: Weights
    rounds: tuple[RoundRecord, ...]
    feature_mean: list[float]

    @property
    def final_metrics(self) -> dict[str, float]:
        return self.rounds[-1].metrics if self.rounds else {}


def start_weights(cfg: FederationConfig, fingerprints: dict[str, DataFingerprint]) -> tuple[Weights, list[float]]:
    """Seeded initial weights with input scaling from the sites' merged feature moments."""
    moments = [fp.moments for fp in fingerprints.values() if fp.moments is not None]
    mean, std = merge_moments(moments)
    weights = initial_weights(len(feature_names(cfg.features)), cfg.model.hidden_sizes, mean, std, cfg.seed)
    return weights, mean.tolist()


def _accept(
    ctx: JobContext, server_round: int, replies: dict[str, SiteUpdate | SiteFailure], reference: Weights
) -> tuple[dict[str, SiteUpdate], dict[str, str]]:
    accepted: dict[str, SiteUpdate] = {}
    rejected: dict[str, str] = {}
    for site_id, reply in replies.items():
        if isinstance(reply, SiteFailure):
            rejected[site_id] = reply.describe()
            continue
        problem = validate_reply(reply, reference, server_round, site_id)
        if problem:
            rejected[site_id] = problem
        else:
            accepted[site_id] = reply
    if len(accepted) < ctx.config.training.min_sites:
        raise NotEnoughSites(
            f"round {server_round}: {len(accepted)} valid replies, training.min_sites is "
            f"{ctx.config.training.min_sites}; rejected: " + "; ".join(f"{s}: {r}" for s, r in rejected.items()),
            fix="fix the failing sites, or lower training.min_sites in the federation config",
        )
    return accepted, rejected


def _round_metrics(evaluations: dict[str, SiteEvaluation | SiteFailure]) -> dict[str, float]:
    usable = [e for e in evaluations.values() if isinstance(e, SiteEvaluation)]
    pooled = summarize(merge(e.overall for e in usable))
    return {k: v for k, v in pooled.items() if k in ("accuracy", "auc", "log_loss", "f1")}


def _resume_point(ctx: JobContext, weights: Weights, resume: bool) -> tuple[int, Weights, list[RoundRecord]]:
    """Where a (possibly resumed) job starts: after the last checkpointed round, never recomputing one."""
    if not resume:
        return 1, weights, []
    done, checkpoint, manifests = last_checkpoint(ctx.store, ctx.job_id)
    records = [
        RoundRecord(m["server_round"], tuple(m["sites"]), dict(m["rejected"]), m["train_loss"], dict(m["metrics"]))
        for m in manifests
    ]
    return done + 1, checkpoint if checkpoint is not None else weights, records


@flow(name="tune", validate_parameters=False)
def tune_flow(
    ctx: JobContext,
    runner: SiteRunner,
    fingerprints: dict[str, DataFingerprint],
    run_id: str,
    resume: bool = False,
) -> TuningResult:
    logger = get_run_logger()
    site_ids = sorted(fingerprints)
    weights, feature_mean = start_weights(ctx.config, fingerprints)
    first, weights, records = _resume_point(ctx, weights, resume)
    rounds = ctx.config.training.rounds
    if first > 1:
        logger.info("resuming job %s after round %d of %d", ctx.job_id, first - 1, rounds)
    for server_round in range(first, rounds + 1):
        replies = runner.train(site_ids, weights, server_round)
        accepted, rejected = _accept(ctx, server_round, replies, weights)
        weights = fedavg([(u.weights, u.num_examples) for u in accepted.values()])
        train_loss = weighted_loss_avg([(u.train_loss, u.num_examples) for u in accepted.values()])
        metrics = _round_metrics(runner.evaluate(site_ids, weights))
        record = RoundRecord(server_round, tuple(sorted(accepted)), rejected, train_loss, metrics)
        records.append(record)
        _checkpoint(ctx, record, weights)
        ctx.tracker.log_metrics(run_id, {"train_loss": train_loss, **metrics}, step=server_round)
        ctx.tracker.log_metrics(
            run_id, {f"site.{s}.train_loss": u.train_loss for s, u in accepted.items()}, step=server_round
        )
        for site_id, reason in rejected.items():
            logger.warning("round %d: reply of %s rejected: %s", server_round, site_id, reason)
        logger.info(
            "round %d/%d: %d sites, train_loss %.4f, accuracy %.4f, auc %.4f",
            server_round,
            rounds,
            len(accepted),
            train_loss,
            metrics.get("accuracy", np.nan),
            metrics.get("auc", np.nan),
        )
    return TuningResult(weights, tuple(records), feature_mean)


def _checkpoint(ctx: JobContext, record: RoundRecord, weights: Weights) -> None:
    key = ctx.job_key("rounds", f"{record.server_round:04d}")
    digest = ctx.store.put_weights(f"{key}/global.npz", weights)
    ctx.store.put_json(
        f"{key}/manifest.json",
        {
            "job_id": ctx.job_id,
            "server_round": record.server_round,
            "sha256": digest,
            "sites": list(record.sites),
            "rejected": record.rejected,
            "train_loss": record.train_loss,
            "metrics": record.metrics,
        },
    )

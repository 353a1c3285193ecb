"""Stage 2: federated tuning. One readable round loop, the same for every runner.

configure (which sites, which weights) -> dispatch -> validate replies -> aggregate -> evaluate,
with each round's global weights and metrics checkpointed in the artifact store. What each phase
does under the configured strategy, aggregation rule, sampling, secure aggregation or differential
privacy is chosen in ``quorum.flows.rounds``; the maths lives in ``tasks``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from prefect import flow, get_run_logger

from quorum.configs.schema import FederationConfig
from quorum.evaluation.metrics import merge, summarize
from quorum.evaluation.report import SiteEvaluation
from quorum.flows import rounds
from quorum.flows.context import JobContext
from quorum.flows.placement import PlacementSummary, RoundPlacer
from quorum.flows.runners.jobs import last_checkpoint
from quorum.flows.runners.local import SiteFailure, SiteRunner
from quorum.tasks.aggregate import weighted_loss_avg
from quorum.tasks.features import feature_names, merge_moments
from quorum.tasks.site import DataFingerprint
from quorum.tasks.strategies import ServerOptimizerState, trainable_tensors
from quorum.tasks.weights import Weights


@dataclass(frozen=True)
class RoundRecord:
    server_round: int
    sites: tuple[str, ...]
    rejected: dict[str, str]
    train_loss: float
    metrics: dict[str, float]
    sampled: tuple[str, ...] = ()
    epsilon: float | None = None  # privacy spent after this round, with DP on


@dataclass(frozen=True)
class RoundDone:
    """One finished round, as a watcher sees it (the CLI's progress bar); the flow never knows who watches."""

    server_round: int
    total_rounds: int  # as configured: a privacy budget may stop the job earlier
    num_sites: int  # replies aggregated this round
    train_loss: float
    accuracy: float | None  # None when no site could score the new model
    auc: float | None


OnRound = Callable[[RoundDone], None]


@dataclass(frozen=True)
class TuningResult:
    weights: Weights
    rounds: tuple[RoundRecord, ...]
    feature_mean: list[float]
    stopped_early: str = ""  # why fewer rounds than configured ran (the privacy budget), or empty
    method: str = "fedavg"  # strategy and aggregation rule, for summaries
    placement: PlacementSummary | None = None  # the sampler, what it spent, each site's share of the rounds

    @property
    def final_metrics(self) -> dict[str, float]:
        return self.rounds[-1].metrics if self.rounds else {}


def start_weights(cfg: FederationConfig, fingerprints: dict[str, DataFingerprint]) -> tuple[Weights, list[float]]:
    """Seeded initial weights with input scaling from the sites' merged feature moments."""
    moments = [fp.moments for fp in fingerprints.values() if fp.moments is not None]
    mean, std = merge_moments(moments)
    from quorum.tasks.model import initial_weights  # torch: loaded once tuning starts

    weights = initial_weights(len(feature_names(cfg.features)), cfg.model.hidden_sizes, mean, std, cfg.seed)
    return weights, mean.tolist()


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
        RoundRecord(
            m["server_round"],
            tuple(m["sites"]),
            dict(m["rejected"]),
            m["train_loss"],
            dict(m["metrics"]),
            tuple(m.get("sampled", m["sites"])),
            m.get("epsilon"),
        )
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
    on_round: OnRound | None = None,
) -> TuningResult:
    """Train ``training.rounds`` rounds; ``on_round`` (if given) is called once after each round's checkpoint."""
    logger = get_run_logger()
    config, training = ctx.config, ctx.config.training
    site_ids = sorted(fingerprints)

    # configure: the start model, where a resumed job left off, server optimizer, privacy budget, keys
    weights, feature_mean = start_weights(config, fingerprints)
    weights, source = rounds.seed_weights(ctx, weights)
    if source != "scratch":
        feature_mean = weights[0].tolist()  # the seed's own input scaling, which its layers were trained with
        logger.info("starting from %s with %d leading layer(s) frozen", source, training.freeze_layers)
    first, weights, records = _resume_point(ctx, weights, resume)
    trainable = trainable_tensors(len(weights), training.freeze_layers)
    server_state = ServerOptimizerState()
    privacy = rounds.privacy_accountant(training, len(site_ids), rounds_done=len(records))
    if first > 1:
        logger.info("resuming job %s after round %d of %d", ctx.job_id, first - 1, training.rounds)
        if training.server_optimizer != "fedavg":
            logger.info("server optimizer %s restarts with fresh moments (not checkpointed)", training.strategy)
    placer = RoundPlacer(ctx, run_id, site_ids, first)  # secure aggregation keys are per round (SecAgg+)

    stopped_early = ""
    for server_round in range(first, training.rounds + 1):
        if privacy is not None and privacy.after(1).exceeded:
            stopped_early = _stop_at_budget(ctx, run_id, server_round, privacy.after(1).epsilon)
            break
        choice = placer.choose(server_round)  # quorum.tasks.placement: who is asked, and why the others are not
        if choice.stop:
            stopped_early = choice.stop
            break
        sampled = choice.asked
        logger.info(
            "round %d: sampled %s (sample_fraction %g, seed %d)",
            server_round,
            ", ".join(sampled),
            training.sample_fraction,
            config.seed,
        )

        # dispatch: the sampled sites train from the current global model (masking their update under secagg)
        secagg, left_out = None, dict[str, str]()
        if training.secure_aggregation:  # SecAgg+ advertise and share steps first
            secagg, left_out = rounds.secure_setup(runner, ctx.job_id, sampled, server_round, training)
        replies = runner.train([s for s in sampled if s not in left_out], weights, server_round, secagg)
        placer.observe(choice, replies)

        # validate replies: each is checked before anything is aggregated; a bad one is left out with a reason
        accepted, rejected = rounds.screen_replies(config, server_round, replies, weights)
        rejected.update(left_out)

        # aggregate: the configured rule (or DP's noised mean, or the secure sum), then the server optimizer
        if secagg is not None:
            rows = {s: fp.train_rows for s, fp in fingerprints.items()}
            aggregated, unrevealed, silent = rounds.aggregate_secure(
                runner, secagg, server_round, weights, accepted, training, rows
            )
            rejected.update(unrevealed)
            accepted = {s: u for s, u in accepted.items() if s not in unrevealed}
            for site_id, reason in silent.items():
                logger.warning(
                    "round %d: %s did not unmask (its update is in the sum): %s", server_round, site_id, reason
                )
        else:
            aggregated = rounds.aggregate_updates(training, weights, accepted, trainable)
        weights, server_state = rounds.server_step(training, weights, aggregated, server_state, trainable)
        privacy = privacy.after(1) if privacy is not None else None
        train_loss = weighted_loss_avg([(u.train_loss, u.num_examples) for u in accepted.values()])

        # evaluate: every site scores the new global model on its own held-out split
        evaluations = runner.evaluate(site_ids, weights)
        metrics = _round_metrics(evaluations)
        epsilon = privacy.epsilon if privacy is not None else None
        record = RoundRecord(server_round, tuple(sorted(accepted)), rejected, train_loss, metrics, sampled, epsilon)
        records.append(record)
        _checkpoint(ctx, record, weights)
        site_metrics = {f"site.{s}.train_loss": u.train_loss for s, u in accepted.items()}
        _log_round(ctx, run_id, record, {**site_metrics, **_site_metrics(evaluations)})
        for site_id, reason in rejected.items():
            logger.warning("round %d: reply of %s rejected: %s", server_round, site_id, reason)
        logger.info(
            "round %d/%d: %d sites, train_loss %.4f, accuracy %.4f, auc %.4f",
            server_round,
            training.rounds,
            len(accepted),
            train_loss,
            metrics.get("accuracy", np.nan),
            metrics.get("auc", np.nan),
        )
        if on_round is not None:
            on_round(
                RoundDone(
                    server_round,
                    training.rounds,
                    len(accepted),
                    train_loss,
                    metrics.get("accuracy"),
                    metrics.get("auc"),
                )
            )
    method = training.strategy if training.aggregation == "mean" else f"{training.strategy}, {training.aggregation}"
    return TuningResult(weights, tuple(records), feature_mean, stopped_early, method, placer.finish())


def _stop_at_budget(ctx: JobContext, run_id: str, server_round: int, epsilon: float) -> str:
    """Stop before the round that would overspend; the job goes on to evaluation with the last model."""
    privacy = ctx.config.training.privacy
    reason = (
        f"privacy budget: round {server_round} would bring epsilon to {epsilon:.3f} > epsilon_budget "
        f"{privacy.epsilon_budget:g} (delta {privacy.delta:g}); training stops after round {server_round - 1}"
    )
    get_run_logger().warning("%s; evaluation uses the last model", reason)
    ctx.tracker.set_tags(
        run_id, {"privacy.budget_exhausted": "true", "privacy.stopped_after_round": str(server_round - 1)}
    )
    return reason


def _site_metrics(evaluations: dict[str, SiteEvaluation | SiteFailure]) -> dict[str, float]:
    per_site = {s: summarize(e.overall) for s, e in evaluations.items() if isinstance(e, SiteEvaluation)}
    return {f"site.{s}.{name}": m[name] for s, m in per_site.items() for name in ("accuracy", "auc")}


def _log_round(ctx: JobContext, run_id: str, record: RoundRecord, per_site: dict[str, float]) -> None:
    """One MLflow batch per round (``step`` = round); the rejection reasons as ``rounds/NNNN/rejected.json``."""
    metrics = {
        "train_loss": record.train_loss,
        **record.metrics,
        "sampled_sites": float(len(record.sampled)),
        "rejected_replies": float(len(record.rejected)),
        **per_site,
    }
    if record.epsilon is not None:
        metrics["privacy.epsilon"] = record.epsilon
    ctx.tracker.log_metrics(run_id, metrics, step=record.server_round)
    if record.rejected:
        ctx.tracker.log_dict(run_id, record.rejected, f"rounds/{record.server_round:04d}/rejected.json")


def _checkpoint(ctx: JobContext, record: RoundRecord, weights: Weights) -> None:
    key = ctx.job_key("rounds", f"{record.server_round:04d}")
    digest = ctx.store.put_weights(f"{key}/global.npz", weights)
    ctx.store.put_json(
        f"{key}/manifest.json",
        {
            "job_id": ctx.job_id,
            "server_round": record.server_round,
            "sha256": digest,
            "sampled": list(record.sampled),
            "sites": list(record.sites),
            "rejected": record.rejected,
            "train_loss": record.train_loss,
            "metrics": record.metrics,
            "epsilon": record.epsilon,
        },
    )

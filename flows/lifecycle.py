"""The whole model lifecycle as one Prefect flow: preprocess -> tune -> evaluate -> promote -> monitor.

Thin wiring only: each stage is its own flow, each decision a pure function, each side effect an
adapter in ``lineage``. MLflow gets a parent run for the job with a child run per stage.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger

from quorum.flows.approval import await_approval
from quorum.flows.context import JobContext, git_commit, load_context
from quorum.flows.evaluate import EvaluationResult, evaluate_flow, site_coverage
from quorum.flows.monitor import MonitorResult, monitor_flow
from quorum.flows.placement import job_placement, lineage_tags, record_placement
from quorum.flows.preprocess import PreprocessResult, preprocess_flow
from quorum.flows.promote import PromotionResult, promote_flow
from quorum.flows.runners.jobs import JobRecord, load_job, save_job
from quorum.flows.runners.local import LocalRunner, SiteRunner
from quorum.flows.runners.site_workers import SiteWorkers, start_site_workers
from quorum.flows.tuning import OnRound, TuningResult, tune_flow
from quorum.flows.variants import VariantCheck
from quorum.lineage.keys import approver_for_private_key
from quorum.lineage.provenance import SiteEvidence
from quorum.tasks.features import feature_names
from quorum.tasks.placement import Eligibility
from quorum.tasks.wire import encode_fingerprint

CODE_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LifecycleResult:
    job_id: str
    run_id: str
    model_name: str
    preprocess: PreprocessResult | None = None
    tuning: TuningResult | None = None
    evaluation: EvaluationResult | None = None
    promotion: PromotionResult | None = None
    monitor: MonitorResult | None = None
    stage_status: dict[str, str] = field(default_factory=dict)
    unchanged_since: str | None = None  # the champion version, when training was skipped: nothing changed
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall seconds of each stage that ran
    first_stage_at: float | None = None  # time.perf_counter() when the first stage began (this process's clock)
    placement: Eligibility = field(default_factory=lambda: Eligibility((), {}))  # the sites it may use


@contextmanager
def _stage(ctx: JobContext, result: LifecycleResult, name: str) -> Iterator[str]:
    """A child MLflow run per stage, closed as FAILED if the stage raises; its wall seconds go in ``result``."""
    started = time.perf_counter()
    if result.first_stage_at is None:
        result.first_stage_at = started
    run_id = ctx.tracker.start_run(name, parent_id=result.run_id, tags={"quorum.job_id": ctx.job_id})
    try:
        yield run_id
    except BaseException:
        ctx.tracker.end_run(run_id, failed=True)
        result.stage_status[name] = "failed"
        result.stage_seconds[name] = time.perf_counter() - started
        raise
    ctx.tracker.end_run(run_id)
    result.stage_status.setdefault(name, "done")
    result.stage_seconds[name] = time.perf_counter() - started


def _log_stage_seconds(ctx: JobContext, result: LifecycleResult) -> None:
    """Each stage's wall seconds as metrics of the job's parent run (``stage_seconds.tune``, ...)."""
    if result.run_id and result.stage_seconds:
        ctx.tracker.log_metrics(result.run_id, {f"stage_seconds.{k}": v for k, v in result.stage_seconds.items()})


def _lineage_tags(ctx: JobContext, prep: PreprocessResult, commit: str, run_id: str) -> dict[str, str]:
    tags = {
        "quorum.job_id": ctx.job_id,
        "git_commit": commit,
        "config_hash": ctx.config.config_hash(),
        "mlflow_run": run_id,
    }
    for site_id in prep.usable_sites:
        fp = prep.fingerprints[site_id]
        tags[f"data.{site_id}"] = fp.data_hash
        tags[f"rows.{site_id}"] = str(fp.train_rows + fp.test_rows)
    for site_id, fp in prep.fingerprints.items():
        contract = fp.contract
        outcome = "passed" if contract.passed else f"failed {len(contract.failed)} of"
        tags[f"contract.{site_id}"] = f"{outcome} {contract.evaluated} expectations"
    for site_id in set(prep.excluded) - set(prep.fingerprints):
        tags[f"contract.{site_id}"] = f"not checked: {prep.excluded[site_id]}"[:500]  # the true reason
    return tags


def _unchanged_champion(ctx: JobContext, prep: PreprocessResult) -> str | None:
    """The champion's version when it was trained on exactly these sites' data and this config."""
    from quorum.lineage.staleness import champion_tags, changes_since

    version, tags = champion_tags(ctx.tracker, ctx.config.model_name)
    if version is None:
        return None
    data = {s: prep.fingerprints[s].data_hash for s in prep.usable_sites}
    return None if changes_since(tags, data, ctx.config.config_hash()) else version


def _site_evidence(prep: PreprocessResult) -> list[SiteEvidence]:
    """Each fingerprinted site's data hash and contract outcome, for the model's provenance."""
    return [SiteEvidence(s, fp.data_hash, fp.contract.passed) for s, fp in prep.fingerprints.items()]


def _start_parent(ctx: JobContext, commit: str) -> str:
    tracker = ctx.tracker
    run_id = tracker.start_run(
        f"lifecycle-{ctx.job_id}",
        tags={
            "quorum.job_id": ctx.job_id,
            "git_commit": commit,
            "mlflow.source.git.commit": commit,
            "config_hash": ctx.config.config_hash(),
        },
    )
    tracker.log_params(run_id, _flatten(ctx.config.model_dump(mode="json", exclude={"sites", "source"})))
    tracker.log_params(run_id, {"sites": ",".join(ctx.config.site_ids), "job_id": ctx.job_id})
    tracker.log_dict(run_id, ctx.config.model_dump(mode="json"), "resolved_config.json")
    return run_id


def _flatten(data: object, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict):
        out: dict[str, object] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def _preprocess_or_resume(ctx: JobContext, runner: SiteRunner, result: LifecycleResult, resume: bool) -> None:
    """Run stage 1 on the sites placement allows, or take a resumed job's settled sites and MLflow run."""
    if resume:
        record = load_job(ctx.store, ctx.job_id)
        result.run_id, result.preprocess = record.run_id, record.preprocess
        result.stage_status["preprocess"] = "resumed"
        return
    result.run_id = _start_parent(ctx, git_commit(CODE_ROOT))
    record_placement(ctx, result.run_id, result.placement)
    with _stage(ctx, result, "preprocess"):
        result.preprocess = preprocess_flow(ctx.config, runner, list(result.placement.sites))
    source = ctx.config.source
    save_job(
        ctx.store, JobRecord(ctx.job_id, result.run_id, str(source), str(ctx.governance.source), result.preprocess)
    )


def run_lifecycle(
    ctx: JobContext,
    runner: SiteRunner,
    approver_keys: list[str],
    *,
    resume: bool = False,
    only_if_changed: bool = False,
    on_round: OnRound | None = None,
) -> LifecycleResult:
    commit = git_commit(CODE_ROOT)
    keys = [(approver_for_private_key(Path(k), ctx.governance), Path(k)) for k in approver_keys]
    result = LifecycleResult(ctx.job_id, "", ctx.config.model_name)
    result.placement = placement = job_placement(ctx, resume)  # before any site is contacted: policy decides
    runner.start(placement.sites)
    try:
        _preprocess_or_resume(ctx, runner, result, resume)
        prep = result.preprocess
        assert prep is not None
        versions = {
            s: (
                prep.fingerprints[s].data_hash,
                prep.fingerprints[s].train_rows,
                {"features": feature_names(ctx.config.features), "schema_hash": prep.fingerprints[s].schema_hash},
            )
            for s in prep.usable_sites
        }
        ctx.tracker.log_data_versions(result.run_id, versions)
        ctx.tracker.log_dict(
            result.run_id, {s: encode_fingerprint(fp) for s, fp in prep.fingerprints.items()}, "fingerprints.json"
        )
        if only_if_changed and not resume:
            result.unchanged_since = _unchanged_champion(ctx, prep)
        if result.unchanged_since is not None:
            note = f"nothing changed since champion v{result.unchanged_since}: training skipped"
            ctx.tracker.client.set_tag(result.run_id, "quorum.skipped", note)
            _log_stage_seconds(ctx, result)
            ctx.tracker.end_run(result.run_id)
            return result
        with _stage(ctx, result, "tune") as run_id:
            ctx.tracker.log_data_versions(run_id, versions)
            usable = {s: prep.fingerprints[s] for s in prep.usable_sites}
            result.tuning = tuning = tune_flow(ctx, runner, usable, run_id, resume, on_round)
        with _stage(ctx, result, "evaluate") as verdict_run:
            coverage = site_coverage(ctx.config.site_ids, prep.excluded, [(r.sites, r.rejected) for r in tuning.rounds])
            result.evaluation = evaluation = evaluate_flow(ctx, runner, tuning.weights, usable, verdict_run, coverage)
        with _stage(ctx, result, "promote") as run_id:
            result.promotion = promotion = promote_flow(
                ctx,
                tuning.weights,
                tuning.feature_mean,
                evaluation.verdict,
                {**_lineage_tags(ctx, prep, commit, result.run_id), **lineage_tags(placement, tuning.placement)},
                run_id,
                keys,
                site_evidence=_site_evidence(prep),
                variant_check=VariantCheck(runner, tuple(s.site_id for s in evaluation.candidate.sites)),
            )
            if promotion.awaiting_run is not None:  # started from a deployment: this run pauses for the approvers
                runner.rest()
                result.promotion = await_approval(ctx, promotion, evaluation.verdict, verdict_run)
        with _stage(ctx, result, "monitor") as run_id:
            result.monitor = monitor_flow(ctx, runner, prep.usable_sites, run_id)
    except BaseException:
        if result.run_id:
            _log_stage_seconds(ctx, result)
            ctx.tracker.end_run(result.run_id, failed=True)
        raise
    finally:
        runner.close()
    _log_stage_seconds(ctx, result)
    ctx.tracker.end_run(result.run_id)
    return result


@flow(name="lifecycle")
def lifecycle(
    config_path: str = "configs/federation.yaml",
    governance_path: str = "configs/governance.yaml",
    approver_keys: list[str] | None = None,
    job_id: str | None = None,
    runner: Literal["local", "pool"] = "local",
    resume: bool = False,
    force: bool = False,
    only_if_changed: bool | None = None,
    reason: str = "",
    on_round: OnRound | None = None,
    site_workers: SiteWorkers | None = None,
) -> LifecycleResult:
    """Run every stage for one federation.

    ``runner="local"`` runs the sites in this process (the embedded default); ``"pool"`` runs each
    site's work on its own work pool through one session per site. ``resume`` continues job
    ``job_id`` from its last completed round.

    ``only_if_changed`` stops after preprocessing when every site's data hash and the config equal
    the champion's (retraining on the same data only spends compute and approvals); ``None`` means
    "only when this run was started by its schedule". ``force`` trains regardless.

    ``reason`` says why the run was started (the drift-check flow puts its retraining decision here,
    so the Prefect UI shows it with the run's parameters); it changes nothing else.

    ``on_round`` is called after each tuning round with a ``RoundDone`` (``quorum run`` draws its
    progress bar from it); runs started from a deployment have no watcher.

    ``site_workers`` are site worker processes already started (``quorum run`` starts them while it
    loads); without them a local run starts ``deployment.site_processes`` of its own for the job.
    """
    if reason:
        get_run_logger().info("started because: %s", reason)
    ctx = load_context(config_path, governance_path, job_id)
    site_runner: SiteRunner
    own_workers: SiteWorkers | None = None
    if runner == "pool":
        from quorum.flows.runners.pool import PoolRunner

        site_runner = PoolRunner(ctx, str(ctx.config.source))
    else:
        if site_workers is None:
            own_workers = start_site_workers(ctx.config.deployment.site_processes)
        site_runner = LocalRunner(ctx.config, site_workers or own_workers)
        if site_workers or own_workers:
            _load_in_background(LATER_STAGE_MODULES)
    check = not force and (_started_by_schedule() if only_if_changed is None else only_if_changed)
    try:
        result = run_lifecycle(
            ctx, site_runner, list(approver_keys or []), resume=resume, only_if_changed=check, on_round=on_round
        )
    finally:
        if own_workers is not None:
            own_workers.close()
    if result.unchanged_since is not None:
        get_run_logger().info(
            "nothing changed since champion v%s: training skipped (force=True trains anyway)", result.unchanged_since
        )
    return result


# What this process needs once the sites have trained: torch for the first weights and the logged model,
# MLflow's torch flavour and the ONNX tools at promotion.
LATER_STAGE_MODULES = ("torch", "mlflow.pytorch", "onnx", "onnxruntime.quantization")


def _load_in_background(modules: tuple[str, ...]) -> None:
    """Import ``modules`` on a daemon thread: while site worker processes preprocess, this process only
    waits, so its later stages' imports cost no wall time (a stage that needs one first waits for it)."""

    def load() -> None:
        for name in modules:
            with contextlib.suppress(ImportError):  # a missing tool is reported by the stage that uses it
                importlib.import_module(name)

    threading.Thread(target=load, name="quorum-preload", daemon=True).start()


def _started_by_schedule() -> bool:
    """Whether Prefect's scheduler created this flow run (not a user, the UI's Run button or a test)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return bool(context is not None and context.flow_run is not None and context.flow_run.auto_scheduled)

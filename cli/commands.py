"""What each ``quorum`` command does; imported only once a command has been chosen."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from quorum.configs.errors import ConfigError, QuorumError
from quorum.configs.schema import FederationConfig, GovernanceConfig, load_federation, load_governance
from quorum.lineage.state import StateLayout, configure_environment, use_tracking_server

if TYPE_CHECKING:
    from quorum.infra.stack import Stack


def _prepare(config_path: Path) -> tuple[FederationConfig, StateLayout]:
    """Validate the config, then point Prefect/MLflow at its state folder before they are imported."""
    config = load_federation(config_path)
    state = StateLayout(config.state_dir)
    configure_environment(state)
    use_tracking_server(state, config.deployment.mlflow_tracking_uri)
    return config, state


def _quiet_console(verbose: bool) -> None:
    """Prefect's console shows engine chatter and, for expected failures, tracebacks; we report those ourselves.

    Runs still log to the Prefect API (the UI shows everything); only the terminal is trimmed to the
    lines our flows write, unless ``--verbose``.
    """
    import prefect.logging.handlers as handlers

    if verbose:
        return
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.server", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, handlers.PrefectConsoleHandler):
                handler.setLevel(logging.CRITICAL + 1)
    flow_runs = logging.getLogger("prefect.flow_runs")
    if any(isinstance(f, _OurLines) for h in flow_runs.handlers for f in h.filters):
        return  # already set up by an earlier command in this process
    ours = logging.StreamHandler(sys.stdout)
    ours.setLevel(logging.INFO)
    ours.setFormatter(logging.Formatter("  %(message)s"))
    ours.addFilter(_OurLines())
    flow_runs.addHandler(ours)


class _OurLines(logging.Filter):
    CHATTER = (
        "Beginning",
        "Finished in state",
        "Created ",
        "Executing",
        "Encountered exception",
        "Running hook",
        "View at",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return record.levelno < logging.ERROR and not message.startswith(self.CHATTER)


def demo_keys(governance: GovernanceConfig, state: StateLayout) -> list[str]:
    """Create the demo approvers' key pairs on first use; return their private key paths."""
    from quorum.lineage.keys import generate_key_pair

    keys = []
    for approver in governance.approvers:
        private = state.keys / f"{approver.name}.key"
        if not private.exists():
            if approver.public_key.exists():
                raise ConfigError(
                    f"{approver.public_key} exists but its private key {private} does not",
                    fix=f"remove {approver.public_key} to let the demo create a new pair",
                )
            approver.public_key.parent.mkdir(parents=True, exist_ok=True)
            generate_key_pair(private, approver.public_key)
        keys.append(str(private))
    return keys


def demo(config_path: Path, governance_path: Path, verbose: bool) -> int:
    from quorum.tasks.synth import synth_federation

    config, state = _prepare(config_path)
    written = synth_federation(config)
    print(
        f"demo federation {config.name}: {len(config.sites)} sites"
        + (f", wrote {len(written)} data files" if written else ", data already present")
    )
    keys = demo_keys(load_governance(governance_path), state)
    return _run_and_report(config_path, governance_path, keys, None, verbose)


def run(
    config_path: Path,
    governance_path: Path,
    approve_with: list[str],
    job_id: str | None,
    verbose: bool,
    runner: str = "local",
    resume: str | None = None,
    force: bool = False,
) -> int:
    """Run the lifecycle; unless ``force``, stop after preprocessing when nothing changed since the champion."""
    config, state = _prepare(config_path)
    load_governance(governance_path)
    if runner == "pool":
        _use_stack(config, state)
    job = resume or job_id
    return _run_and_report(config_path, governance_path, approve_with, job, verbose, runner, bool(resume), not force)


def _use_stack(config: FederationConfig, state: StateLayout) -> None:
    """Point this process at the servers `quorum up` started (before Prefect is imported)."""
    from quorum.infra.stack import Stack

    deployment = config.deployment
    if deployment.prefect_api_url:  # servers on another host
        os.environ["PREFECT_API_URL"] = deployment.prefect_api_url
        if deployment.mlflow_tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = deployment.mlflow_tracking_uri
        return
    stack = Stack(config, state)
    if not stack.service("prefect-server").alive():
        raise QuorumError("the Prefect server of this federation is not running", fix="run `quorum up` first")
    os.environ["PREFECT_API_URL"] = stack.prefect_url
    os.environ["MLFLOW_TRACKING_URI"] = stack.mlflow_url


def worker(config_path: Path, site_id: str, api_url: str | None) -> int:
    """What a site host runs: its pool's worker, with only its own data root and credentials."""
    config, state = _prepare(config_path)
    from quorum.infra.deployments import site_pool
    from quorum.infra.stack import Stack

    stack = Stack(config, state)
    site = config.site(site_id)
    env = stack.site_env(site_id)
    env["PREFECT_API_URL"] = api_url or config.deployment.prefect_api_url or stack.prefect_url
    env["MLFLOW_TRACKING_URI"] = config.deployment.mlflow_tracking_uri or stack.mlflow_url
    site.root.mkdir(parents=True, exist_ok=True)
    print(f"worker for site {site_id} on pool {site_pool(site_id)} at {env['PREFECT_API_URL']} (Ctrl-C stops it)")
    command = [str(Path(sys.executable).with_name("prefect")), "worker", "start"]
    command += ["--pool", site_pool(site_id), "--type", "process"]
    try:
        return subprocess.call(command, cwd=site.root, env=env)
    except KeyboardInterrupt:
        return 130


def _run_and_report(
    config_path: Path,
    governance_path: Path,
    keys: list[str],
    job_id: str | None,
    verbose: bool,
    runner: str = "local",
    resume: bool = False,
    only_if_changed: bool = False,
) -> int:
    from quorum.cli.report import RoundProgress, print_summary
    from quorum.flows.lifecycle import lifecycle

    _quiet_console(verbose)
    with RoundProgress():
        result = lifecycle(
            config_path=str(config_path.resolve()),
            governance_path=str(governance_path.resolve()),
            approver_keys=keys,
            job_id=job_id,
            runner="pool" if runner == "pool" else "local",
            resume=resume,
            only_if_changed=only_if_changed,
        )
    print_summary(result)
    return 0


def up(
    config_path: Path,
    governance_path: Path,
    prefect_file: Path,
    database: str | None = None,
    site_workers: bool = True,
) -> int:
    config, state = _prepare(config_path)
    from quorum.infra.stack import Stack

    stack = Stack(config, state, database)
    os.environ["PREFECT_API_URL"] = stack.prefect_url  # before anything imports Prefect
    project = Path.cwd().resolve()
    where = "PostgreSQL" if stack.database else "SQLite"
    print(f"starting Prefect on {stack.prefect_url} ({where}) and MLflow on {stack.mlflow_url} ...")
    stack.start_servers()
    stack.prepare_storage()
    from quorum.infra.stack import deploy

    pools = stack.ensure_pools()
    if not prefect_file.exists():
        render_infra(config_path, governance_path, prefect_file)
    print(f"deploying {prefect_file} ...")
    deploy(prefect_file, project, stack.base_env())
    stack.start_workers(project, site_workers)
    from quorum.infra.deployments import COORDINATOR_POOL

    stack.wait_for_workers(pools if site_workers else [COORDINATOR_POOL], timeout_s=120)
    print(f"pools ready: {', '.join(pools)}" + ("" if site_workers else " (site workers: `quorum worker --site ID`)"))
    print(
        f"Prefect UI: http://127.0.0.1:{config.deployment.prefect_port}   "
        f"MLflow UI: {stack.mlflow_url}\nstop everything with `quorum down`"
    )
    return 0


def status(config_path: Path) -> int:
    config, state = _prepare(config_path)
    from quorum.infra.stack import Stack

    stack = Stack(config, state)
    for service in stack.services():
        print(f"{service.name:<24} {'running pid ' + str(service.pid()) if service.alive() else 'stopped'}")
    print_data_status(config, state)
    if not stack.service("prefect-server").alive():
        print("the Prefect server is not running: `quorum up` starts everything")
        return 0
    os.environ["PREFECT_API_URL"] = stack.prefect_url
    from quorum.infra.deployments import COORDINATOR_POOL, site_pool

    pools, runs = stack.pool_report([COORDINATOR_POOL, *(site_pool(s) for s in config.site_ids)])
    for name, pool_status in pools.items():
        print(f"pool {name:<19} {pool_status}")
    print_site_queues(stack, [site_pool(s) for s in config.site_ids])
    for name, pool, state_name, started in runs:
        print(f"run  {name:<24} {pool:<16} {state_name:<10} {started}")
    return 0


def print_site_queues(stack: Stack, pools: list[str]) -> None:
    """Each site pool's flow runs: running and pending against its concurrency limit, and queued jobs."""
    from quorum.flows.site_queue import pool_queues

    with stack.client() as client:
        queues = pool_queues(client, pools)
    for name, queue in queues.items():
        print(f"queue {name:<18} {queue.describe()}")


def print_data_status(config: FederationConfig, state: StateLayout) -> None:
    """Which sites' committed data versions differ from the ones the champion was trained on."""
    from quorum.lineage.staleness import champion_data, committed_data, compare_data, stale_sites

    current, source = committed_data({site.id: site.root for site in config.sites})
    if not os.environ.get("MLFLOW_TRACKING_URI") and not state.mlflow_db.exists():
        print(f"data: no champion of {config.model_name} yet (no tracking store), nothing can be stale")
        return
    from quorum.lineage.staleness import champion_tags
    from quorum.lineage.tracking import open_tracker

    version, tags = champion_tags(open_tracker(state, config.name), config.model_name)
    if version is None:
        print(f"data: no champion of {config.model_name} yet, nothing can be stale")
        return
    states = compare_data(config.site_ids, champion_data(tags), current)
    print(f"data versions ({source}) against champion {config.model_name} v{version}:")
    for site_state in states:
        print(f"  {site_state.describe(version)}")
    stale = stale_sites(states)
    if stale:
        print(
            f"stale sites: {', '.join(stale)}; the scheduled lifecycle retrains on its next run, "
            "or run `quorum run` now"
        )


def down(config_path: Path) -> int:
    config, state = _prepare(config_path)
    from quorum.infra.stack import Stack

    stopped = Stack(config, state).stop()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def render_infra(config_path: Path, governance_path: Path, out: Path, demo_keys: bool = True) -> int:
    from quorum.infra.deployments import render, write

    config, state = _prepare(config_path)
    governance = load_governance(governance_path)
    keys = [state.keys / f"{a.name}.key" for a in governance.approvers] if demo_keys else []
    assert governance.source is not None
    write(render(config, governance.source, Path.cwd(), keys), out)
    print(f"wrote {out}")
    return 0


def synth(config_path: Path, overwrite: bool) -> int:
    from quorum.tasks.synth import synth_federation

    config = load_federation(config_path)
    written = synth_federation(config, overwrite=overwrite)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print("all site files already exist (use --overwrite to replace them)")
    return 0


def preprocess_one(config_path: Path, site_id: str) -> int:
    """One site's stage, without Prefect: what ``dvc repro`` runs at a site."""
    from quorum.tasks.site import preprocess_site

    config = load_federation(config_path)
    fingerprint = preprocess_site(config, config.site(site_id).id)
    if not fingerprint.contract.passed:
        raise_contract(site_id, fingerprint.contract.describe())
    print(
        f"{site_id}: {fingerprint.train_rows} train / {fingerprint.test_rows} test rows, data {fingerprint.data_hash}"
    )
    return 0


def raise_contract(site_id: str, detail: str) -> None:
    from quorum.configs.errors import ContractFailed

    raise ContractFailed(
        f"site {site_id}: {detail}", fix="fix the data at the site (its previous processed data is unchanged)"
    )


def keys_generate(name: str, out: Path, config_path: Path | None = None) -> int:
    """Create a key pair; with a federation config, also record the new key in its audit log."""
    from quorum.lineage.keys import generate_key_pair

    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name):
        raise ConfigError(
            f"approver name {name!r} is not allowed",
            fix="use lowercase letters, digits, '-' or '_' (up to 32 characters)",
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder", fix="pass a folder with --out")
    private, public = out / f"{name}.key", out / f"{name}.pub"
    out.mkdir(parents=True, exist_ok=True)
    config = None if config_path is None else load_federation(config_path)
    generate_key_pair(private, public)
    print(f"private key: {private} (mode 0600, keep it secret)\npublic key:  {public} (add it to governance.yaml)")
    if config is not None:
        from quorum.lineage.audit import AuditLog
        from quorum.lineage.keys import public_key_fingerprint

        fingerprint = public_key_fingerprint(public)
        details = {"approver": name, "fingerprint": fingerprint, "public_key": str(public.resolve())}
        AuditLog(StateLayout(config.state_dir).audit_log).append("key_generated", name, details)
        print(f"recorded in the audit log of {config.name}: key_generated {name} sha256:{fingerprint}")
    return 0


def approve(config_path: Path, governance_path: Path, model: str, version: str, key: Path) -> int:
    config, _ = _prepare(config_path)
    governance = load_governance(governance_path)
    if model != config.model_name:
        raise ConfigError(
            f"this federation registers {config.model_name!r}, not {model!r}",
            fix=f"quorum approve {config.model_name} --version {version} --key ...",
        )
    from quorum.flows.context import load_context
    from quorum.lineage.keys import approver_for_private_key
    from quorum.lineage.registry import fetch_files, model_key, sign_version, signatures_key
    from quorum.lineage.signing import check_quorum
    from quorum.lineage.tracking import set_version_tags

    approver = approver_for_private_key(key, governance)
    _require_usable_key(governance, approver)
    ctx = load_context(str(config_path), str(governance_path))
    try:
        ctx.tracker.client.get_model_version(model, version)
    except Exception as exc:  # MLflow raises RestException for an unknown version
        raise ConfigError(f"{model} has no version {version}", fix="see the versions with `quorum ui`") from exc
    from quorum.lineage.provenance import verify_provenance

    verify_provenance(fetch_files(ctx.tracker, ctx.store, model, version), model, version)  # sign only what it claims
    [signature] = sign_version(ctx.store, model, version, [(approver, key)])
    set_version_tags(ctx.tracker, model, version, {f"signature.{approver}": signature.digest})
    ctx.audit.append("approval", approver, {"model": model, "version": version, "signature": signature.digest})
    quorum = check_quorum(
        ctx.store.checkout(model_key(model, version)), ctx.store.checkout(signatures_key(model, version)), governance
    )
    print(f"{approver} signed {model} v{version}: {len(quorum.valid_approvers)} of {quorum.required} approvals")
    if quorum.met:
        from quorum.flows.promote import promote_approved

        promote_approved(ctx, version)
        print(f"{model} v{version} is now the champion")
    return 0


def _require_usable_key(governance: GovernanceConfig, approver: str) -> None:
    from quorum.configs.errors import NotPermitted
    from quorum.lineage.signing import today_utc

    problem = governance.approver(approver).key_problem(today_utc())
    if problem:
        raise NotPermitted(f"{problem}; its signatures would not count", fix="sign with a current, unrevoked key")


def rollback(
    config_path: Path,
    governance_path: Path,
    model: str,
    key: Path,
    to_version: str | None,
    reason: str,
    verbose: bool = False,
) -> int:
    config, _ = _prepare(config_path)
    load_governance(governance_path)
    if model != config.model_name:
        raise ConfigError(
            f"this federation registers {config.model_name!r}, not {model!r}",
            fix=f"quorum rollback {config.model_name} --key ...",
        )
    from quorum.flows.context import load_context
    from quorum.flows.governance import rollback_flow

    _quiet_console(verbose)
    result = rollback_flow(load_context(str(config_path), str(governance_path)), key, to_version, reason)
    print(
        f"{model} v{result.to_version} is the champion again, v{result.from_version} is rolled back "
        f"(signed by {', '.join(result.quorum.valid_approvers)}; provenance sha256:{result.provenance_sha256})\n"
        "sites load it with `quorum deploy --site ID`"
    )
    return 0


def deploy(config_path: Path, governance_path: Path, site_id: str, verbose: bool = False) -> int:
    config, _ = _prepare(config_path)
    load_governance(governance_path)
    config.site(site_id)
    from quorum.flows.deploy import deploy_flow

    _quiet_console(verbose)
    deployment = deploy_flow(str(config_path.resolve()), str(governance_path.resolve()), site_id)
    print(
        f"{site_id} runs {deployment.model} v{deployment.version} "
        f"(signed by {', '.join(deployment.signers)}; provenance sha256:{deployment.provenance_sha256})"
    )
    return 0


def drift_check(
    config_path: Path, governance_path: Path, *, trigger: bool, check_sites: bool, verbose: bool = False
) -> int:
    """Print each site's drift and the decision; with ``trigger``, start the retraining it calls for.

    Retraining is started through the lifecycle deployment, so it needs a Prefect server that has it:
    the one `quorum up` started, or any server ``PREFECT_API_URL`` names. Without one, ``--trigger``
    is refused before anything runs, instead of deciding and then failing to act.
    """
    config, state = _prepare(config_path)
    load_governance(governance_path)
    if trigger and not os.environ.get("PREFECT_API_URL"):
        _use_running_stack(config, state)
    from quorum.flows.drift_check import drift_check_flow

    _quiet_console(verbose)
    result = drift_check_flow(
        str(config_path.resolve()), str(governance_path.resolve()), trigger=trigger, check_sites=check_sites
    )
    for site_id, summary in result.summaries.items():
        drifted = ", ".join(summary.drifted_columns) or "none"
        prediction = (
            ""
            if summary.prediction is None
            else f", prediction {'drifted' if summary.prediction.drifted else 'stable'}"
        )
        print(f"{site_id:<16} drift share {summary.drift_share:.0%} (drifted: {drifted}{prediction})")
        for problem in summary.problems:
            print(f"{'':<16} note: {problem}")
    for site_id, why in result.unavailable.items():
        print(f"{site_id:<16} unknown: {why}")
    print(result.reason)
    if result.note:
        print(result.note)
    elif result.retrain and not trigger:
        print("retraining not started: run `quorum drift-check --trigger` (needs `quorum up`) or `quorum run`")
    return 0


def _use_running_stack(config: FederationConfig, state: StateLayout) -> None:
    """Point this process at the Prefect and MLflow servers of `quorum up`, or explain that retraining needs them."""
    from quorum.configs.errors import NotDeployed
    from quorum.infra.stack import Stack

    stack = Stack(config, state)
    if not stack.service("prefect-server").alive():
        raise NotDeployed(
            "retraining on drift starts the lifecycle deployment on the Prefect server, "
            "and no server is running for this federation (local mode)",
            fix="run `quorum up` first, then `quorum drift-check --trigger`; "
            "without --trigger the check only reports its decision",
        )
    os.environ["PREFECT_API_URL"] = stack.prefect_url
    os.environ["MLFLOW_TRACKING_URI"] = stack.mlflow_url


def audit_show(config_path: Path) -> int:
    from quorum.lineage.audit import AuditLog

    config = load_federation(config_path)
    for entry in AuditLog(StateLayout(config.state_dir).audit_log).entries():
        print(f"{entry.index:>4} {entry.timestamp} {entry.event:<24} {entry.actor:<12} {entry.details}")
    return 0


def audit_verify(config_path: Path) -> int:
    from quorum.lineage.audit import AuditLog

    config = load_federation(config_path)
    count = AuditLog(StateLayout(config.state_dir).audit_log).verify()
    print(f"audit log intact: {count} entries")
    return 0


def ui(config_path: Path, port: int) -> int:
    config, state = _prepare(config_path)
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if mlflow is None:
        raise QuorumError("the mlflow command is not installed", fix="run `make demo` to install the project")
    address = f"http://127.0.0.1:{port}"
    print(f"MLflow UI for {config.name}: {address}  (Ctrl-C to stop)")
    command = [
        mlflow,
        "ui",
        "--backend-store-uri",
        state.tracking_uri,
        "--default-artifact-root",
        state.mlflow_artifacts.resolve().as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return subprocess.call(command, env={**os.environ, "MLFLOW_TRACKING_URI": state.tracking_uri})

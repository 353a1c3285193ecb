"""What each ``quorum`` command does; imported only once a command has been chosen."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from quorum.cli.heap import imports_frozen
from quorum.configs.errors import ConfigError, QuorumError
from quorum.configs.schema import FederationConfig, GovernanceConfig, load_federation, load_governance
from quorum.lineage.state import StateLayout, configure_environment, use_tracking_server

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from quorum.flows.runners.site_workers import SiteWorkers
    from quorum.infra.local_api import TemporaryApi
    from quorum.infra.stack import Stack


def _prepare(config_path: Path) -> tuple[FederationConfig, StateLayout]:
    """Validate the config, then point Prefect/MLflow at its state folder before they are imported."""
    config = load_federation(config_path)
    state = StateLayout(config.state_dir)
    configure_environment(state)
    use_tracking_server(state, config.deployment.mlflow_tracking_uri)
    return config, state


def _local_api(state: StateLayout) -> TemporaryApi | None:
    """Start this command's temporary Prefect API now, so it comes up while the rest loads (before Prefect
    is imported); ``None`` when a server is configured. Say so when the first run creates its database."""
    from quorum.infra.local_api import start_temporary_api

    api = start_temporary_api(state)
    if api is not None and api.first_run:
        print(
            "first run of this federation: preparing its local Prefect database "
            "(this can take a minute on a busy machine; later runs start faster)",
            flush=True,
        )
    return api


def _open_tracking_store(config_path: Path, api: TemporaryApi | None) -> None:
    """While the temporary Prefect API starts: import MLflow and open (on a first run, create) the tracking
    store, which the job opens again at once; otherwise both would wait for the API, one after the other."""
    if api is None or api.ready:
        return
    from quorum.lineage.tracking import open_tracker

    config = load_federation(config_path)
    open_tracker(StateLayout(config.state_dir), config.name)


def _wait_for_api(api: TemporaryApi | None) -> None:
    if api is not None:
        api.wait()


def _use_the_wait(api: TemporaryApi | None, workers: SiteWorkers | None, resume: bool) -> None:
    """While the temporary API is still starting this process would only sleep: it loads what the job's first
    stage needs instead (Great Expectations and its context, seconds that preprocessing would otherwise pay).
    Not when site worker processes preprocess, nor for a resumed job, which may not preprocess at all."""
    if api is not None and workers is None and not resume and not api.answers():
        _load_first_stage()


def _load_first_stage() -> None:
    """Import Great Expectations and build this process's context ahead of preprocessing.

    Only a head start: a failure here is left to preprocessing, which imports it again and reports the
    failure per site as it always does, so the job's report does not depend on when the import ran.
    """
    from quorum.tasks import contract

    try:
        contract.warm_up()
    except Exception:  # reported by preprocessing, which retries the import (see the docstring)
        logger.debug("loading Great Expectations ahead of preprocessing failed", exc_info=True)


def _require_key_files(keys: list[Path] | list[str], option: str) -> None:
    """An approver key must be a readable file: a folder or a missing path gets an error and a fix."""
    for key in map(Path, keys):
        if key.is_dir():
            raise ConfigError(
                f"{option} {key} is a folder, not a private key file",
                fix=f"pass the key file itself, e.g. {option} {key / 'NAME.key'} (`quorum keys generate` writes it)",
            )
        if not key.is_file():
            raise ConfigError(f"private key {key} does not exist", fix=f"pass the path of your .key file with {option}")


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


def demo_keys(governance: GovernanceConfig) -> list[str]:
    """The demo approvers' private keys: the checked-in ``.key`` beside each pinned public key.

    ``configs/governance.yaml`` pins the demo keys in ``configs/demo-keys/`` (public test keys, for the
    demo only), so `make demo` works from a fresh clone; real approvers replace them.
    """
    keys = []
    for approver in governance.approvers:
        private = approver.public_key.with_suffix(".key")
        if not private.is_file():
            raise ConfigError(
                f"no demo private key {private} for approver {approver.name}",
                fix="`quorum demo` signs only with the checked-in demo keys; use `quorum run` and "
                "`quorum approve --key` with your own governance",
            )
        keys.append(str(private))
    return keys


def demo(config_path: Path, governance_path: Path, verbose: bool, launched_s: float | None = None) -> int:
    config, state = _prepare(config_path)
    api = _local_api(state)
    from quorum.tasks.synth import synth_federation

    written = synth_federation(config)
    print(
        f"demo federation {config.name}: {len(config.sites)} sites"
        + (f", wrote {len(written)} data files" if written else ", data already present")
    )
    keys = demo_keys(load_governance(governance_path))
    workers = _site_workers(config)
    return _run_and_report(
        config_path, governance_path, keys, None, verbose, api=api, launched_s=launched_s, workers=workers
    )


def run(
    config_path: Path,
    governance_path: Path,
    approve_with: list[str],
    job_id: str | None,
    verbose: bool,
    runner: str = "local",
    resume: str | None = None,
    force: bool = False,
    launched_s: float | None = None,
) -> int:
    """Run the lifecycle; unless ``force``, stop after preprocessing when nothing changed since the champion."""
    config, state = _prepare(config_path)
    load_governance(governance_path)
    _require_key_files(approve_with, "--approve-with")
    api = workers = None
    if runner == "pool":
        _use_stack(config, state)
    else:
        api = _local_api(state)
        workers = _site_workers(config)
    job = resume or job_id
    return _run_and_report(
        config_path,
        governance_path,
        approve_with,
        job,
        verbose,
        runner,
        bool(resume),
        not force,
        api=api,
        launched_s=launched_s,
        workers=workers,
    )


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


def worker(config_path: Path, governance_path: Path, site_id: str, api_url: str | None) -> int:
    """What a site host runs: its pool's worker, with only its own data root and credentials, pinned to
    this host's config and governance files (its flow runs refuse others)."""
    config, state = _prepare(config_path)
    load_governance(governance_path)
    from quorum.infra.deployments import site_pool
    from quorum.infra.stack import Stack

    stack = Stack(config, state, governance_path=governance_path)
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
    *,
    api: TemporaryApi | None = None,
    launched_s: float | None = None,
    workers: SiteWorkers | None = None,
) -> int:
    with workers or contextlib.nullcontext():
        from quorum.cli.report import RoundProgress, print_summary
        from quorum.flows.lifecycle import lifecycle

        _quiet_console(verbose)
        _open_tracking_store(config_path, api)
        _use_the_wait(api, workers, resume)
        _wait_for_api(api)
        with imports_frozen(), RoundProgress() as progress:
            result = lifecycle(
                config_path=str(config_path.resolve()),
                governance_path=str(governance_path.resolve()),
                approver_keys=keys,
                job_id=job_id,
                runner="pool" if runner == "pool" else "local",
                resume=resume,
                only_if_changed=only_if_changed,
                on_round=progress,
                site_workers=workers,
            )
    print_summary(result, launched_s=launched_s)
    return 0


def _site_workers(config: FederationConfig) -> SiteWorkers | None:
    """Start the embedded runner's site worker processes now: they load the site code (Great Expectations,
    torch) on the other cores while this process imports Prefect and MLflow and waits for its API."""
    from quorum.flows.runners.site_workers import start_site_workers

    return start_site_workers(config.deployment.site_processes)


def up(
    config_path: Path,
    governance_path: Path,
    prefect_file: Path,
    database: str | None = None,
    site_workers: bool = True,
) -> int:
    config, state = _prepare(config_path)
    from quorum.infra.stack import Stack

    stack = Stack(config, state, database, governance_path=governance_path)
    os.environ["PREFECT_API_URL"] = stack.prefect_url  # before anything imports Prefect
    project = Path.cwd().resolve()
    where = "PostgreSQL" if stack.database else "SQLite"
    print(f"starting Prefect on {stack.prefect_url} ({where}) and MLflow on {stack.mlflow_url} ...")
    timings = stack.up(
        project, prefect_file, site_workers, render=lambda: render_infra(config_path, governance_path, prefect_file)
    )
    pools = stack.pool_names()
    print(f"pools ready: {', '.join(pools)}" + ("" if site_workers else " (site workers: `quorum worker --site ID`)"))
    from quorum.infra.serving_stack import start_serving

    for service in start_serving(stack, config):
        print(
            f"serving {service.site_id}: {service.url} (flow run {service.flow_run_id}; 503 until a champion verifies)"
        )
    print(f"up in {timings['workers_ready']:.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + ")")
    print(
        f"Prefect UI: http://127.0.0.1:{config.deployment.prefect_port}   "
        f"MLflow UI: {stack.mlflow_url}\nstop everything with `quorum down`"
    )
    return 0


def status(config_path: Path, governance_path: Path | None = None) -> int:
    config, state = _prepare(config_path)
    from quorum.infra.stack import Stack

    stack = Stack(config, state)
    for service in stack.services():
        print(f"{service.name:<24} {'running pid ' + str(service.pid()) if service.alive() else 'stopped'}")
    print_data_status(config, state)
    if governance_path is not None:
        print_champion_status(config, state, governance_path)
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
    from quorum.infra.serving_stack import serving_status

    for line in serving_status(stack):
        print(line)
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


def print_champion_status(config: FederationConfig, state: StateLayout, governance_path: Path) -> None:
    """The signed champion statement, and a warning when the MLflow alias does not mirror it."""
    from quorum.lineage.artifacts import federation_store
    from quorum.lineage.champion import alias_disagreement, current_statement
    from quorum.lineage.signing import today_utc

    governance = load_governance(governance_path)
    try:
        statement = current_statement(federation_store(config), governance, config.model_name, today_utc())
    except QuorumError as error:
        print(f"WARNING: the champion statement does not verify: {error.message}")
        return
    if statement is None:
        print(f"champion: no signed statement for {config.model_name} yet")
    else:
        print(
            f"champion: {config.model_name} v{statement.version} (statement {statement.sequence}, {statement.action}, "
            f"signed by {', '.join(statement.signers)})"
        )
    if not os.environ.get("MLFLOW_TRACKING_URI") and not state.mlflow_db.exists():
        return
    from quorum.lineage.tracking import CHAMPION, alias_version, open_tracker

    problem = alias_disagreement(
        statement, alias_version(open_tracker(state, config.name), config.model_name, CHAMPION)
    )
    if problem:
        print(f"WARNING: {problem}")


def down(config_path: Path) -> int:
    config, state = _prepare(config_path)
    from quorum.infra.serving_stack import stop_serving
    from quorum.infra.stack import Stack

    stack = Stack(config, state)
    os.environ["PREFECT_API_URL"] = stack.prefect_url
    stopped = stop_serving(stack, stack.service("prefect-server").alive()) + stack.stop()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def render_infra(config_path: Path, governance_path: Path, out: Path) -> int:
    """Write the deployments file; it names no private key, so scheduled runs stop awaiting approval."""
    from quorum.infra.deployments import render, write

    config, _ = _prepare(config_path)
    governance = load_governance(governance_path)
    assert governance.source is not None
    write(render(config, governance.source, Path.cwd()), out)
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
    from quorum.lineage.keys import public_key_fingerprint

    fingerprint = public_key_fingerprint(public)
    print(
        f"private key: {private} (mode 0600, keep it secret)\npublic key:  {public}\n"
        f"fingerprint: {fingerprint} (pin it in governance.yaml as this approver's `fingerprint`)"
    )
    if config is not None:
        from quorum.lineage.audit import AuditLog

        details = {"approver": name, "fingerprint": fingerprint, "public_key": str(public.resolve())}
        AuditLog(StateLayout(config.state_dir).audit_log).append("key_generated", name, details)
        print(f"recorded in the audit log of {config.name}: key_generated {name} sha256:{fingerprint}")
    return 0


def _approver_command(
    config_path: Path, governance_path: Path, model: str, keys: list[Path], usage: str
) -> StateLayout:
    """What `approve` and `rollback` check before anything runs: the configs, the key files and the model name."""
    config, state = _prepare(config_path)
    load_governance(governance_path)
    _require_key_files(keys, "--key")
    if model != config.model_name:
        raise ConfigError(
            f"this federation registers {config.model_name!r}, not {model!r}",
            fix=usage.format(model=config.model_name),
        )
    return state


def approve(config_path: Path, governance_path: Path, model: str, version: str, key: Path) -> int:
    """Sign a version on the approver's own machine; the promotion flow promotes once the quorum is met."""
    state = _approver_command(
        config_path, governance_path, model, [key], f"quorum approve {{model}} --version {version} --key ..."
    )
    from quorum.lineage.keys import load_private_key

    load_private_key(key)  # a bad --key path is named before any flow starts
    from quorum.flows.context import load_context
    from quorum.flows.promote import approve_flow

    api = _local_api(state)
    _quiet_console(False)
    _wait_for_api(api)
    result = approve_flow(load_context(str(config_path), str(governance_path)), version, key)
    print(f"{result.approver} signed {model} v{version}: {result.approvals} of {result.required} approvals")
    if result.promotion is not None:
        print(f"{model} v{version} is now the champion (signed champion statement published)")
    return 0


def rollback(
    config_path: Path,
    governance_path: Path,
    model: str,
    keys: list[Path],
    to_version: str | None,
    reason: str,
    verbose: bool = False,
) -> int:
    """Roll the champion back with one --key per approver: the statement needs the governance quorum."""
    state = _approver_command(
        config_path, governance_path, model, keys, "quorum rollback {model} --key A.key --key B.key ..."
    )
    from quorum.lineage.keys import rollback_signers
    from quorum.lineage.signing import today_utc

    rollback_signers(load_governance(governance_path), keys, today_utc())  # too few keys: refused before any flow
    api = _local_api(state)
    from quorum.flows.context import load_context
    from quorum.flows.governance import rollback_flow

    _quiet_console(verbose)
    _wait_for_api(api)
    result = rollback_flow(load_context(str(config_path), str(governance_path)), keys, to_version, reason)
    print(
        f"{model} v{result.to_version} is the champion again, v{result.from_version} is rolled back "
        f"(rollback statement signed by {', '.join(result.signers)}; v{result.to_version} signed by "
        f"{', '.join(result.quorum.valid_approvers)}; provenance sha256:{result.provenance_sha256})\n"
        "sites load it with `quorum deploy --site ID`"
    )
    return 0


def deploy(config_path: Path, governance_path: Path, site_id: str, verbose: bool = False) -> int:
    config, state = _prepare(config_path)
    load_governance(governance_path)
    config.site(site_id)
    api = _local_api(state)
    from quorum.flows.deploy import deploy_flow

    _quiet_console(verbose)
    _wait_for_api(api)
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
    api = _local_api(state)
    from quorum.flows.drift_check import drift_check_flow

    _quiet_console(verbose)
    _wait_for_api(api)
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


def audit_verify(config_path: Path, governance_path: Path) -> int:
    """Check the chain, then that it still holds the newest signed checkpoint and every site's witnessed head."""
    from quorum.flows.deploy import trust_record
    from quorum.lineage.anchor import verify_anchored
    from quorum.lineage.audit import AuditLog

    config = load_federation(config_path)
    governance = load_governance(governance_path)
    witnesses = {site.id: trust_record(site) for site in config.sites}
    audit = AuditLog(StateLayout(config.state_dir).audit_log)
    count, anchors, notes = verify_anchored(audit, governance, witnesses)
    from quorum.lineage.artifacts import federation_store
    from quorum.lineage.champion import require_backed_champion_events

    entries = [(e.index, e.event, e.details) for e in audit.entries()]
    require_backed_champion_events(entries, federation_store(config), governance, config.model_name, audit.path)
    newest = max((a.index for a in anchors), default=None)
    anchored = f", anchored up to entry {newest} by {len(anchors)} record(s)" if newest is not None else ", unanchored"
    print(f"audit log intact: {count} entries{anchored}")
    for note in notes:
        print(f"  note: {note}")
    return 0


def governance_sign(governance_path: Path, new_path: Path, key: Path) -> int:
    from quorum.lineage.governance_chain import sidecar, sign_rotation

    governance = load_governance(governance_path)
    approver, held = sign_rotation(governance_path.resolve(), new_path.resolve(), key)
    print(
        f"{approver} signed {new_path} ({held} of {governance.quorum} signatures of governance version "
        f"{governance.version}'s approvers, in {sidecar(new_path)})"
    )
    return 0


def governance_adopt(governance_path: Path, new_path: Path) -> int:
    from quorum.lineage.governance_chain import adopt, history_dir

    new = adopt(governance_path.resolve(), new_path.resolve())
    print(
        f"{governance_path} is now governance version {new.version}; the history with its signatures is in "
        f"{history_dir(governance_path)} (commit both)"
    )
    return 0


def governance_verify(governance_path: Path, config_path: Path | None) -> int:
    """Verify the governance chain from version 1, and from each site's accepted version when a config is given."""
    from quorum.lineage.champion import read_trust
    from quorum.lineage.governance_chain import root_digest, verify_chain

    governance = verify_chain(governance_path.resolve())
    print(f"{governance_path}: governance version {governance.version}, chain verified from version 1")
    print(f"  root (sha256 of version 1): {root_digest(governance_path.resolve())}")
    if config_path is not None:
        from quorum.flows.deploy import trust_record

        config = load_federation(config_path)
        if config.governance_root is None:
            raise ConfigError(
                f"{config_path} pins no governance_root; sites refuse to deploy without one",
                fix=f"check the root above against governance version 1 in git, then add "
                f"`governance_root: {root_digest(governance_path.resolve())}` to {config_path}",
            )
        verify_chain(governance_path.resolve(), root=config.governance_root)
        print(f"  pinned by {config_path}: the chain starts at its governance_root")
        for site in config.sites:
            seen = read_trust(trust_record(site)).get("governance")
            if isinstance(seen, dict):
                verify_chain(governance_path.resolve(), (int(seen["version"]), str(seen["sha256"])))
                print(f"  site {site.id}: accepted version {seen['version']}, chains to the current file")
            else:
                print(f"  site {site.id}: no governance accepted yet (its first deploy walks the chain from the root)")
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

"""Beyond one machine, by configuration only: Prefect and MLflow on PostgreSQL, artifacts on S3.

A private PostgreSQL cluster and an S3-compatible server (moto) on 127.0.0.1, `quorum up --database`
as a user types it, two site workers with credentials of their own, and a 2-site lifecycle through
the pools. The S3 endpoint is reached through a proxy that can fail on demand, for the outage test.
Everything started here is stopped here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from quorum.configs.schema import load_federation, load_governance
from quorum.configs.site_pins import CONFIG_PIN_ENV, GOVERNANCE_PIN_ENV
from quorum.infra.stack import Stack
from quorum.lineage.state import StateLayout
from tests.federation import POOL_GATES, site_entry, write_federation, write_governance
from tests.postgres_server import postgres_cluster
from tests.s3_server import FlakyProxy, dummy_aws_env, free_port, moto_server, raw_client

pytestmark = pytest.mark.integration
QUORUM = str(Path(sys.executable).with_name("quorum"))
SITES = ("alpha", "beta")
ARTIFACTS, MLFLOW = "quorum-artifacts", "quorum-mlflow"
MODEL = "test-model"


def _federation(root: Path, pg_mlflow: str, endpoint: str, rounds: int) -> Path:
    sites = {site_id: {**site_entry(site_id), "aws_credentials_file": f"credentials/{site_id}"} for site_id in SITES}
    deployment = {
        "prefect_port": free_port(),
        "mlflow_port": free_port(),
        "mlflow_database": pg_mlflow,
        "mlflow_artifacts": f"s3://{MLFLOW}/runs",
        "round_deadline_s": 60,
        "session_start_timeout_s": 240,
    }
    storage = {
        "artifacts": f"s3://{ARTIFACTS}/fed",
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "retry_deadline_s": 90,
    }
    return write_federation(
        root,
        SITES,
        rounds=rounds,
        min_sites=2,
        gates=POOL_GATES,
        extra={"sites": sites, "deployment": deployment, "storage": storage, "drift": {"min_rows": 30}},
    )


def _site_credentials(root: Path) -> None:
    """Each site's own key pair, in a file only that site's worker is pointed at."""
    folder = root / "credentials"
    folder.mkdir()
    for site_id in SITES:
        (folder / site_id).write_text(
            f"[default]\naws_access_key_id = {site_id}-key\naws_secret_access_key = {site_id}-secret\n"
        )


@pytest.fixture(scope="module")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("scale")
    (root / "coordinator-aws").mkdir()
    aws = dummy_aws_env(root / "coordinator-aws")  # the coordinator's credentials
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))} | aws
    with ExitStack() as scope, pytest.MonkeyPatch.context() as patch:
        for name, value in aws.items():
            patch.setenv(name, value)
        postgres = scope.enter_context(postgres_cluster(("prefect", "mlflow")))
        endpoint = scope.enter_context(moto_server())
        proxy = scope.enter_context(FlakyProxy(endpoint))
        client = raw_client(endpoint)  # straight to the server: the test's view is never cut off
        client.create_bucket(Bucket=MLFLOW)  # ARTIFACTS is created by `quorum up`
        _site_credentials(root)
        config_path = _federation(root, postgres.url("mlflow"), proxy.endpoint, rounds=4)
        governance_path, keys = write_governance(root)
        command = [QUORUM, "up", "--config", str(config_path), "--governance", str(governance_path)]
        command += ["--prefect-file", str(root / "prefect.yaml"), "--database", postgres.url("prefect")]
        command += ["--no-site-workers"]  # the sites start their own, as on their own hosts
        down = [QUORUM, "down", "--config", str(config_path)]
        scope.callback(subprocess.run, down, cwd=root, env=env, capture_output=True, timeout=120, check=False)
        started = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert started.returncode == 0, started.stdout + started.stderr
        config = load_federation(config_path)
        api = Stack(config, StateLayout(config.state_dir)).prefect_url
        site_host = {k: v for k, v in env.items() if not k.startswith("AWS_")}  # a site host has none of ours
        workers = {}
        for site_id in SITES:
            worker = [QUORUM, "worker", "--site", site_id, "--config", str(config_path), "--api-url", api]
            worker += ["--governance", str(governance_path)]  # the site's checkout: its runs are held to both
            workers[site_id] = subprocess.Popen(
                worker,
                cwd=root,
                env=site_host,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            scope.callback(_stop, workers[site_id])
        yield {
            "root": root,
            "env": env,
            "config": config_path,
            "governance": governance_path,
            "keys": keys,
            "postgres": postgres,
            "client": client,
            "proxy": proxy,
            "workers": workers,
        }


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _run(infra: dict[str, Any], job_id: str, *extra: str) -> subprocess.Popen[str]:
    command = [QUORUM, "run", "--runner", "pool", "--config", str(infra["config"]), *extra]
    command += ["--governance", str(infra["governance"]), "--job-id", job_id]
    for key in infra["keys"][:2]:
        command += ["--approve-with", key]
    return subprocess.Popen(
        command, cwd=infra["root"], env=infra["env"], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _keys(client: Any, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [str(item["Key"]) for page in pages for item in page.get("Contents", [])]


def _query(infra: dict[str, Any], database: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(infra["postgres"].url(database)) as connection, connection.cursor() as cursor:
        cursor.execute(sql)
        return list(cursor.fetchall())


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_lifecycle_on_postgres_and_s3(infra: dict[str, Any]) -> None:
    process = _run(infra, "scale-job-1")
    out, err = process.communicate(timeout=900)
    client, config = infra["client"], load_federation(infra["config"])

    assert process.returncode == 0, err + out
    assert "champion" in out and "Traceback" not in err
    # the registry and Prefect's runs live in PostgreSQL
    assert _query(infra, "mlflow", f"select version from model_versions where name = '{MODEL}'") == [(1,)]
    assert ("champion", 1) in _query(infra, "mlflow", "select alias, version from registered_model_aliases")
    sessions = _query(
        infra,
        "prefect",
        "select pool.name from flow_run run join work_queue queue on run.work_queue_id = queue.id "
        "join work_pool pool on queue.work_pool_id = pool.id where run.tags ? 'job:scale-job-1'",
    )
    assert sorted(row[0] for row in sessions) == ["site-alpha", "site-beta"]
    # model files, provenance, signatures and every round in the artifact bucket; MLflow's model in its own
    stored = _keys(client, ARTIFACTS, "fed/")
    version = f"fed/models/{MODEL}/v1"
    assert f"{version}/files/MLmodel" in stored and f"{version}/files/provenance.json" in stored
    assert {f"{version}/signatures/ann.sig", f"{version}/signatures/ben.sig"} <= set(stored)
    assert [k for k in stored if k.startswith("fed/jobs/scale-job-1/rounds/") and k.endswith("global.npz")]
    assert any(k.endswith("/MLmodel") for k in _keys(client, MLFLOW, "runs/"))
    assert not any(p.is_file() for p in StateLayout(config.state_dir).artifacts.rglob("*"))  # no local copy
    # the signatures verify on what is in the bucket
    from quorum.lineage.artifacts import federation_store
    from quorum.lineage.registry import verify_version

    quorum = verify_version(federation_store(config), load_governance(infra["governance"]), MODEL, "1")
    assert quorum.met and set(quorum.valid_approvers) == {"ann", "ben"}
    # the lineage, read back through the MLflow server on PostgreSQL
    lineage = subprocess.run(
        [
            QUORUM,
            "lineage",
            MODEL,
            "--version",
            "1",
            "--config",
            str(infra["config"]),
            "--governance",
            str(infra["governance"]),
        ],
        cwd=infra["root"],
        env=infra["env"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert lineage.returncode == 0, lineage.stderr
    for site_id in SITES:
        assert site_id in lineage.stdout
    assert "scale-job-1" in lineage.stdout


def test_site_workers_hold_only_their_own_credentials(infra: dict[str, Any]) -> None:
    for site_id, worker in infra["workers"].items():
        [pid] = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()  # prefect worker
        env = _environ(int(pid))
        assert env["AWS_SHARED_CREDENTIALS_FILE"] == str(infra["root"] / "credentials" / site_id)
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
        # and it is held to the config and governance of its own checkout, whatever a run's parameters say
        assert env[CONFIG_PIN_ENV] == str(infra["config"].resolve())
        assert env[GOVERNANCE_PIN_ENV] == str(infra["governance"].resolve())


def test_job_survives_an_s3_outage_mid_round(infra: dict[str, Any]) -> None:
    client, proxy = infra["client"], infra["proxy"]
    rounds = "fed/jobs/scale-job-2/rounds/"
    process = _run(infra, "scale-job-2", "--force")  # same data as job 1: train anyway
    deadline = time.monotonic() + 600
    while f"{rounds}0002/manifest.json" not in _keys(client, ARTIFACTS, rounds) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.5)
    proxy.outage(5.0)  # sites and coordinator are mid-exchange: every connection is reset for 5 s
    time.sleep(5.0)
    refused = proxy.refused

    out, err = process.communicate(timeout=900)

    assert refused > 0  # the outage was met: requests were cut off and retried
    assert process.returncode == 0, err + out
    assert "Traceback" not in err
    job = _keys(client, ARTIFACTS, "fed/jobs/scale-job-2/")
    assert [k for k in job if k.startswith(rounds) and k.endswith("manifest.json")] == [
        f"{rounds}{r:04d}/manifest.json" for r in range(1, 5)
    ]
    for key in job:  # nothing lost half-written or corrupted: every object matches the digest it was stored with
        head = client.head_object(Bucket=ARTIFACTS, Key=key)
        body = client.get_object(Bucket=ARTIFACTS, Key=key)["Body"].read()
        assert head["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest(), key

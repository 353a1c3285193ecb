"""Scaling out is configuration: database URLs, S3 storage and per-site credentials, as the stack reads them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from quorum.cli.main import main
from quorum.configs.errors import ConfigError
from quorum.configs.schema import expand_secrets, load_federation
from quorum.infra.stack import Stack, prefect_database_url
from quorum.lineage.artifacts import LocalArtifactStore, federation_store
from quorum.lineage.s3_store import S3ArtifactStore
from quorum.lineage.state import StateLayout
from tests.federation import site_entry, write_federation


def _config(tmp_path: Path, **extra: object) -> Path:
    return write_federation(tmp_path, ("alpha", "beta"), extra=dict(extra))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@db:5432/prefect", "postgresql+asyncpg://u:p@db:5432/prefect"),
        ("postgres://u@db/prefect", "postgresql+asyncpg://u@db/prefect"),
        ("postgresql+asyncpg://u@db/prefect", "postgresql+asyncpg://u@db/prefect"),  # already explicit
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
    ],
)
def test_prefect_gets_the_async_driver(given: str, expected: str) -> None:
    assert prefect_database_url(given) == expected


def test_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUORUM_TEST_PW", "s3cret")
    monkeypatch.delenv("QUORUM_TEST_MISSING", raising=False)

    assert expand_secrets("postgresql://q:${QUORUM_TEST_PW}@db/x", "k") == "postgresql://q:s3cret@db/x"
    with pytest.raises(ConfigError, match="QUORUM_TEST_MISSING, which are not set") as error:
        expand_secrets("postgresql://q:${QUORUM_TEST_MISSING}@db/x", "deployment.mlflow_database")
    assert "export QUORUM_TEST_MISSING" in error.value.fix


def test_storage_must_be_an_s3_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    data = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**data, "storage": {"artifacts": "/mnt/shared/artifacts"}}))

    code = main(["status", "--config", str(config)])

    err = capsys.readouterr().err
    assert code == 2
    assert "storage.artifacts" in err and "is not an s3:// URL" in err


def test_the_store_is_local_unless_configured(tmp_path: Path) -> None:
    local = load_federation(_config(tmp_path))
    remote = load_federation(
        _config(tmp_path, storage={"artifacts": "s3://bucket/fed", "endpoint_url": "http://127.0.0.1:9"})
    )

    assert isinstance(federation_store(local), LocalArtifactStore)
    coordinator, site = federation_store(remote), federation_store(remote, "alpha")
    assert isinstance(coordinator, S3ArtifactStore) and isinstance(site, S3ArtifactStore)
    assert coordinator.location == site.location == "s3://bucket/fed"
    assert coordinator.cache != site.cache  # a site mirrors into its own folder, never the coordinator's
    assert site.cache.is_relative_to(remote.site("alpha").root)


def test_site_workers_get_their_own_credentials_and_none_of_the_coordinators(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "coordinator-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "coordinator-secret")
    sites = {
        "alpha": {**site_entry("alpha"), "aws_credentials_file": "creds/alpha"},
        "beta": site_entry("beta"),
    }
    config = load_federation(
        _config(tmp_path, sites=sites, storage={"artifacts": "s3://b/p", "endpoint_url": "http://127.0.0.1:9"})
    )
    stack = Stack(config, StateLayout(config.state_dir))

    alpha, beta, coordinator = stack.site_env("alpha"), stack.site_env("beta"), stack.coordinator_env()

    assert alpha["AWS_SHARED_CREDENTIALS_FILE"] == str(tmp_path / "creds" / "alpha")
    assert "AWS_SHARED_CREDENTIALS_FILE" not in beta
    for env in (alpha, beta):
        assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert coordinator["AWS_ACCESS_KEY_ID"] == "coordinator-key"
    assert coordinator["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9"


def test_mlflow_server_uses_the_configured_database_and_bucket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUORUM_TEST_PW", "s3cr3t-x")
    deployment = {
        "mlflow_database": "postgresql://q:${QUORUM_TEST_PW}@127.0.0.1:5432/mlflow",
        "mlflow_artifacts": "s3://mlflow-bucket/runs",
    }
    config = load_federation(_config(tmp_path, deployment=deployment))
    (tmp_path / "other").mkdir()
    default = load_federation(_config(tmp_path / "other"))

    command, env = Stack(config, StateLayout(config.state_dir)).mlflow_server()
    plain, plain_env = Stack(default, StateLayout(default.state_dir)).mlflow_server()

    assert env["MLFLOW_BACKEND_STORE_URI"] == "postgresql://q:s3cr3t-x@127.0.0.1:5432/mlflow"
    assert not any("s3cr3t" in part for part in command)  # the password never shows in `ps`
    assert command[command.index("--artifacts-destination") + 1] == "s3://mlflow-bucket/runs"
    assert plain_env["MLFLOW_BACKEND_STORE_URI"].startswith("sqlite:///")
    assert plain[plain.index("--artifacts-destination") + 1].startswith("file://")


def test_up_names_a_missing_database_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, deployment={"prefect_port": 4999, "mlflow_port": 4998})

    code = main(
        ["up", "--config", str(config), "--database", "postgresql://q:${QUORUM_NOT_SET_ANYWHERE}@127.0.0.1/prefect"]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert "QUORUM_NOT_SET_ANYWHERE" in err and "Traceback" not in err

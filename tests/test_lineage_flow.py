"""Lineage of a registered version, stale sites and the unchanged-data skip, on one real lifecycle run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from quorum.cli.main import main
from quorum.configs.schema import load_federation
from quorum.lineage.state import StateLayout
from tests.federation import write_federation, write_governance


@pytest.fixture(scope="module")
def lifecycle_run(tmp_path_factory: pytest.TempPathFactory, prefect_harness: Path):  # type: ignore[no-untyped-def]
    from quorum.flows.lifecycle import lifecycle

    root = tmp_path_factory.mktemp("lineage")
    config_path = write_federation(root, site_ids=("alpha", "beta"), rounds=2)
    governance_path, keys = write_governance(root)
    result = lifecycle(str(config_path), str(governance_path), keys[:2])
    assert result.promotion is not None and result.promotion.champion
    return root, config_path, governance_path, result


def _client(config_path: Path):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    uri = StateLayout(load_federation(config_path).state_dir).tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_lineage_prints_data_contracts_code_config_run_and_gates(lifecycle_run, capsys) -> None:  # type: ignore[no-untyped-def]
    _, config_path, _, result = lifecycle_run
    version = result.promotion.version
    tags = _client(config_path).get_model_version("test-model", version).tags

    code = main(["lineage", "test-model", "--version", version, "--config", str(config_path)])

    out = capsys.readouterr().out
    assert code == 0
    assert f"test-model v{version} (candidate, champion)" in out
    for site_id, fp in result.preprocess.fingerprints.items():
        line = next(text for text in out.splitlines() if text.strip().startswith(site_id))
        assert fp.data_hash in line
        assert f"{fp.raw_rows} raw / {fp.train_rows} train / {fp.test_rows} test" in line
        assert f"contract passed {fp.contract.evaluated} expectations" in line
        assert tags[f"contract.{site_id}"] == f"passed {fp.contract.evaluated} expectations"
    for fact in (tags["git_commit"], tags["config_hash"], result.run_id, result.job_id):
        assert fact in out
    assert "verdict      passed" in out
    for gate in result.evaluation.verdict.gates:
        assert f"pass  {gate.name}: " in out


@pytest.mark.parametrize(
    ("model", "version", "fragment"),
    [
        ("test-model", "99", "test-model has no version '99'"),  # a version never registered
        ("other-model", "1", "no registered model 'other-model'"),  # a model this store does not hold
        ("test-model", "latest", "'latest' is not a model version number"),  # aliases are not versions
    ],
    ids=["unknown-version", "unknown-model", "not-a-number"],
)
def test_lineage_of_an_unknown_version_is_a_clear_error(lifecycle_run, capsys, model, version, fragment) -> None:  # type: ignore[no-untyped-def]
    _, config_path, _, _ = lifecycle_run

    code = main(["lineage", model, "--version", version, "--config", str(config_path)])

    err = capsys.readouterr().err
    assert code == 2
    assert "error: Unknown model version" in err and fragment in err and "fix:" in err
    assert "Traceback" not in err


def test_run_on_unchanged_data_stops_after_preprocess(lifecycle_run, capsys) -> None:  # type: ignore[no-untyped-def]
    _, config_path, governance_path, result = lifecycle_run
    client = _client(config_path)
    before = len(client.search_model_versions("name = 'test-model'"))

    code = main(["run", "--config", str(config_path), "--governance", str(governance_path)])

    out = capsys.readouterr().out
    assert code == 0
    assert f"nothing changed since champion test-model v{result.promotion.version}" in out
    assert "quorum run --force" in out
    assert len(client.search_model_versions("name = 'test-model'")) == before
    skipped = client.search_runs(
        [client.get_experiment_by_name("test-federation").experiment_id], "tags.`quorum.skipped` != ''"
    )
    assert len(skipped) == 1


def test_status_names_the_sites_whose_committed_data_differs(lifecycle_run, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    _, config_path, _, result = lifecycle_run
    alpha_hash = result.preprocess.fingerprints["alpha"].data_hash
    project = tmp_path / "project"  # a DVC project whose committed dvc.lock moved beta on
    (project / ".dvc").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    lock = {
        "schema": "2.0",
        "stages": {
            "preprocess@alpha": {"outs": [{"path": "sites/alpha/processed", "md5": alpha_hash}]},
            "preprocess@beta": {"outs": [{"path": "sites/beta/processed", "md5": "0123456789abcdef.dir"}]},
        },
    }
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    config = yaml.safe_load(config_path.read_text())
    config["state_dir"] = str(load_federation(config_path).state_dir)
    moved = project / "federation.yaml"
    moved.write_text(yaml.safe_dump(config))

    code = main(["status", "--config", str(moved)])

    out = capsys.readouterr().out
    assert code == 0
    assert f"alpha: current (data {alpha_hash}" in out
    assert "beta: STALE" in out and "-> 0123456789abcdef.dir" in out
    assert "stale sites: beta;" in out
    assert "the Prefect server is not running" in out  # stale lines come without any server

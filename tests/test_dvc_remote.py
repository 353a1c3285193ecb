"""`quorum data push`: each site's processed data goes only to that site's own DVC remote."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quorum.cli.main import main
from quorum.lineage.dvc import commit_stages
from quorum.tasks.hashing import directory_md5, file_md5

DVC = Path(sys.executable).with_name("dvc")
needs_dvc = pytest.mark.skipif(
    not DVC.exists() or shutil.which("git") is None, reason="needs dvc next to python and git"
)

DVC_YAML = """\
vars:
  - federation.yaml:sites
stages:
  preprocess:
    foreach: ${sites}
    do:
      cmd: quorum preprocess --config federation.yaml --site ${key}
      outs:
        - sites/${key}/processed
"""


def _federation(root: Path, remotes: dict[str, str]) -> Path:
    sites = {s: {"root": f"sites/{s}", "target": "churned", **remotes.get(s, {})} for s in ("alpha", "beta")}
    config = {
        "name": "push-test",
        "model_name": "push-model",
        "state_dir": "state",
        "features": {"numeric": ["age"]},
        "sites": sites,
    }
    path = root / "federation.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git + DVC project with two sites whose processed data is committed to dvc.lock and the cache."""
    home = tmp_path / "home"
    home.mkdir()
    for name, value in {
        "HOME": str(home),  # keep git and dvc away from the real user's config and caches
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache"),
    }.items():
        monkeypatch.setenv(name, value)
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(DVC), "init", "-q"], cwd=root, check=True, capture_output=True)
    _federation(root, {"beta": {"dvc_remote": "../remotes/beta"}})
    (root / "dvc.yaml").write_text(DVC_YAML)
    for site_id in ("alpha", "beta"):
        out = root / "sites" / site_id / "processed"
        out.mkdir(parents=True)
        (out / "train.parquet").write_bytes(f"PAR1 {site_id} train rows".encode())
        (out / "test.parquet").write_bytes(f"PAR1 {site_id} test rows".encode())
    assert set(commit_stages(root, ["alpha", "beta"])) == {"alpha", "beta"}
    return root


def _objects(remote: Path) -> set[str]:
    """Object ids in a DVC 3 remote: files/md5/ab/cdef... -> abcdef..."""
    return {p.parent.name + p.name for p in (remote / "files" / "md5").rglob("*") if p.is_file()}


def _site_objects(root: Path, site_id: str) -> set[str]:
    out = root / "sites" / site_id / "processed"
    return {file_md5(p) for p in out.iterdir()} | {directory_md5(out)}


@pytest.mark.integration
@needs_dvc
def test_push_sends_only_that_sites_objects_to_its_own_remote(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(project / "federation.yaml")

    code = main(["data", "push", "--site", "alpha", "--config", config])

    alpha_remote = project / "sites" / "alpha" / ".dvc-remote"  # the default: inside the site's own folder
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"data {directory_md5(project / 'sites' / 'alpha' / 'processed')}" in out
    assert _objects(alpha_remote) == _site_objects(project, "alpha")
    assert _objects(alpha_remote).isdisjoint(_site_objects(project, "beta"))
    assert not (project.parent / "remotes" / "beta").exists()  # nothing went to the other site's remote


@pytest.mark.integration
@needs_dvc
def test_each_site_has_its_own_remote_in_the_local_config_only(project: Path) -> None:
    config = str(project / "federation.yaml")

    assert main(["data", "push", "--site", "beta", "--config", config]) == 0
    assert main(["data", "push", "--site", "alpha", "--config", config]) == 0

    beta_remote = project.parent / "remotes" / "beta"  # dvc_remote: ../remotes/beta, relative to the config
    assert _objects(beta_remote) == _site_objects(project, "beta")
    assert _objects(project / "sites" / "alpha" / ".dvc-remote") == _site_objects(project, "alpha")
    local = (project / ".dvc" / "config.local").read_text()
    assert "site-alpha" in local and "site-beta" in local
    assert "site-" not in (project / ".dvc" / "config").read_text()  # the shared, committed config is untouched
    ignored = subprocess.run(["git", "check-ignore", ".dvc/config.local"], cwd=project, check=False)
    assert ignored.returncode == 0  # git never sees where a site keeps its data


def test_push_outside_a_dvc_project_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _federation(tmp_path, {})

    code = main(["data", "push", "--site", "alpha", "--config", str(config)])

    err = capsys.readouterr().err
    assert code == 2
    assert "is not inside a DVC project" in err and "fix:" in err


@pytest.mark.integration
@needs_dvc
def test_each_site_pushes_to_its_own_s3_bucket_with_its_own_credentials(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.s3_server import dummy_aws_env, moto_server, raw_client

    for name, value in dummy_aws_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    with moto_server() as endpoint:
        client = raw_client(endpoint)  # the test's own view of the buckets, with the test's credentials
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # from here on only the sites' own files
            monkeypatch.delenv(name)
        remotes = {}
        for site_id in ("alpha", "beta"):
            client.create_bucket(Bucket=f"dvc-{site_id}")
            credentials = project / "sites" / site_id / ".aws-credentials"  # kept at the site, never in git
            credentials.write_text(f"[default]\naws_access_key_id = {site_id}\naws_secret_access_key = {site_id}-s\n")
            remotes[site_id] = {
                "dvc_remote": f"s3://dvc-{site_id}/processed",
                "dvc_endpoint_url": endpoint,
                "aws_credentials_file": f"sites/{site_id}/.aws-credentials",
            }
        config = str(_federation(project, remotes))

        codes = [main(["data", "push", "--site", s, "--config", config]) for s in ("alpha", "beta")]

        stored = {
            site_id: {
                item["Key"].removeprefix("processed/files/md5/").replace("/", "")
                for item in client.list_objects_v2(Bucket=f"dvc-{site_id}").get("Contents", [])
            }
            for site_id in ("alpha", "beta")
        }
    local = (project / ".dvc" / "config.local").read_text()
    assert codes == [0, 0]
    assert stored["alpha"] == _site_objects(project, "alpha") and stored["beta"] == _site_objects(project, "beta")
    assert stored["alpha"].isdisjoint(stored["beta"])
    for site_id in ("alpha", "beta"):  # each remote names its own site's credentials file, and only that one
        section = local.split(f"'remote \"site-{site_id}\"']")[1].split("['")[0]
        assert f"sites/{site_id}/.aws-credentials" in section and endpoint in section
    assert "credentialpath" not in (project / ".dvc" / "config").read_text()

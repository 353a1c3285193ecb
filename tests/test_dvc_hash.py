"""directory_md5 is DVC's own directory digest: pinned against what the real `dvc` writes to dvc.lock."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quorum.lineage.dvc import commit_stages, find_repo, locked_hashes, stage_name
from quorum.tasks.hashing import directory_md5

DVC = Path(sys.executable).with_name("dvc")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not DVC.exists() or shutil.which("git") is None, reason="needs dvc next to python and git"),
]

DVC_YAML = """\
vars:
  - sites.yaml:sites
stages:
  preprocess:
    foreach: ${sites}
    do:
      cmd: echo ${key}
      outs:
        - sites/${key}/processed
"""


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git + DVC project in tmp_path with one `preprocess@a` stage whose output holds three files."""
    home = tmp_path / "home"
    home.mkdir()
    for name, value in {
        "DVC_NO_ANALYTICS": "1",
        "HOME": str(home),  # keep git and dvc away from the real user's config and caches
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache"),  # not /var/tmp/dvc, from `dvc init` on
    }.items():
        monkeypatch.setenv(name, value)
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    (root / "sites.yaml").write_text("sites:\n  a:\n    note: first site\n", encoding="utf-8")
    (root / "dvc.yaml").write_text(DVC_YAML, encoding="utf-8")
    out = root / "sites" / "a" / "processed"
    (out / "nested").mkdir(parents=True)
    (out / "train.parquet").write_bytes(b"PAR1 train rows \x00\x01\x02")
    (out / "test.parquet").write_bytes(b"PAR1 test rows")
    (out / "nested" / "notes.txt").write_text("b\n", encoding="utf-8")
    return root


def dvc(root: Path, *args: str) -> str:
    result = subprocess.run(
        [str(DVC), *args], cwd=root, capture_output=True, text=True, check=False, env={**os.environ}, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def lock_outs(root: Path, stage: str) -> list[dict[str, object]]:
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))
    return list(lock["stages"][stage]["outs"])


def test_directory_md5_equals_the_hash_dvc_commit_records(repo: Path) -> None:
    out = repo / "sites" / "a" / "processed"

    dvc(repo, "commit", "-f", "-q", "preprocess@a")

    [locked] = lock_outs(repo, "preprocess@a")
    assert locked["path"] == "sites/a/processed"
    assert locked["nfiles"] == 3
    assert locked["md5"] == directory_md5(out)


def test_commit_stages_returns_what_dvc_lock_holds(repo: Path) -> None:
    out = repo / "sites" / "a" / "processed"

    committed = commit_stages(repo, ["a", "not-a-stage"])

    assert committed == {"a": directory_md5(out)}
    assert locked_hashes(repo) == committed
    assert find_repo(out.parent) == repo
    assert stage_name("a") == "preprocess@a"


def test_changed_output_changes_both_hashes_alike(repo: Path) -> None:
    out = repo / "sites" / "a" / "processed"
    dvc(repo, "commit", "-f", "-q", "preprocess@a")
    first = directory_md5(out)

    (out / "test.parquet").write_bytes(b"PAR1 other test rows")
    dvc(repo, "commit", "-f", "-q", "preprocess@a")

    [locked] = lock_outs(repo, "preprocess@a")
    assert locked["md5"] == directory_md5(out) != first


def test_dot_files_are_hashed_like_dvc_does(repo: Path) -> None:
    out = repo / "sites" / "a" / "processed"
    (out / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")

    dvc(repo, "commit", "-f", "-q", "preprocess@a")

    [locked] = lock_outs(repo, "preprocess@a")
    assert locked["nfiles"] == 4
    assert locked["md5"] == directory_md5(out)

"""Stale data: committed dvc.lock hashes against the champion's data tags, and `quorum run --force`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from quorum.lineage.dvc import committed_hashes
from quorum.lineage.staleness import SiteDataState, champion_data, changes_since, compare_data, stale_sites

LOCK = """\
schema: '2.0'
stages:
  preprocess@north:
    cmd: quorum preprocess --site north
    outs:
    - path: data/sites/north/processed
      hash: md5
      md5: {north}
  preprocess@south:
    cmd: quorum preprocess --site south
    outs:
    - path: data/sites/south/processed
      hash: md5
      md5: {south}
"""
TAGS = {"data.north": "n1.dir", "data.south": "s1.dir", "rows.north": "10", "config_hash": "cfg"}


def test_champion_data_reads_only_data_tags() -> None:
    assert champion_data(TAGS) == {"north": "n1.dir", "south": "s1.dir"}


def test_compare_names_each_sites_status() -> None:
    states = compare_data(
        ["north", "south", "east", "west"],
        champion_data(TAGS),
        {"north": "n1.dir", "south": "s2.dir", "east": "e1.dir"},
    )

    assert states == (
        SiteDataState("north", "current", "n1.dir", "n1.dir"),
        SiteDataState("south", "stale", "s1.dir", "s2.dir"),
        SiteDataState("east", "new", None, "e1.dir"),  # the champion never saw this site's data
        SiteDataState("west", "unversioned", None, None),  # no dvc.lock entry: cannot be judged
    )
    assert stale_sites(states) == ("south", "east")
    assert "STALE" in states[1].describe("3") and "s1.dir -> s2.dir" in states[1].describe("3")


@pytest.mark.parametrize(
    ("data", "config_hash", "reasons"),
    [
        ({"north": "n1.dir", "south": "s1.dir"}, "cfg", []),
        ({"north": "n1.dir", "south": "s2.dir"}, "cfg", ["site south: data s1.dir -> s2.dir"]),
        ({"north": "n1.dir"}, "cfg", ["site south: trained the champion but takes no part now"]),
        (
            {"north": "n1.dir", "south": "s1.dir", "east": "e1.dir"},
            "cfg",
            ["site east: not in the champion's training data"],
        ),
        ({"north": "n1.dir", "south": "s1.dir"}, "other", ["the federation config changed (config_hash differs)"]),
    ],
    ids=["nothing", "data-changed", "site-dropped", "site-added", "config-changed"],
)
def test_changes_since_the_champion(data: dict[str, str], config_hash: str, reasons: list[str]) -> None:
    assert changes_since(TAGS, data, config_hash) == reasons


@pytest.fixture
def git_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if shutil.which("git") is None:
        pytest.skip("needs git")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # keep git away from the real user's config
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


def _commit(repo: Path) -> None:
    subprocess.run(["git", "add", "dvc.lock"], cwd=repo, check=True)
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", *identity, "commit", "-q", "-m", "lock"], cwd=repo, check=True)


def test_committed_hashes_come_from_git_head_not_the_working_tree(git_repo: Path) -> None:
    lock = git_repo / "dvc.lock"
    lock.write_text(LOCK.format(north="n1.dir", south="s1.dir"))
    _commit(git_repo)
    lock.write_text(LOCK.format(north="n9.dir", south="s9.dir"))  # a `dvc commit` nobody committed to git yet

    hashes, source = committed_hashes(git_repo)

    assert hashes == {"north": "n1.dir", "south": "s1.dir"}
    assert source == "git HEAD"


def test_without_a_commit_the_working_tree_lock_is_used(git_repo: Path) -> None:
    (git_repo / "dvc.lock").write_text(LOCK.format(north="n1.dir", south="s2.dir"))

    assert committed_hashes(git_repo) == ({"north": "n1.dir", "south": "s2.dir"}, "working tree")


@pytest.mark.parametrize(("argv", "only_if_changed"), [([], True), (["--force"], False)], ids=["default", "force"])
def test_quorum_run_checks_for_changes_unless_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], only_if_changed: bool
) -> None:
    import quorum.cli.report
    import quorum.flows.lifecycle
    from quorum.cli.main import main
    from tests.federation import write_federation, write_governance

    config_path = write_federation(tmp_path, site_ids=("alpha", "beta"))
    governance_path, _ = write_governance(tmp_path, approvers=("ann",), quorum=1)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(quorum.flows.lifecycle, "lifecycle", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(quorum.cli.report, "print_summary", lambda result, **_: None)
    monkeypatch.setattr("quorum.cli.commands._quiet_console", lambda verbose: None)

    code = main(["run", "--config", str(config_path), "--governance", str(governance_path), *argv])

    assert code == 0
    assert seen["only_if_changed"] is only_if_changed

"""Which sites' data moved on since the champion was trained, and whether anything changed at all.

The champion's registered version carries a ``data.<site>`` tag per site it was trained on (the DVC
hash of that site's processed data); the committed ``dvc.lock`` carries each site's current data
version. Comparing the two is pure and lives here; reading them is one call each to the DVC and
MLflow adapters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from quorum.lineage import dvc
from quorum.lineage.tracking import CHAMPION, Tracker, alias_version, version_tags

DataStatus = Literal["current", "stale", "new", "unversioned"]
DATA_TAG = "data."


@dataclass(frozen=True)
class SiteDataState:
    """One site's data version against the champion's."""

    site_id: str
    status: DataStatus
    champion_hash: str | None
    current_hash: str | None

    def describe(self, champion_version: str) -> str:
        if self.status == "current":
            return f"{self.site_id}: current (data {self.current_hash} is what champion v{champion_version} used)"
        if self.status == "stale":
            return (
                f"{self.site_id}: STALE, its committed data version differs from champion v{champion_version}'s "
                f"({self.champion_hash} -> {self.current_hash})"
            )
        if self.status == "new":
            return f"{self.site_id}: STALE, champion v{champion_version} was trained without this site's data"
        return f"{self.site_id}: unknown, no committed dvc.lock entry for preprocess@{self.site_id}"


def champion_data(tags: Mapping[str, str]) -> dict[str, str]:
    """Site id -> data hash from a model version's ``data.<site>`` tags."""
    return {key.removeprefix(DATA_TAG): value for key, value in tags.items() if key.startswith(DATA_TAG)}


def compare_data(
    site_ids: Sequence[str], champion: Mapping[str, str], current: Mapping[str, str]
) -> tuple[SiteDataState, ...]:
    """Each configured site's status; a site without a current version cannot be judged."""
    states = []
    for site_id in site_ids:
        old, new = champion.get(site_id), current.get(site_id)
        status: DataStatus
        if not new:
            status = "unversioned"
        elif old is None:
            status = "new"
        else:
            status = "current" if old == new else "stale"
        states.append(SiteDataState(site_id, status, old, new or None))
    return tuple(states)


def stale_sites(states: Sequence[SiteDataState]) -> tuple[str, ...]:
    return tuple(state.site_id for state in states if state.status in ("stale", "new"))


def changes_since(champion_tags: Mapping[str, str], data_hashes: Mapping[str, str], config_hash: str) -> list[str]:
    """Why a new training job would differ from the champion's; empty when nothing changed.

    Training data means the sites that will take part now: a site dropped since (its contract
    fails, say) is a change too, because the champion learned from it.
    """
    champion = champion_data(champion_tags)
    reasons = [
        f"site {state.site_id}: data {state.champion_hash} -> {state.current_hash}"
        if state.status == "stale"
        else f"site {state.site_id}: not in the champion's training data"
        for state in compare_data(sorted(data_hashes), champion, data_hashes)
        if state.status in ("stale", "new")
    ]
    reasons += [
        f"site {site_id}: trained the champion but takes no part now"
        for site_id in sorted(champion)
        if site_id not in data_hashes
    ]
    if champion_tags.get("config_hash") != config_hash:
        reasons.append("the federation config changed (config_hash differs)")
    return reasons


def champion_tags(tracker: Tracker, model_name: str) -> tuple[str | None, dict[str, str]]:
    """The champion's version number and tags, or ``(None, {})`` when there is no champion yet."""
    version = alias_version(tracker, model_name, CHAMPION)
    return (version, version_tags(tracker, model_name, version)) if version is not None else (None, {})


def committed_data(site_roots: Mapping[str, Path]) -> tuple[dict[str, str], str]:
    """Each site's hash in the committed ``dvc.lock`` of the DVC project holding its folder.

    Returns the hashes and where they were read (``git HEAD`` or ``working tree``); sites outside a
    DVC project are left out, and so reported as unversioned.
    """
    hashes: dict[str, str] = {}
    read: dict[Path, tuple[dict[str, str], str]] = {}
    for site_id, root in site_roots.items():
        repo = dvc.find_repo(root)
        if repo is None:
            continue
        if repo not in read:
            read[repo] = dvc.committed_hashes(repo)
        locked = read[repo][0]
        if site_id in locked:
            hashes[site_id] = locked[site_id]
    sources = sorted({f"{source} of {repo / 'dvc.lock'}" for repo, (_, source) in read.items()})
    return hashes, "; ".join(sources) or "no DVC project holds these sites"

"""Stage 1: every site validates and prepares its own data; only fingerprints come back."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, get_run_logger

from quorum.configs.errors import NotEnoughSites, ToolError
from quorum.configs.schema import FederationConfig
from quorum.flows.runners.local import SiteFailure, SiteRunner
from quorum.lineage import dvc
from quorum.tasks.site import DataFingerprint


@dataclass(frozen=True)
class PreprocessResult:
    fingerprints: dict[str, DataFingerprint]
    excluded: dict[str, str]

    @property
    def usable_sites(self) -> list[str]:
        return [s for s, fp in self.fingerprints.items() if fp.usable]


def record_data_versions(config: FederationConfig, fingerprints: dict[str, DataFingerprint]) -> dict[str, str]:
    """Commit each usable site's processed data to ``dvc.lock`` when its folder is a DVC stage output."""
    usable = [s for s, fp in fingerprints.items() if fp.usable]
    if not usable:
        return {}
    repo = dvc.find_repo(config.site(usable[0]).processed_dir.parent)
    if repo is None:
        return {}
    locked = dvc.commit_stages(repo, usable)
    for site_id, locked_hash in locked.items():
        if locked_hash != fingerprints[site_id].data_hash:
            raise ToolError(
                f"dvc.lock records {locked_hash} for site {site_id} but the site reported "
                f"{fingerprints[site_id].data_hash}",
                fix=f"run `dvc status` in {repo}; the processed data changed during the job",
            )
    return locked


def select_sites(config: FederationConfig, outcomes: dict[str, DataFingerprint | SiteFailure]) -> PreprocessResult:
    """Keep sites whose data passed; fail the job when fewer than ``min_sites`` remain."""
    fingerprints = {s: o for s, o in outcomes.items() if isinstance(o, DataFingerprint)}
    excluded = {s: o.describe() for s, o in outcomes.items() if isinstance(o, SiteFailure)}
    for site_id, fp in fingerprints.items():
        if not fp.contract.passed:
            excluded[site_id] = f"{site_id}: data contract failed: " + "; ".join(fp.contract.describe().splitlines())
    result = PreprocessResult(fingerprints, excluded)
    if len(result.usable_sites) < config.training.min_sites:
        reasons = "\n  ".join(excluded.values()) or "no sites configured"
        raise NotEnoughSites(
            f"{len(result.usable_sites)} of {len(config.sites)} sites have usable data, "
            f"training.min_sites is {config.training.min_sites}:\n  {reasons}",
            # a site is left out for its data, or because it never answered: each reason carries its own fix
            fix="follow each site's fix above, or lower training.min_sites to train without those sites "
            "(nothing was trained or registered)",
        )
    return result


@flow(name="preprocess", validate_parameters=False)
def preprocess_flow(
    config: FederationConfig, runner: SiteRunner, site_ids: list[str] | None = None
) -> PreprocessResult:
    logger = get_run_logger()
    outcomes = runner.preprocess(site_ids or list(config.site_ids))
    result = select_sites(config, outcomes)
    for site_id, reason in result.excluded.items():
        logger.warning("site %s excluded: %s", site_id, reason)
    record_data_versions(config, {s: result.fingerprints[s] for s in result.usable_sites})
    return result

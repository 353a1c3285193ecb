"""The committed infra/prefect.yaml is exactly what `quorum infra render` writes for the demo config."""

from __future__ import annotations

from pathlib import Path

import yaml

from quorum.configs.schema import load_federation, load_governance
from quorum.infra.deployments import COORDINATOR_POOL, render

REPO = Path(__file__).resolve().parent.parent


def test_committed_prefect_yaml_matches_the_demo_config() -> None:
    config = load_federation(REPO / "configs" / "federation.yaml")
    governance = load_governance(REPO / "configs" / "governance.yaml")
    keys = [config.state_dir / "keys" / f"{a.name}.key" for a in governance.approvers]

    rendered = render(config, REPO / "configs" / "governance.yaml", REPO, keys)
    committed = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())

    assert committed == rendered


def test_every_site_has_its_pool_and_the_lifecycle_runs_on_the_coordinator() -> None:
    config = load_federation(REPO / "configs" / "federation.yaml")

    deployments = render(config, REPO / "configs" / "governance.yaml", REPO, [])["deployments"]
    pools = {d["name"]: d["work_pool"]["name"] for d in deployments}

    assert pools["lifecycle"] == COORDINATOR_POOL
    for site in config.site_ids:
        for kind in ("session", "preprocess", "monitor", "deploy", "serve"):
            assert pools[f"{kind}-{site}"] == f"site-{site}"

"""The committed infra/prefect.yaml is exactly what `quorum infra render` writes for the demo config."""

from __future__ import annotations

from pathlib import Path

import yaml

from quorum.configs.schema import load_federation
from quorum.infra.deployments import COORDINATOR_POOL, render

REPO = Path(__file__).resolve().parent.parent


def test_committed_prefect_yaml_matches_the_demo_config() -> None:
    config = load_federation(REPO / "configs" / "federation.yaml")

    rendered = render(config, REPO / "configs" / "governance.yaml", REPO)
    committed = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())

    assert committed == rendered


def test_no_deployment_names_a_private_key(tmp_path: Path) -> None:
    """A scheduled or UI-started run holds no signing key: M-of-N needs the approvers themselves."""
    from quorum.cli.main import main

    out = tmp_path / "prefect.yaml"
    code = main(["infra", "render", "--config", str(REPO / "configs" / "federation.yaml"), "--out", str(out)])
    text = out.read_text()

    assert code == 0
    assert "approver_keys" not in text and ".key" not in text
    for deployment in yaml.safe_load(text)["deployments"]:
        assert "approver_keys" not in deployment.get("parameters", {})


def test_every_site_has_its_pool_and_the_lifecycle_runs_on_the_coordinator() -> None:
    config = load_federation(REPO / "configs" / "federation.yaml")

    deployments = render(config, REPO / "configs" / "governance.yaml", REPO)["deployments"]
    pools = {d["name"]: d["work_pool"]["name"] for d in deployments}

    assert pools["lifecycle"] == COORDINATOR_POOL
    for site in config.site_ids:
        for kind in ("session", "preprocess", "monitor", "deploy", "serve"):
            assert pools[f"{kind}-{site}"] == f"site-{site}"

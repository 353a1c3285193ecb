"""The flows a site worker runs outside a job (preprocess, deploy, scheduled monitoring) import only site code.

A fresh interpreter, set up as a site worker starts a flow run (the site's folder, only its data root),
runs the three flows on a real history (v1 champion) through the session's Prefect API and reports
every module it loaded: no MLflow, no registry, no tracking adapter, even though the deployment and
the monitoring both verify and load the champion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quorum.lineage.state import SITE_ROOT_ENV

SITE_FLOWS = """
import json, sys

from quorum.flows.deploy import deploy_flow
from quorum.flows.site_flows import monitor_site_flow, preprocess_site_flow

config, governance = sys.argv[1], sys.argv[2]
preprocess_site_flow(config, "alpha")
deployed = deploy_flow(config, governance, "alpha")
monitor_site_flow(config, governance, "alpha")
print(json.dumps({"version": deployed.version, "modules": sorted(sys.modules)}))
"""

# the coordinator's side: MLflow, the registry that copies from it, the tracking adapter, the lifecycle
FORBIDDEN = ("mlflow", "quorum.lineage.tracking", "quorum.lineage.registry", "quorum.flows.lifecycle")


@pytest.mark.integration  # the site's real work in a fresh Python process, as a site worker runs it
def test_site_flows_load_the_champion_without_mlflow(governed_history: Path, tmp_path: Path) -> None:
    from prefect.settings import get_current_settings

    root = tmp_path / "federation"
    shutil.copytree(governed_history, root)
    site_root = root / "sites" / "alpha"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PREFECT_API_URL=str(get_current_settings().api.url), **{SITE_ROOT_ENV: str(site_root)})

    done = subprocess.run(
        [sys.executable, "-c", SITE_FLOWS, str(root / "federation.yaml"), str(root / "governance.yaml")],
        cwd=site_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["version"] == "1"  # it verified and loaded the champion
    [summary] = (root / "state" / "artifacts" / "monitoring" / "alpha").glob("*.json")
    assert json.loads(summary.read_text())["champion_version"] == "1"  # monitoring scored with it too
    modules = report["modules"]
    assert "quorum.tasks.model_files" in modules and "quorum.lineage.model_files" in modules
    assert [m for m in modules if m in FORBIDDEN or m.split(".")[0] in FORBIDDEN] == []

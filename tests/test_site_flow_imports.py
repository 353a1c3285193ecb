"""The flows a site worker runs outside a job (preprocess, deploy, scheduled monitoring, serve) import only site code.

A fresh interpreter, set up as a site worker starts a flow run (the site's folder, only its data root),
runs the flows on a real history (v1 champion, v2 candidate) through the session's Prefect API and reports
every module it loaded: no MLflow, no registry, no tracking adapter, even though the deployment and
the monitoring both verify and load the champion, and the inference service loads the champion and,
under a shadow policy, the candidate the artifact store's pointer names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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

# the serve flow until its service answers, then Ctrl-C (as `quorum serve` stops): the flow stops its service
SERVE_FLOW = """
import csv, json, os, signal, sys, threading, time, urllib.request

# a test process started from a script's `&` passes SIGINT on ignored: the Ctrl-C below must land
signal.signal(signal.SIGINT, signal.default_int_handler)

from quorum.configs.schema import load_federation
from quorum.flows.serve import serve_flow, service_record

config, governance = sys.argv[1], sys.argv[2]
federation = load_federation(config)
site = federation.site("alpha")
record = service_record(site.root)
with open(site.data_path, newline="") as handle:
    row = next(csv.DictReader(handle))
body = json.dumps({"rows": [{c: row[c] for c in federation.features.columns}]}).encode()
seen = {}


def call(url, data=None):
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=120) as answer:
        return json.loads(answer.read())


def client():
    while True:  # the flow writes its record once its models verified and its port is open
        try:
            port = json.loads(record.read_text())["port"]
            break
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    url = f"http://127.0.0.1:{port}"
    seen["health"] = call(url + "/health")
    seen["answer"] = call(url + "/predict", body)
    os.kill(os.getpid(), signal.SIGINT)


threading.Thread(target=client, daemon=True).start()
try:
    serve_flow(config, governance, "alpha", port=0)
except KeyboardInterrupt:
    pass
print(json.dumps({**seen, "modules": sorted(sys.modules)}))
"""

# the coordinator's side: MLflow, the registry that copies from it, the tracking adapter, the lifecycle
FORBIDDEN = ("mlflow", "quorum.lineage.tracking", "quorum.lineage.registry", "quorum.flows.lifecycle")


def _run_as_site_worker(script: str, root: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as a site worker runs a flow: in alpha's folder, with only alpha's data root."""
    from prefect.settings import get_current_settings

    site_root = root / "sites" / "alpha"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PREFECT_API_URL=str(get_current_settings().api.url), **{SITE_ROOT_ENV: str(site_root)})
    return subprocess.run(
        [sys.executable, "-c", script, str(root / "federation.yaml"), str(root / "governance.yaml")],
        cwd=site_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _site_code_only(modules: list[str]) -> list[str]:
    return [m for m in modules if m in FORBIDDEN or m.split(".")[0] in FORBIDDEN]


@pytest.mark.integration  # the site's real work in a fresh Python process, as a site worker runs it
def test_site_flows_load_the_champion_without_mlflow(governed_history: Path, tmp_path: Path) -> None:
    root = tmp_path / "federation"
    shutil.copytree(governed_history, root)

    done = _run_as_site_worker(SITE_FLOWS, root)

    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["version"] == "1"  # it verified and loaded the champion
    [summary] = (root / "state" / "artifacts" / "monitoring" / "alpha").glob("*.json")
    assert json.loads(summary.read_text())["champion_version"] == "1"  # monitoring scored with it too
    modules = report["modules"]
    assert "quorum.tasks.model_files" in modules and "quorum.lineage.model_files" in modules
    assert _site_code_only(modules) == []


@pytest.mark.integration  # the site's inference service in a fresh Python process, as a site worker runs it
def test_the_serve_flow_serves_the_champion_and_candidate_without_mlflow(
    governed_history: Path, tmp_path: Path
) -> None:
    root = tmp_path / "federation"
    shutil.copytree(governed_history, root)
    config = yaml.safe_load((root / "federation.yaml").read_text())
    config["serving"] = {"routing": {"alpha": {"mode": "shadow"}}}  # the candidate is loaded too
    (root / "federation.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    done = _run_as_site_worker(SERVE_FLOW, root)

    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    health = report["health"]
    assert (health["champion"]["version"], health["candidate"]["version"]) == ("1", "2")
    assert report["answer"]["version"] == "1" and len(report["answer"]["probabilities"]) == 1
    modules = report["modules"]
    assert {"quorum.flows.serving_models", "quorum.lineage.candidate", "quorum.lineage.model_files"} <= set(modules)
    assert _site_code_only(modules) == []

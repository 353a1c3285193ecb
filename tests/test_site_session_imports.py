"""A site session imports only site code: it pays for its imports once per job, on the site's host.

A fresh interpreter does what one session does for a job (preprocess, train, evaluate, monitor and
a promotion's variant check through the exchange) and reports every module it loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.federation import write_federation

SESSION = """
import json, sys
from pathlib import Path

from quorum.configs.schema import load_federation
from quorum.flows.runners import site_session
from quorum.flows.runners.exchange import JobExchange
from quorum.lineage.artifacts import LocalArtifactStore
from quorum.tasks import wire
from quorum.tasks.features import feature_names, merge_moments
from quorum.tasks.model import initial_weights

config = load_federation(sys.argv[1])
exchange = JobExchange(LocalArtifactStore(Path(sys.argv[2])), "job-1")
site_session.warm_up()
answers = {}
for seq, kind in enumerate(("preprocess", "train", "evaluate", "monitor"), start=1):
    weights = None
    if kind != "preprocess":
        mean, std = merge_moments([answers["preprocess"]["moments_obj"]])
        weights = initial_weights(len(feature_names(config.features)), config.model.hidden_sizes, mean, std, 0)
    request = exchange.post(wire.Request("job-1", seq, kind, ("alpha",), 1), weights)
    site_session.handle(config, "alpha", exchange, request)
    reply = exchange.read_reply(seq, "alpha")
    assert reply is not None and "failure" not in reply, reply
    answers[kind] = reply
    if kind == "preprocess":
        answers["preprocess"]["moments_obj"] = wire.decode_fingerprint(reply).moments
# a promotion's variant check: the coordinator ships the ONNX bytes it signs (written here, in this process)
from quorum.lineage.onnx_export import export_variants
folder = export_variants(Path(sys.argv[2]) / "model", weights, feature_names(config.features)).folder
graphs = {"onnx": (folder / "model.onnx").read_bytes(), "onnx-int8": (folder / "model.int8.onnx").read_bytes()}
request = exchange.post(wire.Request("job-1", 5, "variants", ("alpha",), 1), weights, graphs)
site_session.handle(config, "alpha", exchange, request)
reply = exchange.read_reply(5, "alpha")
assert reply is not None and "failure" not in reply, reply
print(json.dumps(sorted(sys.modules)))
"""

# what belongs to the coordinator or to reports a site does not write here
FORBIDDEN = ("mlflow", "evidently", "quorum.lineage.tracking", "quorum.lineage.registry", "quorum.flows.lifecycle")


@pytest.mark.integration  # the site's real work in a fresh Python process, as a site worker runs it
def test_a_site_session_imports_no_coordinator_code(tmp_path: Path) -> None:
    config = write_federation(tmp_path, ("alpha", "beta"), extra={"drift": {"min_rows": 30, "html_report": False}})

    done = subprocess.run(
        [sys.executable, "-c", SESSION, str(config), str(tmp_path / "store")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert "quorum.tasks.training" in modules and "quorum.evaluation.drift" in modules  # it did the work
    assert "quorum.tasks.variants" in modules  # and compared the serving variants
    assert [m for m in modules if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN] == []

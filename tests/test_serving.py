"""`quorum serve`: the verified champion answering on a free loopback port, following the artifact store.

One real federation history is built once per test session (``governed_history``) (v1 champion signed by ann
and ben, v2 signed by ann only, the candidate). Each test serves from its own copy of it, so approvals,
rollbacks and tampering never leak between tests. The service follows the signed champion statement and the
candidate pointer when ``refresh`` is called (its background loop calls the same method), so every swap here
happens at a known point. It is started with the site's own context, as the ``serve-ID`` flow starts it.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from quorum.flows.context import JobContext, load_context
from quorum.flows.deploy import SiteContext, load_site_context
from quorum.flows.serving import RunningService, routing_key, start_service
from quorum.lineage.candidate import candidate_key, read_candidate
from quorum.lineage.provenance import PROVENANCE_FILE
from quorum.lineage.registry import fetched_key, model_key, signatures_key
from quorum.lineage.tracking import CANDIDATE, CHAMPION, set_alias, version_tags
from tests.federation import private_copy

pytestmark = pytest.mark.integration
MODEL = "test-model"
SITE = "alpha"


@dataclass(frozen=True)
class World:
    root: Path
    config_path: Path
    governance_path: Path
    keys: dict[str, Path]

    def context(self) -> JobContext:
        return load_context(str(self.config_path), str(self.governance_path))

    def site_context(self) -> SiteContext:
        """The context the site's service runs with: its own store view, no tracking client."""
        return load_site_context(str(self.config_path), str(self.governance_path), SITE)

    def with_serving(self, serving: dict[str, object]) -> World:
        data = yaml.safe_load(self.config_path.read_text())
        data["serving"] = serving
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        return self

    def files(self, version: str) -> Path:
        return self.root / "state" / "artifacts" / model_key(MODEL, version)

    def signatures(self, version: str) -> Path:
        return self.root / "state" / "artifacts" / signatures_key(MODEL, version)

    def point_candidate_at(self, pointer: object) -> None:
        """Write the candidate pointer as an attacker with write access to the artifact store would."""
        self.context().store.put_json(candidate_key(MODEL), pointer)

    def events(self) -> list[Any]:
        return self.context().audit.entries()

    def approve_v2(self) -> None:
        """ben's `quorum approve`: the second signature completes the quorum and signs the champion statement."""
        from quorum.flows.promote import approve_flow

        assert approve_flow(self.context(), "2", self.keys["ben"]).promotion is not None


@pytest.fixture
def world(governed_history: Path, tmp_path: Path) -> World:
    """A private copy of the shared history: v1 champion (ann + ben), v2 awaiting a second approval."""
    return World(*private_copy(governed_history, tmp_path))


@contextmanager
def serving(world: World, runtime: str | None = None) -> Iterator[RunningService]:
    running = start_service(world.site_context(), SITE, port=0, runtime=runtime)
    try:
        yield running
    finally:
        running.stop()


def call(url: str, payload: object | None = None) -> tuple[int, dict[str, Any]]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def raw_rows(world: World, count: int) -> tuple[list[dict[str, object]], Any]:
    """Complete rows of the site's raw file (its own columns, PII included) and the frame they came from."""
    import pandas as pd

    config = world.context().config
    site = config.site(SITE)
    frame = pd.read_csv(site.data_path).dropna(subset=list(config.features.columns)).head(count)
    return frame.to_dict(orient="records"), frame


def feature_rows(world: World, count: int) -> list[dict[str, object]]:
    columns = world.context().config.features.columns
    rows, _ = raw_rows(world, count)
    return [{c: row[c] for c in columns} for row in rows]


# --- answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_answers_are_the_champions_probabilities_for_raw_rows(world: World, runtime: str) -> None:
    from quorum.lineage.registry import load_weights
    from quorum.tasks.features import clean, to_matrix
    from quorum.tasks.pii import drop_pii
    from quorum.tasks.training import predict_scores

    config = world.context().config
    rows, frame = raw_rows(world, 20)
    expected = predict_scores(
        load_weights(world.files("1")),
        to_matrix(clean(drop_pii(frame, config.site(SITE)), config.site(SITE), config.features), config.features),
        config.model.hidden_sizes,
    )
    columns = config.features.columns

    with serving(world, runtime) as running:
        status, answer = call(f"{running.url}/predict", {"rows": [{c: r[c] for c in columns} for r in rows]})
        health_status, health = call(f"{running.url}/health")

    assert status == 200, answer
    assert (answer["model"], answer["version"], answer["role"], answer["runtime"]) == (MODEL, "1", "champion", runtime)
    np.testing.assert_allclose(answer["probabilities"], expected, atol=1e-5)
    assert health_status == 200 and health["champion"]["version"] == "1"


def test_rows_with_pii_are_refused_and_no_value_is_echoed_or_logged(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    rows, _ = raw_rows(world, 3)
    config = world.context().config
    columns = [*config.features.columns, "email"]
    emails = [str(row["email"]) for row in rows]

    with caplog.at_level("DEBUG"), serving(world) as running:
        status, answer = call(f"{running.url}/predict", {"rows": [{c: r[c] for c in columns} for r in rows]})
        metrics = urllib.request.urlopen(f"{running.url}/metrics", timeout=60).read().decode()

    assert status == 422 and "email" in answer["error"] and answer["fix"]
    shown = json.dumps(answer) + caplog.text + metrics
    assert not any(email in shown for email in emails)
    assert 'quorum_serving_requests_total{outcome="refused"} 1' in metrics
    assert 'quorum_serving_requests_total{outcome="ok"} 0' in metrics


# --- following the champion ------------------------------------------------------------------


def test_a_new_champion_is_swapped_in_under_concurrent_requests_with_none_failing(world: World) -> None:
    rows = feature_rows(world, 4)
    clients, after_swap = 4, 15
    started, swapped = threading.Barrier(clients + 1, timeout=600), threading.Event()  # a failed client breaks it
    seen: list[list[tuple[int, str]]] = [[] for _ in range(clients)]

    def client(index: int) -> None:
        for request in range(5_000):  # bounded: the swap happens long before
            status, answer = call(f"{running.url}/predict", {"rows": rows})
            seen[index].append((status, answer.get("version", "")))
            if request == 2:
                started.wait()
            if swapped.is_set():
                break
        for _ in range(after_swap):
            status, answer = call(f"{running.url}/predict", {"rows": rows})
            seen[index].append((status, answer.get("version", "")))

    with serving(world) as running:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        started.wait()  # every client has answers from v1 and keeps sending
        world.approve_v2()
        running.service.refresh()
        swapped.set()
        for thread in threads:
            thread.join()
        metrics = running.service.metrics_text()

    assert all(status == 200 for answers in seen for status, _ in answers)
    assert all(answers[0][1] == "1" and {v for _, v in answers[-after_swap:]} == {"2"} for answers in seen)
    assert "quorum_serving_swaps_total 1" in metrics
    loaded = [e for e in world.events() if e.event == "serving_loaded"]
    assert [(e.details["version"], e.details["previous"]) for e in loaded] == [("1", None), ("2", "1")]


def test_a_tampered_champion_is_refused_audited_and_the_last_verified_one_keeps_answering(world: World) -> None:
    rows = feature_rows(world, 2)
    onnx_file = world.files("2") / "onnx" / "model.onnx"

    with serving(world) as running:
        set_alias(world.context().tracker, MODEL, CHAMPION, "2")  # the alias moved outside the quorum
        running.service.refresh()
        _, on_alias = call(f"{running.url}/predict", {"rows": rows})
        world.approve_v2()  # the quorum signs a statement naming v2 ...
        data = bytearray(onnx_file.read_bytes())
        data[len(data) // 2] ^= 0x01
        onnx_file.write_bytes(bytes(data))  # ... whose files are then changed in the store
        running.service.refresh()
        running.service.refresh()  # asked again: refused again, audited once
        status, answer = call(f"{running.url}/predict", {"rows": rows})
        _, health = call(f"{running.url}/health")

    assert on_alias["version"] == "1"  # the alias alone moves nothing: sites follow the signed statement
    assert status == 200 and answer["version"] == "1"
    assert health["champion"]["version"] == "1"
    refusals = [e for e in world.events() if e.event == "serving_refused"]
    assert len(refusals) == 1
    details = refusals[0].details
    assert (details["version"], details["role"], details["kept"], details["site"]) == ("2", "champion", "1", SITE)
    assert "onnx/model.onnx" in str(details["reason"])


def test_a_rollback_is_followed(world: World) -> None:
    from quorum.flows.governance import rollback_flow

    rows = feature_rows(world, 2)
    with serving(world) as running:
        world.approve_v2()
        running.service.refresh()
        _, on_v2 = call(f"{running.url}/predict", {"rows": rows})
        rollback_flow(world.context(), [world.keys["cyd"], world.keys["ann"]], None, "test")
        running.service.refresh()
        _, on_v1 = call(f"{running.url}/predict", {"rows": rows})

    assert (on_v2["version"], on_v1["version"]) == ("2", "1")
    loaded = [e.details for e in world.events() if e.event == "serving_loaded"]
    assert (loaded[-1]["version"], loaded[-1]["previous"]) == ("1", "2")


def test_serving_refuses_to_start_without_a_champion_that_verifies(world: World) -> None:
    from quorum.configs.errors import SignatureError

    (world.files("1") / PROVENANCE_FILE).write_text("{}")

    with pytest.raises(SignatureError) as info:
        start_service(world.site_context(), SITE, port=0)

    assert "v1 refused at site alpha" in info.value.message and info.value.fix
    assert world.events()[-1].event == "serving_refused"


def test_champion_files_missing_from_the_store_are_refused_never_fetched_from_mlflow(world: World) -> None:
    from quorum.configs.errors import SignatureError

    shutil.rmtree(world.files("1"))
    (world.root / "state" / "artifacts" / fetched_key(MODEL, "1")).unlink()  # the coordinator would fetch again

    with pytest.raises(SignatureError) as info:
        start_service(world.site_context(), SITE, port=0)

    assert "no files for test-model version 1 in the artifact store" in info.value.message
    assert "restore the version" in info.value.fix
    refusal = world.events()[-1]
    assert (refusal.event, refusal.details["version"], refusal.details["role"]) == ("serving_refused", "1", "champion")
    assert not world.files("1").exists()  # nothing was copied back from MLflow


# --- variants and routing --------------------------------------------------------------------


def test_promotion_signs_the_onnx_variants_and_records_their_differences_from_torch(world: World) -> None:
    statement = json.loads((world.files("1") / PROVENANCE_FILE).read_text())
    tags = version_tags(world.context().tracker, MODEL, "1")

    subject = {entry["name"] for entry in statement["subject"]}
    assert {"onnx/model.onnx", "onnx/model.int8.onnx", "onnx/serving.json"} <= subject
    assert tags["variant.sites"] == "alpha,beta,gamma" and tags["variant.sites_skipped"] == "none"
    assert abs(float(tags["variant.onnx.auc_delta"])) < 1e-3
    assert abs(float(tags["variant.onnx_int8.auc_delta"])) < 0.05
    assert float(tags["variant.torch.auc"]) > 0.5


def test_shadow_scores_the_candidate_beside_the_champion_and_keeps_only_counts(world: World) -> None:
    world.with_serving({"routing": {SITE: {"mode": "shadow"}}})
    rows = feature_rows(world, 10)

    with serving(world) as running:
        answers = [call(f"{running.url}/predict", {"rows": rows})[1] for _ in range(3)]
        candidate = running.service.candidate
        running.service.publish_routing()
    published = world.context().store.get_json(routing_key(SITE))

    assert candidate is not None and candidate.version == "2" and candidate.verified.signers == ("ann",)
    assert {(a["version"], a["role"]) for a in answers} == {("1", "champion")}
    assert isinstance(published, dict)
    assert (published["champion_version"], published["candidate_version"]) == ("1", "2")
    assert published["shadow_rows"] == 30 and published["champion_rows"] == 30
    assert 0.0 <= published["shadow_agreement_rate"] <= 1.0
    assert set(published) >= {"shadow_agreements", "candidate_requests", "refused_requests"}


def test_the_next_evaluation_run_gets_the_routing_counts(world: World) -> None:
    from quorum.flows.serving_report import log_serving_routing

    world.with_serving({"routing": {SITE: {"mode": "shadow"}}})
    with serving(world) as running:
        call(f"{running.url}/predict", {"rows": feature_rows(world, 5)})
    ctx = world.context()  # stopping the service published its counts
    run_id = ctx.tracker.start_run("evaluate")

    summaries = log_serving_routing(ctx, run_id)

    metrics = ctx.tracker.client.get_run(run_id).data.metrics
    assert set(summaries) == {SITE}
    assert metrics[f"serving.{SITE}.shadow_rows"] == 5 and metrics[f"serving.{SITE}.champion_requests"] == 1
    assert 0.0 <= metrics[f"serving.{SITE}.shadow_agreement_rate"] <= 1.0


def test_canary_sends_its_share_of_requests_to_the_candidate(world: World) -> None:
    world.with_serving({"routing": {SITE: {"mode": "canary", "canary_percent": 50}}})
    rows = feature_rows(world, 1)

    with serving(world) as running:
        answers = [call(f"{running.url}/predict", {"rows": rows})[1] for _ in range(20)]
        counts = running.service.routing_counts()

    by_role = {(a["role"], a["version"]) for a in answers}
    assert by_role == {("champion", "1"), ("candidate", "2")}
    assert counts.candidate_requests + counts.champion_requests == 20
    assert 8 <= counts.candidate_requests <= 12


# --- the candidate pointer -------------------------------------------------------------------


def test_the_candidate_is_the_version_the_store_pointer_names_not_the_mlflow_alias(world: World) -> None:
    world.with_serving({"routing": {SITE: {"mode": "shadow"}}})
    pointer = read_candidate(world.context().store, MODEL)  # written by v2's promotion
    set_alias(world.context().tracker, MODEL, CANDIDATE, "1")  # the MLflow alias alone moves nothing at a site

    with serving(world) as running:
        followed = running.service.candidate
        (world.root / "state" / "artifacts" / candidate_key(MODEL)).unlink()  # no pointer: no candidate
        running.service.refresh()
        after_removal = running.service.candidate
        _, health = call(f"{running.url}/health")

    assert pointer == "2"
    assert followed is not None and followed.version == "2" and followed.verified.signers == ("ann",)
    assert after_removal is None and "candidate" not in health
    assert [e for e in world.events() if e.event == "serving_refused"] == []


def _unsigned_copy_of_v2(world: World) -> object:
    shutil.copytree(world.files("2"), world.files("3"))
    return {"model": MODEL, "version": "3"}


def _relabelled_copy_of_v2(world: World) -> object:
    shutil.copytree(world.files("2"), world.files("3"))
    shutil.copytree(world.signatures("2"), world.signatures("3"))
    return {"model": MODEL, "version": "3"}


def _path_for_a_version(world: World) -> object:
    return {"model": MODEL, "version": "../../../elsewhere"}


def _pointer_for_another_model(world: World) -> object:
    return {"model": "other-model", "version": "2"}


@pytest.mark.parametrize(
    ("forge", "refused_version", "reason"),
    [
        # v2's files copied as v3 with no signature: a candidate needs an approver's signature
        (_unsigned_copy_of_v2, "3", "no signatures for candidate test-model v3 in the artifact store"),
        # the copy with ann's signatures too: they hold over the bytes, but the provenance is about v2
        (_relabelled_copy_of_v2, "3", "names test-model v2, not test-model v3"),
        # a version that would walk out of the site's serving folder
        (_path_for_a_version, "pointer", "names no registry version"),
        # a pointer about another model
        (_pointer_for_another_model, "pointer", "does not name model test-model"),
    ],
)
def test_a_forged_candidate_pointer_is_refused_and_the_champion_answers_everything(
    world: World, forge: Any, refused_version: str, reason: str
) -> None:
    world.with_serving({"routing": {SITE: {"mode": "canary", "canary_percent": 50}}})
    world.point_candidate_at(forge(world))
    rows = feature_rows(world, 1)

    with serving(world) as running:
        answers = [call(f"{running.url}/predict", {"rows": rows})[1] for _ in range(6)]
        running.service.refresh()  # asked again: refused again, audited once
        candidate = running.service.candidate

    assert candidate is None
    assert {(a["role"], a["version"]) for a in answers} == {("champion", "1")}
    refusals = [e.details for e in world.events() if e.event == "serving_refused"]
    assert len(refusals) == 1
    assert (refusals[0]["role"], refusals[0]["version"], refusals[0]["kept"]) == ("candidate", refused_version, None)
    assert reason in str(refusals[0]["reason"])
    assert list(world.root.rglob("elsewhere")) == []  # nothing was copied or removed outside the serving folder


def test_a_pointer_turned_back_to_an_older_signed_version_is_refused(world: World) -> None:
    world.with_serving({"routing": {SITE: {"mode": "canary", "canary_percent": 50}}})
    rows = feature_rows(world, 1)
    world.approve_v2()  # v2 is champion; the pointer still names v2: no candidate

    with serving(world) as running:
        promoted = running.service.candidate
        world.point_candidate_at({"model": MODEL, "version": "1"})  # v1 carries a full quorum of signatures
        running.service.refresh()
        answers = [call(f"{running.url}/predict", {"rows": rows})[1] for _ in range(6)]
        turned_back = running.service.candidate

    assert promoted is None and turned_back is None
    assert {(a["role"], a["version"]) for a in answers} == {("champion", "2")}
    [refusal] = [e.details for e in world.events() if e.event == "serving_refused"]
    assert (refusal["role"], refusal["version"]) == ("candidate", "1")
    assert "not newer than the champion v2" in str(refusal["reason"])


def test_a_rolled_back_version_never_comes_back_as_the_candidate(world: World) -> None:
    from quorum.flows.governance import rollback_flow

    world.with_serving({"routing": {SITE: {"mode": "shadow"}}})
    rows = feature_rows(world, 1)
    with serving(world) as running:
        shadowed = running.service.candidate  # v2 awaits its second approval: it takes shadow traffic
        world.approve_v2()
        running.service.refresh()
        rollback_flow(world.context(), [world.keys["cyd"], world.keys["ann"]], None, "test")  # v2 -> v1
        running.service.refresh()  # the pointer still names v2, which is newer than v1
        after = running.service.candidate
        _, answer = call(f"{running.url}/predict", {"rows": rows})

    assert shadowed is not None and shadowed.version == "2"
    assert after is None and answer["version"] == "1"
    [refusal] = [e.details for e in world.events() if e.event == "serving_refused"]
    assert (refusal["role"], refusal["version"]) == ("candidate", "2")
    assert "rolled back or superseded" in str(refusal["reason"])


def test_candidate_files_missing_from_the_store_are_refused_never_fetched_from_mlflow(world: World) -> None:
    world.with_serving({"routing": {SITE: {"mode": "shadow"}}})
    shutil.rmtree(world.files("2"))
    (world.root / "state" / "artifacts" / fetched_key(MODEL, "2")).unlink()  # the coordinator would fetch again

    with serving(world) as running:
        candidate = running.service.candidate
        status, answer = call(f"{running.url}/predict", {"rows": feature_rows(world, 1)})

    assert candidate is None and status == 200 and answer["version"] == "1"
    [refusal] = [e.details for e in world.events() if e.event == "serving_refused"]
    assert (refusal["role"], refusal["version"]) == ("candidate", "2")
    assert "no files for candidate test-model v2 in the artifact store" in str(refusal["reason"])
    assert not world.files("2").exists()


# --- the command -----------------------------------------------------------------------------


def test_quorum_serve_answers_on_the_port_given_and_stops_on_ctrl_c(world: World) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "quorum.cli.main",
        "serve",
        "--site",
        SITE,
        "--port",
        str(port),
        "--config",
        str(world.config_path),
        "--governance",
        str(world.governance_path),
    ]
    log = (world.root / "serve.log").open("w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()  # printed once the champion verified and the port is open
        status, answer = call(f"http://127.0.0.1:{port}/predict", {"rows": feature_rows(world, 1)})
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    output += (world.root / "serve.log").read_text()
    assert f"serves {MODEL} v1 (onnx, policy champion) at http://127.0.0.1:{port}" in banner
    assert status == 200 and answer["version"] == "1"
    assert process.returncode == 0 and "Traceback" not in output


def test_quorum_serve_refusals_exit_with_an_error_and_a_fix(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    from quorum.cli.main import main

    config = ["--config", str(world.config_path), "--governance", str(world.governance_path)]
    assert main(["serve", "--site", "nowhere", *config]) == 2
    err = capsys.readouterr().err
    assert "error: Unknown site" in err and "fix:" in err

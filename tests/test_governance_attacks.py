"""Attacks on promotion, rollback and deployment: each must end in a refusal that names the reason,
with the champion unchanged.

One real federation history is built once per test session (``governed_history``) (two lifecycle runs: v1
promoted with ann and ben, v2 signed by ann only, awaiting approval). Every test works on its own copy of that
folder (config, keys, sites, MLflow store, artifact store, audit log), so tampering never leaks between tests.
Most attacks target v2 after ben has also signed it in the copy: the control test shows that the untampered
copy is promoted, so each refusal is caused by the attack alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
import yaml

from quorum.configs.errors import (
    AuditLogError,
    ChampionError,
    GateFailed,
    NotPermitted,
    ProvenanceError,
    QuorumNotMet,
    SignatureError,
)
from quorum.evaluation.gates import GateResult, Verdict
from quorum.flows.context import JobContext, load_context
from quorum.lineage.keys import public_key_fingerprint
from quorum.lineage.provenance import PREDICATE_TYPE, PROVENANCE_FILE, STATEMENT_TYPE, file_digests
from quorum.lineage.registry import model_key, sign_version, signatures_key, verify_version
from quorum.lineage.tracking import CANDIDATE, CHAMPION, alias_version, version_tags
from tests.federation import private_copy
from tests.test_signing import cli_verify

MODEL = "test-model"


@dataclass(frozen=True)
class World:
    """One private copy of the federation history; helpers read its registry, store and audit log."""

    root: Path
    config_path: Path
    governance_path: Path
    keys: dict[str, Path]

    def context(self, governance_path: Path | None = None) -> JobContext:
        return load_context(str(self.config_path), str(governance_path or self.governance_path))

    def champion(self) -> str | None:
        return alias_version(self.context().tracker, MODEL, CHAMPION)

    def files(self, version: str) -> Path:
        return self.root / "state" / "artifacts" / model_key(MODEL, version)

    def signatures(self, version: str) -> Path:
        return self.root / "state" / "artifacts" / signatures_key(MODEL, version)

    def events(self) -> list[str]:
        return [entry.event for entry in self.context().audit.entries()]

    def sign(self, version: str, *signers: str) -> None:
        """What each signer's `quorum approve` signs: the version's files and its champion statement."""
        from quorum.flows.promote import sign_candidate
        from quorum.lineage.signing import today_utc

        sign_candidate(self.context(), version, [(name, self.keys[name]) for name in signers], today_utc())

    def governance_with(self, approver: str, **changes: object) -> Path:
        """A governance file like the original but with ``changes`` applied to one approver."""
        data = yaml.safe_load(self.governance_path.read_text())
        for entry in data["approvers"]:
            if entry["name"] == approver:
                entry.update(changes)
        path = self.root / f"governance-{approver}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path


@pytest.fixture(autouse=True)
def _restore_cli_logging() -> Iterator[None]:
    """`quorum` commands trim Prefect's console and log to the stdout of the moment (pytest's capture);
    put the handlers back so no later test in this worker logs into a closed stream."""
    loggers = [
        logging.getLogger(name) for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.server")
    ]
    saved = [(logger, list(logger.handlers), [h.level for h in logger.handlers]) for logger in loggers]
    yield
    for logger, handlers, levels in saved:
        logger.handlers[:] = handlers
        for handler, level in zip(handlers, levels, strict=True):
            handler.setLevel(level)


@pytest.fixture
def world(governed_history: Path, tmp_path: Path) -> World:
    """A private copy of the shared history: v1 champion (ann + ben), v2 awaiting a second approval."""
    return World(*private_copy(governed_history, tmp_path))


@pytest.fixture
def approved(world: World) -> World:
    """v2 with a full quorum (ann and ben), not yet promoted: the target of most attacks."""
    world.sign("2", "ben")
    return world


def attempt_promotion(world: World, *fragments: str, governance_path: Path | None = None) -> SignatureError:
    """Try to make v2 champion; assert it is refused naming ``fragments`` and that nothing moved."""
    from quorum.flows.promote import promote_approved

    events = world.events()
    with pytest.raises(SignatureError) as info:
        promote_approved(world.context(governance_path), "2")
    shown = info.value.render()
    for fragment in fragments:
        assert fragment in shown
    assert info.value.fix
    assert world.champion() == "1"
    assert world.events() == events
    return info.value


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# --- the untampered history -------------------------------------------------------------


def test_control_an_untampered_fully_approved_version_is_promoted(approved: World) -> None:
    from quorum.flows.promote import promote_approved

    result = promote_approved(approved.context(), "2")

    assert result.champion and result.previous_champion == "1"
    assert approved.champion() == "2"
    assert approved.events()[-1] == "promotion"


def test_provenance_is_an_in_toto_statement_bound_to_the_version(world: World) -> None:
    ctx = world.context()
    files = world.files("1")
    statement = json.loads((files / PROVENANCE_FILE).read_text())
    tags = version_tags(ctx.tracker, MODEL, "1")
    predicate = statement["predicate"]

    assert statement["_type"] == STATEMENT_TYPE and statement["predicateType"] == PREDICATE_TYPE
    assert {s["name"]: s["digest"]["sha256"] for s in statement["subject"]} == file_digests(files)
    assert "data/model.pt2" in file_digests(files) and "MLmodel" in file_digests(files)
    assert predicate["model"] == {"name": MODEL, "version": "1"}
    assert predicate["job_id"] == tags["quorum.job_id"]
    assert predicate["config_hash"] == tags["config_hash"]
    assert predicate["git_commit"] == tags["git_commit"]
    assert predicate["mlflow"]["run_id"] == tags["mlflow_run"]
    assert predicate["sites"] == {
        s: {"data_hash": tags[f"data.{s}"], "contract_passed": True} for s in ctx.config.site_ids
    }
    assert predicate["verdict"]["passed"] is True
    assert tags["provenance.sha256"] == hashlib.sha256((files / PROVENANCE_FILE).read_bytes()).hexdigest()
    assert tags["previous_champion"] == "none"


@pytest.mark.integration  # runs the model-signing CLI in its own process
def test_model_signing_cli_verifies_the_promoted_version(world: World) -> None:
    for approver in ("ann", "ben"):
        result = cli_verify(
            world.files("1"), world.signatures("1") / f"{approver}.sig", world.keys[approver].with_suffix(".pub")
        )
        assert result.returncode == 0, result.stderr
        assert "Verification succeeded" in result.stdout


# --- tampered files ---------------------------------------------------------------------


def test_a_flipped_byte_in_any_model_file_is_refused(approved: World) -> None:
    files = approved.files("2")
    pristine = approved.root / "v2-pristine"
    shutil.copytree(files, pristine)
    names = [*sorted(file_digests(files)), PROVENANCE_FILE]
    assert len(names) >= 5
    for name in names:
        flip_byte(files / name)

        attempt_promotion(approved, "model differs from what was signed", name)

        shutil.rmtree(files)
        shutil.copytree(pristine, files)


def test_an_added_file_is_refused(approved: World) -> None:
    (approved.files("2") / "backdoor.py").write_text("import os\n")

    attempt_promotion(approved, "backdoor.py", "ann.sig", "ben.sig")


def test_a_removed_file_is_refused(approved: World) -> None:
    (approved.files("2") / "input_example.json").unlink()

    attempt_promotion(approved, "input_example.json", "ann.sig", "ben.sig")


def test_provenance_swapped_from_another_version_is_refused(approved: World) -> None:
    shutil.copy(approved.files("1") / PROVENANCE_FILE, approved.files("2") / PROVENANCE_FILE)

    attempt_promotion(approved, "model differs from what was signed", PROVENANCE_FILE)

    # even approvers tricked into signing the swapped statement do not make it pass
    approved.sign("2", "ann", "ben")
    error = attempt_promotion(approved, "names test-model v1, not test-model v2")
    assert isinstance(error, ProvenanceError)


# --- bad signatures ---------------------------------------------------------------------


def test_a_signature_by_a_key_not_in_governance_is_refused(world: World) -> None:
    world.sign("2", "mallory")
    sign_version(world.context().store, MODEL, "2", [("ben", world.keys["mallory"])])  # mallory claims to be ben

    error = attempt_promotion(world, "1 valid: ann", "mallory.sig (not an approver in governance)", "ben.sig (")

    assert isinstance(error, QuorumNotMet)


def test_a_signature_by_a_revoked_key_is_refused(approved: World) -> None:
    revoked = approved.governance_with("ben", revoked=True)

    attempt_promotion(approved, "ben.sig (key of approver ben is revoked in governance)", governance_path=revoked)


def test_a_signature_by_an_expired_key_is_refused(approved: World) -> None:
    expired = approved.governance_with("ben", expires="2020-01-01")
    governance = approved.context(expired).governance
    store = approved.context().store

    attempt_promotion(approved, "ben.sig (key of approver ben expired on 2020-01-01)", governance_path=expired)
    assert verify_version(store, governance, MODEL, "2", now=date(2019, 12, 31)).met  # the day before it still counts
    with pytest.raises(QuorumNotMet, match="expired on 2020-01-01"):
        verify_version(store, governance, MODEL, "2", now=date(2020, 1, 1))


def test_two_signatures_by_the_same_approver_count_once(world: World) -> None:
    sign_version(world.context().store, MODEL, "2", [("ann.2", world.keys["ann"])])

    error = attempt_promotion(world, "2 of 3 approvals needed, 1 valid: ann")

    assert "(approver ann is already counted; one approver approves once)" in error.message


def test_one_signature_short_of_the_quorum_is_refused(world: World) -> None:
    error = attempt_promotion(world, "2 of 3 approvals needed, 1 valid: ann")

    assert "ben" in error.fix and "cyd" in error.fix


def test_a_signature_replayed_from_an_earlier_version_is_refused(world: World) -> None:
    for approver in ("ann", "ben"):
        shutil.copy(world.signatures("1") / f"{approver}.sig", world.signatures("2") / f"{approver}.sig")
    # the weights are byte-identical (deterministic training); the provenance still tells the versions apart
    assert (world.files("1") / "data/model.pt2").read_bytes() == (world.files("2") / "data/model.pt2").read_bytes()

    attempt_promotion(world, "0 valid: none", "ann.sig (model differs", "ben.sig (model differs", PROVENANCE_FILE)


# --- gates and the audit log ------------------------------------------------------------


def test_a_promotion_while_the_verdict_failed_registers_nothing(world: World) -> None:
    from quorum.flows.promote import promote_flow
    from quorum.lineage.registry import load_weights

    ctx = world.context()
    failed = Verdict(passed=False, gates=(GateResult("auc", 0.55, 0.7, False, "auc 0.5500 < 0.7000"),))
    before = len(ctx.tracker.client.search_model_versions(f"name='{MODEL}'"))

    with pytest.raises(GateFailed, match="auc 0.5500 < 0.7000") as info:
        promote_flow(ctx, load_weights(world.files("1")), [0.0] * 8, failed, {}, "no-run", [("ann", world.keys["ann"])])

    assert "nothing was registered" in info.value.fix
    assert len(ctx.tracker.client.search_model_versions(f"name='{MODEL}'")) == before
    assert world.champion() == "1"
    assert alias_version(ctx.tracker, MODEL, CANDIDATE) == "2"
    assert not (world.root / "state" / "artifacts" / model_key(MODEL, "3")).exists()


def test_a_tampered_audit_log_fails_verification_naming_the_line(
    approved: World, capsys: pytest.CaptureFixture[str]
) -> None:
    from quorum.cli.main import main
    from quorum.flows.promote import promote_approved

    promote_approved(approved.context(), "2")
    log = approved.root / "state" / "audit.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    promotion = next(i for i, line in enumerate(lines) if '"event":"promotion"' in line)
    lines[promotion] = lines[promotion].replace('"ben"', '"eve"')
    log.write_text("".join(lines))

    with pytest.raises(AuditLogError, match=f"line {promotion + 1} was edited"):
        approved.context().audit.verify()
    code = main(["audit", "verify", "--config", str(approved.config_path)])
    assert code == 7 and f"line {promotion + 1}" in capsys.readouterr().err
    with pytest.raises(AuditLogError):  # nothing acts on a log that was tampered with
        rollback(approved)
    assert approved.champion() == "2"


# --- rollback and deployment ------------------------------------------------------------


def rollback(
    world: World,
    approvers: tuple[str, ...] = ("cyd", "ann"),
    to_version: str | None = None,
    governance_path: Path | None = None,
) -> object:
    """What `quorum rollback --key ... --key ...` runs: the statement is signed by every approver named."""
    from quorum.flows.governance import rollback_flow

    keys = [world.keys[name] for name in approvers]
    return rollback_flow(world.context(governance_path), keys, to_version, "test")


def deploy(world: World, site_id: str = "alpha") -> object:
    from quorum.flows.deploy import deploy_flow

    return deploy_flow(str(world.config_path), str(world.governance_path), site_id)


def test_rollback_returns_to_the_previous_champion_and_the_next_deploy_loads_it(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    from quorum.cli.main import main
    from quorum.flows.deploy import read_deployment

    config = ["--config", str(world.config_path), "--governance", str(world.governance_path)]
    site = world.context().config.site("alpha")
    assert main(["approve", MODEL, "--version", "2", "--key", str(world.keys["ben"]), *config]) == 0
    assert main(["deploy", "--site", "alpha", *config]) == 0
    running_v2 = read_deployment(site)

    keys = ["--key", str(world.keys["cyd"]), "--key", str(world.keys["ann"])]
    code = main(["rollback", MODEL, *keys, "--reason", "bad outcomes at beta", *config])
    assert code == 0, capsys.readouterr().err
    assert main(["deploy", "--site", "alpha", *config]) == 0

    ctx = world.context()
    running_v1 = read_deployment(site)
    entry = [e for e in ctx.audit.entries() if e.event == "rollback"][-1]
    assert running_v2 is not None and running_v2.version == "2"
    assert world.champion() == "1"
    assert entry.actor == "cyd" and entry.details["from"] == "2" and entry.details["to"] == "1"
    assert entry.details["statement_signers"] == ["cyd", "ann"]
    assert entry.details["reason"] == "bad outcomes at beta"
    assert running_v1 is not None and running_v1.version == "1" and running_v1.signers == ("ann", "ben")
    assert running_v1.provenance_sha256 == version_tags(ctx.tracker, MODEL, "1")["provenance.sha256"]
    assert (site.root / running_v1.files / PROVENANCE_FILE).is_file()
    assert version_tags(ctx.tracker, MODEL, "1")["rolled_back_from"] == "2"
    assert version_tags(ctx.tracker, MODEL, "2")["stage"] == "rolled_back"
    assert version_tags(ctx.tracker, MODEL, "2")["rolled_back_by"] == "cyd,ann"
    assert world.events()[-3:] == ["deployment", "rollback", "deployment"]


def test_deploy_refuses_a_tampered_champion_and_the_site_keeps_what_it_runs(approved: World) -> None:
    from quorum.flows.deploy import read_deployment
    from quorum.flows.promote import promote_approved

    promote_approved(approved.context(), "2")
    deploy(approved)
    site = approved.context().config.site("alpha")
    before = read_deployment(site)
    flip_byte(approved.files("2") / "data/model.pt2")

    with pytest.raises(SignatureError, match=r"data/model\.pt2"):
        deploy(approved)

    assert read_deployment(site) == before
    assert before is not None and file_digests(site.root / before.files)  # the verified copy is still in place
    last = approved.context().audit.entries()[-1]
    assert last.event == "deployment_refused" and "data/model.pt2" in str(last.details["reason"])
    assert approved.champion() == "2"


def test_rollback_refuses_a_tampered_earlier_champion(approved: World) -> None:
    from quorum.flows.promote import promote_approved

    promote_approved(approved.context(), "2")
    flip_byte(approved.files("1") / "MLmodel")

    with pytest.raises(SignatureError, match="MLmodel"):
        rollback(approved)

    assert approved.champion() == "2"
    assert "rollback" not in approved.events()


def test_rollback_needs_an_approver_governance_allows(approved: World) -> None:
    from quorum.flows.promote import promote_approved

    promote_approved(approved.context(), "2")
    data = yaml.safe_load(approved.governance_path.read_text())
    only_ann = approved.root / "governance-rollback.yaml"
    only_ann.write_text(yaml.safe_dump({**data, "rollback": ["ann"]}))
    revoked_ann = approved.governance_with("ann", revoked=True)

    with pytest.raises(NotPermitted, match=r"approver cyd may not roll back the champion \(allowed: ann\)"):
        rollback(approved, ("cyd", "ben"), governance_path=only_ann)
    with pytest.raises(NotPermitted, match="key of approver ann is revoked"):
        rollback(approved, ("ann", "cyd"), governance_path=revoked_ann)
    with pytest.raises(Exception, match="belongs to no approver"):
        rollback(approved, ("mallory", "ann"))

    assert approved.champion() == "2"


def test_rollback_refuses_without_an_earlier_champion_or_to_a_version_never_champion(approved: World) -> None:
    from quorum.flows.promote import promote_approved

    with pytest.raises(ChampionError, match="v1 is the first champion"):
        rollback(approved)
    promote_approved(approved.context(), "2")
    with pytest.raises(ChampionError, match="v7 is not an earlier champion"):
        rollback(approved, to_version="7")

    assert approved.champion() == "2"


def test_rollback_refuses_when_the_alias_was_moved_outside_quorum(approved: World) -> None:
    from quorum.flows.promote import promote_approved

    promote_approved(approved.context(), "2")
    rollback(approved)
    approved.context().tracker.client.set_registered_model_alias(MODEL, CHAMPION, "2")  # not through Quorum

    with pytest.raises(ChampionError, match="alias points at v2 but the audit log records v1"):
        rollback(approved)

    assert approved.champion() == "2"


def test_a_failed_rollback_step_puts_the_champion_back(approved: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from quorum.flows.promote import promote_approved
    from quorum.lineage.audit import AuditLog

    promote_approved(approved.context(), "2")

    def broken(*_: object, **__: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(AuditLog, "append", broken)
    with pytest.raises(OSError, match="disk full"):
        rollback(approved)

    assert approved.champion() == "2"


def test_generating_a_key_with_a_config_records_it_in_the_audit_log(world: World) -> None:
    from quorum.cli.main import main

    keys = world.root / "new-keys"
    before = world.events()
    assert main(["keys", "generate", "--name", "dia", "--out", str(keys)]) == 0
    assert world.events() == before  # without --config no federation is touched

    assert main(["keys", "generate", "--name", "eli", "--out", str(keys), "--config", str(world.config_path)]) == 0

    entry = world.context().audit.entries()[-1]
    assert entry.event == "key_generated" and entry.actor == "eli"
    assert entry.details["fingerprint"] == public_key_fingerprint(keys / "eli.pub")


def test_cli_refusals_are_reported_without_a_traceback(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    from quorum.cli.main import main
    from tests.test_cli_errors import assert_reported

    config = ["--config", str(world.config_path), "--governance", str(world.governance_path)]
    flip_byte(world.files("1") / "data/model.pt2")
    cases = [
        (
            ["rollback", MODEL, "--key", str(world.keys["ann"]), "--key", str(world.keys["ben"]), *config],
            9,
            "v1 is the first champion",
        ),
        (["rollback", MODEL, "--key", str(world.keys["mallory"]), *config], 2, "belongs to no approver"),
        (
            ["rollback", MODEL, "--key", str(world.keys["ann"]), *config],
            6,
            "a rollback needs the signatures of 2 approvers",
        ),
        (["deploy", "--site", "nowhere", *config], 2, "no site 'nowhere'"),
        (["deploy", "--site", "beta", *config], 6, "Hash mismatch for 'data/model.pt2'"),
    ]
    for argv, exit_code, fragment in cases:
        code = main(argv)
        assert_reported(code, capsys.readouterr().err, exit_code, fragment)

    assert world.champion() == "1"

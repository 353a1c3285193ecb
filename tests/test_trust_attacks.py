"""Attacks by someone who can write the coordinator's state folder, registry and artifact store.

Trust must come only from the keys governance pins (in git) and from signatures. Each test plays one attack
from the threat model and ends in a refusal (or, for the alias, in nothing following it), with the champion
and every site's deployment unchanged. One real history is built once per test session (``governed_history``): v1
champion (ann + ben), v2 registered and signed by ann only; every test works on its own copy.
"""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import pytest
import yaml

from quorum.configs.errors import AuditLogError, ConfigError, QuorumError, SignatureError
from quorum.configs.schema import load_governance
from quorum.lineage import champion
from quorum.lineage.envelope import sign
from quorum.lineage.keys import public_key_fingerprint
from quorum.lineage.provenance import PROVENANCE_FILE, file_digests, write_provenance
from quorum.lineage.registry import sign_version
from quorum.lineage.tracking import CHAMPION, set_version_tags, version_tags
from tests.federation import pin_governance_root, private_copy
from tests.test_governance_attacks import MODEL, World, _restore_cli_logging  # noqa: F401 (autouse fixture)

SITES = ("alpha", "beta", "gamma")


@pytest.fixture
def world(governed_history: Path, tmp_path: Path) -> World:
    """A private copy of the shared history: v1 champion (ann + ben), v2 awaiting a second approval."""
    return World(*private_copy(governed_history, tmp_path))


@pytest.fixture
def deployed(world: World) -> World:
    """v2 promoted by ann and ben, and deployed at alpha (which witnessed the audit head)."""
    from quorum.flows.promote import promote_approved

    world.sign("2", "ben")
    promote_approved(world.context(), "2")
    deploy(world, "alpha")
    return world


def deploy(world: World, site_id: str = "alpha", governance_path: Path | None = None) -> object:
    from quorum.flows.deploy import deploy_flow

    return deploy_flow(str(world.config_path), str(governance_path or world.governance_path), site_id)


def snapshot(world: World) -> tuple[str | None, dict[str, object]]:
    """The champion and what every site runs (its record), to prove an attack changed neither."""
    from quorum.flows.deploy import read_deployment

    config = world.context().config
    return world.champion(), {site_id: read_deployment(config.site(site_id)) for site_id in SITES}


def cli(world: World, *argv: str) -> list[str]:
    return [*argv, "--config", str(world.config_path), "--governance", str(world.governance_path)]


# --- 1. pinned keys ------------------------------------------------------------------------------


def test_substituted_public_keys_and_a_rebuilt_model_are_refused(deployed: World) -> None:
    from quorum.flows.promote import promote_approved

    world = deployed
    before = snapshot(world)
    ctx = world.context()
    # the attacker swaps ann's and ben's public key files for their own, changes v1 and re-signs it
    for name in ("ann", "ben"):
        shutil.copy(world.keys["mallory"].with_suffix(".pub"), world.keys[name].with_suffix(".pub"))
    files = world.files("1")
    (files / "backdoor.py").write_text("import os\n")
    statement = json.loads((files / PROVENANCE_FILE).read_text())
    statement["subject"] = [{"name": n, "digest": {"sha256": d}} for n, d in file_digests(files).items()]
    digest = write_provenance(files, statement)
    shutil.rmtree(world.signatures("1"))
    sign_version(ctx.store, MODEL, "1", [("ann", world.keys["mallory"]), ("ben", world.keys["mallory"])])
    payload = champion.new_payload(champion.chain_head(ctx.store, MODEL), MODEL, "1", digest, champion.PROMOTION)
    forged = tuple(sign(champion.KIND, payload, world.keys["mallory"], name) for name in ("ann", "ben"))
    champion.publish(ctx.store, payload, forged)

    with pytest.raises(SignatureError, match="pinned in governance"):
        promote_approved(world.context(), "1")
    with pytest.raises(SignatureError, match="signed with a key that is not the one governance pins"):
        deploy(world, "beta")

    assert snapshot(world) == before


def test_a_governance_change_needs_the_current_quorum(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    from quorum.cli.main import main

    deploy(world, "alpha")
    before = snapshot(world)
    data = yaml.safe_load(world.governance_path.read_text())
    mallory = world.keys["mallory"].with_suffix(".pub")
    entry = {"name": "mallory", "public_key": "keys/mallory.pub", "fingerprint": public_key_fingerprint(mallory)}
    proposed = world.root / "governance-v2.yaml"
    proposed.write_text(yaml.safe_dump({**data, "version": 2, "approvers": [*data["approvers"], entry]}))
    gov = ["--governance", str(world.governance_path)]

    # one approver's signature is not the quorum; the attacker's key is not an approver at all
    assert main(["governance", "sign", str(proposed), "--key", str(world.keys["ann"]), *gov]) == 0
    assert main(["governance", "sign", str(proposed), "--key", str(world.keys["mallory"]), *gov]) == 2
    assert "belongs to no approver in governance" in capsys.readouterr().err
    code = main(["governance", "adopt", str(proposed), *gov])
    err = capsys.readouterr().err
    assert (
        code == 6
        and "needs 2 signatures of version 1's approvers, 1 valid; valid signatures: ann" in err
        and "fix:" in err
    )

    # writing the unsigned file over governance.yaml directly: the site refuses it
    original = world.governance_path.read_bytes()
    world.governance_path.write_bytes(proposed.read_bytes())
    with pytest.raises(QuorumError, match="governance history file"):
        deploy(world, "alpha")
    world.governance_path.write_bytes(original)

    assert snapshot(world) == before


def test_a_signed_governance_rotation_is_followed_and_a_governance_rollback_refused(world: World) -> None:
    from quorum.cli.main import main

    deploy(world, "alpha")
    before = snapshot(world)
    original = world.governance_path.read_bytes()
    data = yaml.safe_load(original)
    proposed = world.root / "governance-v2.yaml"
    proposed.write_text(yaml.safe_dump({**data, "version": 2, "rollback": ["ann"]}))
    gov = ["--governance", str(world.governance_path)]
    for name in ("ann", "cyd"):
        assert main(["governance", "sign", str(proposed), "--key", str(world.keys[name]), *gov]) == 0
    assert main(["governance", "adopt", str(proposed), *gov]) == 0
    assert main(["governance", "verify", *gov, "--config", str(world.config_path)]) == 0
    deploy(world, "alpha")  # the site walks the chain from version 1 to 2 and accepts it
    assert snapshot(world)[0] == before[0]

    # the old version put back (e.g. to restore rollback rights) is refused by the site
    world.governance_path.write_bytes(original)
    with pytest.raises(SignatureError, match="older than version 2 already accepted here"):
        deploy(world, "alpha")
    assert snapshot(world)[0] == before[0]


def _attacker_chain(world: World, versions: int) -> Path:
    """A governance chain written into the state folder: mallory alone, quorum 1, each step signed by
    mallory, so it verifies under its own keys; with a champion statement mallory signed."""
    from quorum.lineage.governance_chain import adopt, sign_rotation

    folder = world.root / "state" / f"governance-{versions}"
    folder.mkdir()
    pub = world.keys["mallory"].with_suffix(".pub")
    shutil.copy(pub, folder / "mallory.pub")
    entry = {"name": "mallory", "public_key": "mallory.pub", "fingerprint": public_key_fingerprint(pub)}
    governance = folder / "governance.yaml"
    governance.write_text(yaml.safe_dump({"version": 1, "quorum": 1, "approvers": [entry]}))
    for version in range(2, versions + 1):
        proposed = folder / f"proposed-v{version}.yaml"
        proposed.write_text(yaml.safe_dump({"version": version, "quorum": 1, "approvers": [entry]}))
        sign_rotation(governance, proposed, world.keys["mallory"])
        adopt(governance, proposed)
    return governance


@pytest.mark.parametrize("versions", [1, 2], ids=["forged-root", "forged-root-and-rotation"])
def test_a_fresh_site_refuses_a_governance_chain_written_in_the_state_folder(
    deployed: World, versions: int, capsys: pytest.CaptureFixture[str]
) -> None:
    from quorum.cli.main import main
    from quorum.flows.deploy import trust_record
    from quorum.lineage.governance_chain import verify_chain

    world = deployed
    before = snapshot(world)
    forged = _attacker_chain(world, versions)
    assert verify_chain(forged).version == versions  # without a pinned root, the chain itself holds together
    ctx = world.context(forged)
    v1 = version_tags(ctx.tracker, MODEL, "1")["provenance.sha256"]
    payload = champion.new_payload(champion.chain_head(ctx.store, MODEL), MODEL, "1", v1, champion.PROMOTION)
    champion.publish(ctx.store, payload, (sign(champion.KIND, payload, world.keys["mallory"], "mallory"),))
    gamma = ctx.config.site("gamma")  # never deployed: no record of any governance yet

    with pytest.raises(SignatureError, match="not the governance this federation was founded on"):
        deploy(world, "gamma", governance_path=forged)
    code = main(["deploy", "--site", "gamma", "--config", str(world.config_path), "--governance", str(forged)])
    err = capsys.readouterr().err
    assert code == 6 and "pins governance_root" in err and "fix:" in err and "Traceback" not in err

    assert snapshot(world) == before
    assert "governance" not in champion.read_trust(trust_record(gamma))


def test_a_site_without_a_pinned_governance_root_refuses_to_guess(world: World) -> None:
    from quorum.flows.deploy import trust_record

    config = yaml.safe_load(world.config_path.read_text())
    del config["governance_root"]
    world.config_path.write_text(yaml.safe_dump(config))
    before = snapshot(world)

    with pytest.raises(ConfigError, match="pins no governance root") as info:
        deploy(world, "gamma")

    assert "governance_root:" in info.value.fix
    assert snapshot(world) == before
    assert not trust_record(world.context().config.site("gamma")).exists()


# --- 2. the signed champion statement ------------------------------------------------------------


def test_sites_follow_the_statement_not_a_downgraded_alias(deployed: World, capsys: pytest.CaptureFixture[str]) -> None:
    from quorum.cli.main import main

    world = deployed
    world.context().tracker.client.set_registered_model_alias(MODEL, CHAMPION, "1")  # one SQLite update

    deploy(world, "beta")
    capsys.readouterr()
    assert main(["status", "--config", str(world.config_path), "--governance", str(world.governance_path)]) == 0

    _, sites = snapshot(world)
    out = capsys.readouterr().out
    assert getattr(sites["beta"], "version", None) == "2" and getattr(sites["alpha"], "version", None) == "2"
    assert "the MLflow alias `champion` points at v1 but the signed statement names v2" in out


def test_a_replayed_older_statement_is_refused(deployed: World) -> None:
    world = deployed
    before = snapshot(world)
    store = world.context().store
    store.put_bytes(champion.current_key(MODEL), store.get_bytes(champion.statement_key(MODEL, 1)))

    with pytest.raises(champion.StaleStatement, match="sequence 1 .*already accepted sequence 2"):
        deploy(world, "alpha")

    assert snapshot(world) == before
    assert world.context().audit.entries()[-1].event == "deployment_refused"


def test_a_statement_without_the_quorum_is_refused(deployed: World) -> None:
    world = deployed
    before = snapshot(world)
    ctx = world.context()
    payload = champion.new_payload(
        champion.chain_head(ctx.store, MODEL),
        MODEL,
        "1",
        version_tags(ctx.tracker, MODEL, "1")["provenance.sha256"],
        "promotion",
    )
    champion.publish(ctx.store, payload, (sign(champion.KIND, payload, world.keys["ann"], "ann"),))

    with pytest.raises(SignatureError, match="needs 2 approver signatures, 1 valid"):
        deploy(world, "alpha")

    assert snapshot(world) == before


def test_a_rollback_statement_may_only_name_an_earlier_champion(deployed: World) -> None:
    world = deployed
    before = snapshot(world)
    ctx = world.context()
    # a quorum signed it, but v2 -> "v2 again with other provenance" was never champion
    payload = champion.new_payload(champion.chain_head(ctx.store, MODEL), MODEL, "2", "0" * 64, champion.ROLLBACK)
    signatures = tuple(sign(champion.KIND, payload, world.keys[name], name) for name in ("cyd", "ann"))
    champion.publish(ctx.store, payload, signatures)

    with pytest.raises(SignatureError, match="which no earlier statement in its chain made champion"):
        deploy(world, "alpha")

    assert snapshot(world) == before


def test_a_rollback_statement_below_the_quorum_is_refused(deployed: World, capsys: pytest.CaptureFixture[str]) -> None:
    from quorum.cli.main import main

    world = deployed
    before = snapshot(world)
    ctx = world.context()
    events = world.events()
    head = champion.read_current(ctx.store, MODEL)
    # one approver allowed to roll back, alone, via the command: refused before anything is written
    code = main(cli(world, "rollback", MODEL, "--key", str(world.keys["cyd"])))
    err = capsys.readouterr().err
    assert code == 6 and "a rollback needs the signatures of 2 approvers" in err and "fix:" in err
    assert "Traceback" not in err
    assert champion.read_current(ctx.store, MODEL) == head and world.events() == events

    # the attacker writes the statement itself: v1 really was champion, but only cyd signed the rollback
    v1 = version_tags(ctx.tracker, MODEL, "1")["provenance.sha256"]
    payload = champion.new_payload(champion.chain_head(ctx.store, MODEL), MODEL, "1", v1, champion.ROLLBACK)
    champion.publish(ctx.store, payload, (sign(champion.KIND, payload, world.keys["cyd"], "cyd"),))
    for site_id in ("alpha", "beta"):  # alpha ran v2; beta never deployed
        with pytest.raises(SignatureError, match="is a rollback and needs 2 approver signatures, 1 valid"):
            deploy(world, site_id)

    # the quorum signed, but governance lets neither of them roll back
    only_ann = world.root / "governance-rollback.yaml"
    only_ann.write_text(yaml.safe_dump({**yaml.safe_load(world.governance_path.read_text()), "rollback": ["ann"]}))
    signatures = tuple(sign(champion.KIND, payload, world.keys[name], name) for name in ("ben", "cyd"))
    with pytest.raises(SignatureError, match=r"no approver allowed to roll back signed \(allowed: ann\)"):
        champion.verify_statement(ctx.store, load_governance(only_ann), payload, signatures, date.today())

    assert snapshot(world) == before


def test_rollback_writes_a_newer_statement_that_sites_follow(deployed: World) -> None:
    from quorum.flows.deploy import read_deployment, trust_record
    from quorum.flows.governance import rollback_flow

    world = deployed
    rollback_flow(world.context(), [world.keys["cyd"], world.keys["ann"]], None, "test")
    deploy(world, "alpha")

    site = world.context().config.site("alpha")
    running = read_deployment(site)
    trust = json.loads(trust_record(site).read_text())
    assert running is not None and running.version == "1" and world.champion() == "1"
    assert trust["champion"][MODEL]["sequence"] == 3


# --- 3. the anchored audit log -------------------------------------------------------------------


def _rewrite(log: Path, lines: list[dict[str, object]]) -> None:
    """Re-chain ``lines`` exactly as an attacker with the code would: every hash recomputed."""
    from quorum.lineage.audit import GENESIS_HASH, _canonical, _entry_hash

    previous = GENESIS_HASH
    out = []
    for index, line in enumerate(lines):
        fields = {k: v for k, v in line.items() if k != "hash"}
        fields.update(index=index, prev_hash=previous)
        fields["hash"] = previous = _entry_hash(fields)
        out.append(_canonical(fields) + "\n")
    log.write_text("".join(out))


def _edit_last(lines: list[dict[str, object]], log: Path) -> None:
    lines[-1]["actor"] = "site:elsewhere"
    _rewrite(log, lines)


def _delete_last(lines: list[dict[str, object]], log: Path) -> None:
    _rewrite(log, lines[:-1])


def _append_forged_promotion(lines: list[dict[str, object]], log: Path) -> None:
    forged = {**lines[-1], "event": "promotion", "actor": "coordinator"}
    forged["details"] = {"model": MODEL, "version": "1", "statement_sequence": 3, "signers": ["ann", "ben"]}
    _rewrite(log, [*lines, forged])


def _empty(lines: list[dict[str, object]], log: Path) -> None:
    log.write_text("")


def _delete_with_checkpoint(lines: list[dict[str, object]], log: Path) -> None:
    log.unlink()
    log.with_name(log.name + ".checkpoint.json").unlink()


def _rechain_whole_file(lines: list[dict[str, object]], log: Path) -> None:
    _rewrite(log, lines[1:])  # drop the first entry and re-chain every later one


AUDIT_ATTACKS = {
    "tail-edit": (_edit_last, "differs from the one"),
    "tail-deleted": (_delete_last, "entries were cut off the end"),
    "forged-promotion-appended": (_append_forged_promotion, "that no signed champion statement backs"),
    "emptied": (_empty, "entries were cut off the end"),
    "deleted-with-its-checkpoint": (_delete_with_checkpoint, "site alpha"),
    "re-chained": (_rechain_whole_file, "the log was rewritten and re-chained"),
}


@pytest.mark.parametrize(("attack", "fragment"), list(AUDIT_ATTACKS.values()), ids=list(AUDIT_ATTACKS))
def test_audit_verify_detects_an_unanchored_rewrite(
    deployed: World, capsys: pytest.CaptureFixture[str], attack: object, fragment: str
) -> None:
    from quorum.cli.main import main

    world = deployed
    log = world.root / "state" / "audit.jsonl"
    assert main(cli(world, "audit", "verify")) == 0
    assert "anchored up to entry" in capsys.readouterr().out
    before = snapshot(world)
    lines = [json.loads(line) for line in log.read_text().splitlines()]

    attack(lines, log)  # type: ignore[operator]
    code = main(cli(world, "audit", "verify"))

    err = capsys.readouterr().err
    assert code == 7 and fragment in err and "fix:" in err, err
    with pytest.raises((AuditLogError, SignatureError)):
        deploy(world, "alpha")  # the witnessing site refuses to deploy against the rewritten log
    assert snapshot(world) == before


def test_an_older_checkpoint_put_back_hides_a_cut_tail_until_a_site_record_is_read(
    deployed: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's row for a replayed checkpoint, both halves: not caught by the checkpoint, caught by
    the record of a site that witnessed a later head."""
    from quorum.cli.main import main
    from quorum.flows.deploy import trust_record
    from quorum.flows.governance import rollback_flow
    from quorum.lineage.anchor import checkpoint_path

    world = deployed  # the checkpoint anchors v2's promotion; alpha witnessed its later deployment entry
    ctx = world.context()
    older = checkpoint_path(ctx.audit).read_bytes()
    anchored = json.loads(older)["payload"]["index"]
    rollback_flow(ctx, [world.keys["cyd"], world.keys["ann"]], None, "test")  # signs a newer checkpoint
    # the attacker cuts the log back to the older checkpoint's entry and puts that checkpoint back
    log = ctx.audit.path
    log.write_text("".join(log.read_text().splitlines(keepends=True)[: anchored + 1]))
    checkpoint_path(ctx.audit).write_bytes(older)
    record = trust_record(ctx.config.site("alpha"))
    kept = record.read_bytes()
    record.unlink()  # audit verify on a host that cannot read alpha's folder

    unseen = main(cli(world, "audit", "verify"))
    capsys.readouterr()
    record.write_bytes(kept)
    seen = main(cli(world, "audit", "verify"))
    err = capsys.readouterr().err

    assert unseen == 0
    assert seen == 7 and "site alpha (head seen at deploy) vouches for entry" in err and "fix:" in err


# --- 4. lineage from the signed provenance ---------------------------------------------------------


def test_lineage_reads_the_signed_provenance_and_reports_forged_tags(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    from quorum.cli.main import main

    before = snapshot(world)
    ctx = world.context()
    real = version_tags(ctx.tracker, MODEL, "1")
    set_version_tags(ctx.tracker, MODEL, "1", {"data.alpha": "f" * 32, "contract.beta": "failed 0 expectations"})

    code = main(cli(world, "lineage", MODEL, "--version", "1"))

    out = capsys.readouterr().out
    alpha = next(line for line in out.splitlines() if line.strip().startswith("alpha"))
    assert code == 0
    assert real["data.alpha"] in alpha and "f" * 32 not in alpha
    assert f"MISMATCH     tag data.alpha = '{'f' * 32}' but the signed provenance says '{real['data.alpha']}'" in out
    assert "tag contract.beta = 'failed 0 expectations' but the signed provenance says the contract passed" in out
    assert "provenance   signed by ann, ben (quorum 2)" in out
    assert snapshot(world) == before


# --- 5. strict inputs --------------------------------------------------------------------------


def test_path_arguments_that_are_folders_get_an_error_and_a_fix(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    from quorum.cli.main import main
    from tests.test_cli_errors import assert_reported

    before = snapshot(world)
    folder = world.root / "keys"
    cases = [
        (cli(world, "approve", MODEL, "--version", "2", "--key", str(folder)), "is a folder, not a private key file"),
        (["deploy", "--site", "alpha", "--config", str(world.config_path), "--governance", str(folder)], "a directory"),
    ]
    for argv, fragment in cases:
        code = main(argv)
        assert_reported(code, capsys.readouterr().err, 2, fragment)
    governance = yaml.safe_load(world.governance_path.read_text())
    governance["approvers"][0]["public_key"] = "keys"  # a folder where a key file should be
    path = world.root / "governance-folder.yaml"
    path.write_text(yaml.safe_dump(governance))
    pin_governance_root(world.config_path, path)  # as if git held this file: the key path itself is the fault
    with pytest.raises(QuorumError, match="is a directory, not a file"):
        deploy(world, "alpha", path)
    assert snapshot(world) == before


def test_keys_generate_never_overwrites_a_lone_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from quorum.cli.main import main

    (tmp_path / "ann.pub").write_text("the key governance pins\n")

    code = main(["keys", "generate", "--name", "ann", "--out", str(tmp_path)])

    err = capsys.readouterr().err
    assert code == 2 and f"public key {tmp_path / 'ann.pub'} already exists; refusing to overwrite it" in err
    assert (tmp_path / "ann.pub").read_text() == "the key governance pins\n"
    assert not (tmp_path / "ann.key").exists()


def test_a_duplicated_key_in_governance_is_refused(world: World) -> None:
    text = world.governance_path.read_text() + "quorum: 1\n"
    path = world.root / "governance-duplicate.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError, match="found duplicate key 'quorum'"):
        deploy(world, "alpha", path)


# --- 6. approval inside the promotion transaction ---------------------------------------------------


def test_approve_that_fails_while_promoting_leaves_statement_and_alias_as_they_were(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from quorum.cli.main import main
    from quorum.lineage.audit import AuditLog

    deploy(world, "alpha")
    before = snapshot(world)
    store = world.context().store
    statement_before = store.get_bytes(champion.current_key(MODEL))
    append = AuditLog.append

    def failing_promotion(self: AuditLog, event: str, actor: str, details: dict[str, object]) -> object:
        if event == "promotion":
            raise OSError("disk full")
        return append(self, event, actor, details)

    monkeypatch.setattr(AuditLog, "append", failing_promotion)
    # an unforeseen failure: the command's guard reports it (exit 70, traceback in the log file)
    assert main(cli(world, "approve", MODEL, "--version", "2", "--key", str(world.keys["ben"]))) == 70

    assert snapshot(world) == before
    assert store.get_bytes(champion.current_key(MODEL)) == statement_before
    monkeypatch.setattr(AuditLog, "append", append)
    assert main(cli(world, "approve", MODEL, "--version", "2", "--key", str(world.keys["ben"]))) == 0
    assert world.champion() == "2"


def test_the_paused_run_links_the_verdict_and_names_the_command(world: World) -> None:
    from quorum.evaluation.gates import GateResult, Verdict
    from quorum.flows.approval import approval_markdown
    from quorum.flows.promote import PromotionResult
    from quorum.lineage.signing import QuorumResult

    verdict = Verdict(passed=True, gates=(GateResult("auc", 0.81, 0.7, True, "auc 0.8100 >= 0.7000"),))
    pending = PromotionResult("2", False, QuorumResult(("ann",), (), 2), "1")

    text = approval_markdown(world.context(), pending, verdict, "run-123")

    assert "test-model v2 awaits approval" in text and "run-123" in text and "verdict.html" in text
    assert "quorum approve test-model --version 2 --key YOUR.key" in text
    assert "| auc | pass | auc 0.8100 >= 0.7000 |" in text
    assert "MLflow model `test-model` version 2" in text


def _awaiting_run(world: World, awaiting_run: str | None, pause: object, monkeypatch: pytest.MonkeyPatch) -> object:
    """``await_approval`` for v2 in a flow run of its own, with ``pause`` standing in for Prefect's pause."""
    import prefect.flow_runs
    from prefect import flow
    from prefect.context import FlowRunContext

    from quorum.evaluation.gates import GateResult, Verdict
    from quorum.flows.approval import await_approval
    from quorum.flows.promote import PromotionResult
    from quorum.lineage.signing import QuorumResult

    monkeypatch.setattr(prefect.flow_runs, "pause_flow_run", pause)
    verdict = Verdict(passed=True, gates=(GateResult("auc", 0.81, 0.7, True, "auc 0.8100 >= 0.7000"),))
    ctx = world.context()

    @flow(name="waiting-lifecycle")
    def waiting() -> object:
        context = FlowRunContext.get()
        assert context is not None and context.flow_run is not None
        run = str(context.flow_run.id) if awaiting_run is None else awaiting_run
        return await_approval(ctx, PromotionResult("2", False, QuorumResult(("ann",), (), 2), "1", run), verdict, "r1")

    return waiting()


def test_a_run_resumed_before_the_quorum_pauses_again_and_promotes_once_it_is_met(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from quorum.flows.approval import approval_key
    from quorum.flows.promote import sign_candidate
    from quorum.lineage.signing import today_utc

    pauses: list[str] = []

    def resumed_by_hand(*, timeout: int, key: str) -> None:  # the UI's Resume button, twice
        pauses.append(key)
        if len(pauses) == 2:  # ben's signature arrives during the second pause, without `quorum approve`
            sign_candidate(world.context(), "2", [("ben", world.keys["ben"])], today_utc())

    result = _awaiting_run(world, None, resumed_by_hand, monkeypatch)

    assert pauses == [approval_key(MODEL, "2"), f"{approval_key(MODEL, '2')}-1"]
    assert getattr(result, "champion", None) is True and world.champion() == "2"
    current = champion.read_current(world.context().store, MODEL)
    assert current is not None and current[0]["version"] == "2"


def test_only_the_run_awaiting_approval_may_pause_for_it(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from quorum.configs.errors import NotPermitted

    pauses: list[str] = []

    with pytest.raises(NotPermitted, match="may wait for the approval of v2"):
        _awaiting_run(world, "another-run", lambda *, timeout, key: pauses.append(key), monkeypatch)

    assert pauses == [] and world.champion() == "1"

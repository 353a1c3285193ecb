"""The signed champion statement: which version the sites run, in an order nobody can turn back.

A statement says ``{model, version, provenance digest, sequence, time, previous statement digest,
action, reason}``. Every statement counts only with the signatures of a quorum of distinct approvers;
a rollback statement's quorum must also include an approver governance allows to roll back, and it
may only name a version that an earlier statement in the same chain made champion (the chain is walked by digest, so its
earlier links need no signatures of their own: the signed head commits to them).

Sites deploy from the statement, never from the MLflow alias, and remember the highest sequence they
have seen (``remember_champion``, in the site's own folder): a replayed older statement is refused,
as TUF refuses a rolled-back timestamp. A rollback is therefore a *new* statement with a higher
sequence. The alias is a mirror for people browsing MLflow; ``alias_disagreement`` reports when the
two differ.

Where things live in the artifact store (which an attacker may write; only signatures are believed):
``champion/<model>/current.json`` (the newest statement), ``champion/<model>/statements/<seq>.json``
(every statement), and per version ``models/<model>/v<N>/statement/`` (the proposal the approvers
sign, and one signature file per approver).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from quorum.configs.errors import ChampionError, QuorumNotMet, SignatureError
from quorum.configs.schema import GovernanceConfig
from quorum.lineage.artifacts import ArtifactMissing, ArtifactStore
from quorum.lineage.envelope import Signed, Tally, digest, envelope, parse_envelope, sign, tally

KIND = "champion"
PROMOTION = "promotion"
ROLLBACK = "rollback"
_FIX = "deploy nothing new: keep the running model and ask the approvers to check `quorum status`"


class StaleStatement(SignatureError):
    """A statement older than one this site already accepted (a replay or a rolled-back store)."""

    headline = "Champion statement is older than one already seen"


@dataclass(frozen=True)
class ChampionStatement:
    """A verified statement: what the sites run, and which approvers vouched for it."""

    model: str
    version: str
    provenance_sha256: str
    sequence: int
    time: str
    previous: str | None
    action: str
    reason: str
    digest: str
    signers: tuple[str, ...]


def current_key(model: str) -> str:
    return f"champion/{model}/current.json"


def statement_key(model: str, sequence: int) -> str:
    return f"champion/{model}/statements/{sequence:08d}.json"


def proposal_key(model: str, version: str) -> str:
    return f"models/{model}/v{version}/statement/proposal.json"


def approval_key(model: str, version: str, approver: str) -> str:
    return f"models/{model}/v{version}/statement/{approver}.json"


# --- reading and verifying -----------------------------------------------------------------------


def read_current(store: ArtifactStore, model: str) -> tuple[dict[str, Any], tuple[Signed, ...]] | None:
    """The newest statement as stored (not yet verified), or None when no champion was ever named."""
    if not store.exists(current_key(model)):
        return None
    data = _get_json(store, current_key(model))
    if isinstance(data, dict) and data.get("payload") is None:
        return None  # a promotion that was rolled back before it completed
    return _parse(data, current_key(model))


def verify_statement(
    store: ArtifactStore,
    governance: GovernanceConfig,
    payload: Mapping[str, Any],
    signatures: tuple[Signed, ...],
    today: date,
) -> ChampionStatement:
    """Raise unless the statement is well formed and signed as its action requires."""
    problem = _shape_problem(payload)
    if problem:
        raise SignatureError(f"the champion statement is malformed: {problem}", fix=_FIX)
    where = f"champion statement {payload['sequence']} ({payload['model']} v{payload['version']})"
    result = tally(KIND, payload, signatures, governance, today)  # a rollback needs the quorum too
    rollback = payload["action"] != PROMOTION
    if len(result.valid) < governance.quorum:
        raise QuorumNotMet(
            f"{where}{' is a rollback and' if rollback else ''} needs {governance.quorum} approver signatures, "
            f"{len(result.valid)} valid; {result.describe()}",
            fix=_FIX,
        )
    if rollback:
        if not set(result.valid) & set(governance.rollback_approvers):
            raise SignatureError(
                f"{where} is a rollback that no approver allowed to roll back signed "
                f"(allowed: {', '.join(governance.rollback_approvers)}); {result.describe()}",
                fix=_FIX,
            )
        _require_earlier_champion(store, payload)
    return _statement(payload, result)


def verified_champion(
    store: ArtifactStore, governance: GovernanceConfig, model: str, trust_file: Path, today: date | None = None
) -> ChampionStatement:
    """The current champion as a site must see it: signed as required and not older than one seen before.

    The one call a site makes before it fetches, serves or deploys a model; ``trust_file`` is the
    site's own record (``remember_champion`` updates it once the model verified and loaded).
    """
    found = read_current(store, model)
    if found is None:
        raise ChampionError(
            f"{model} has no signed champion statement", fix="promote a version first (`quorum approve`)"
        )
    statement = verify_statement(store, governance, *found, today or datetime.now(UTC).date())
    seen = read_trust(trust_file).get("champion", {}).get(model)
    if isinstance(seen, dict):
        sequence, seen_digest = int(seen.get("sequence", 0)), str(seen.get("digest", ""))
        if statement.sequence < sequence:
            raise StaleStatement(
                f"the champion statement for {model} has sequence {statement.sequence} (v{statement.version}), "
                f"but this site already accepted sequence {sequence}: an older statement was put back",
                fix=_FIX,
            )
        if statement.sequence == sequence and statement.digest != seen_digest:
            raise StaleStatement(f"two different champion statements for {model} claim sequence {sequence}", fix=_FIX)
    return statement


def remember_champion(trust_file: Path, statement: ChampionStatement) -> None:
    """Record the newest statement this site accepted; never lowers the recorded sequence."""
    record = read_trust(trust_file)
    champions = dict(record.get("champion", {}))
    seen = champions.get(statement.model)
    if isinstance(seen, dict) and int(seen.get("sequence", 0)) > statement.sequence:
        return
    champions[statement.model] = {
        "sequence": statement.sequence,
        "digest": statement.digest,
        "version": statement.version,
    }
    write_trust(trust_file, {**record, "champion": champions})


def alias_disagreement(statement: ChampionStatement | None, alias: str | None) -> str | None:
    """What to tell a user when the MLflow alias does not mirror the signed statement."""
    named = None if statement is None else statement.version
    if named == alias:
        return None
    return (
        f"the MLflow alias `champion` points at {'v' + alias if alias else 'nothing'} but the signed statement "
        f"names {'v' + named if named else 'no champion'}; sites follow the statement (the alias was moved "
        "outside Quorum, or a promotion did not finish)"
    )


def signed_chain(
    store: ArtifactStore, governance: GovernanceConfig, model: str, today: date
) -> dict[int, dict[str, Any]]:
    """Every statement the verified current one commits to, by sequence (walked back by digest)."""
    found = read_current(store, model)
    if found is None:
        return {}
    head = verify_statement(store, governance, *found, today)
    chain = {head.sequence: found[0]}
    link, sequence = head.previous, head.sequence - 1
    while link is not None and sequence >= 1:
        key = statement_key(model, sequence)
        if not store.exists(key):
            break
        earlier, _ = _parse(_get_json(store, key), key)
        if digest(earlier) != link:
            break
        chain[sequence] = earlier
        link, sequence = earlier.get("previous"), sequence - 1
    return chain


def champion_versions(
    store: ArtifactStore, governance: GovernanceConfig, model: str, today: date | None = None
) -> tuple[str, ...]:
    """Every version a champion statement in the verified chain named, oldest first (rollbacks included).

    A site's service compares its candidate with these: a version that was champion once and was
    rolled back or superseded never comes back as a candidate, whatever the unsigned pointer says.
    """
    chain = signed_chain(store, governance, model, today or date.today())
    return tuple(str(chain[sequence]["version"]) for sequence in sorted(chain))


def unsigned_champion_events(
    entries: Sequence[tuple[int, str, Mapping[str, Any]]], chain: Mapping[int, Mapping[str, Any]], model: str
) -> list[str]:
    """Audit entries claiming a promotion or rollback that no signed statement backs (a forged line).

    ``entries`` are ``(index, event, details)``; every promotion and rollback entry names the sequence
    of the statement it published.
    """
    problems = []
    for index, event, details in entries:
        if event not in (PROMOTION, ROLLBACK) or details.get("model") != model:
            continue
        sequence = details.get("statement_sequence")
        version = str(details.get("version", details.get("to")))
        statement = chain.get(sequence) if isinstance(sequence, int) else None
        if statement is None or str(statement.get("version")) != version or statement.get("action") != event:
            problems.append(
                f"entry {index} records a {event} of {model} v{version} (statement {sequence}) that no signed "
                "champion statement backs"
            )
    return problems


def require_backed_champion_events(
    entries: Sequence[tuple[int, str, Mapping[str, Any]]],
    store: ArtifactStore,
    governance: GovernanceConfig,
    model: str,
    where: Path,
    today: date | None = None,
) -> None:
    """Raise ``AuditLogError`` when a promotion or rollback entry is not backed by the signed chain."""
    from quorum.configs.errors import AuditLogError

    if not any(event in (PROMOTION, ROLLBACK) for _, event, _ in entries):
        return
    chain = signed_chain(store, governance, model, today or datetime.now(UTC).date())
    problems = unsigned_champion_events(entries, chain, model)
    if problems:
        raise AuditLogError(
            f"{where}: " + "; ".join(problems),
            fix="a line was forged and re-chained: restore the log from a backup or a site's copy",
        )


# --- proposing, signing and publishing (coordinator and approvers) ---------------------------------


def current_statement(
    store: ArtifactStore, governance: GovernanceConfig, model: str, today: date
) -> ChampionStatement | None:
    """The verified newest statement, or None when there is none yet; a bad one is refused."""
    found = read_current(store, model)
    return None if found is None else verify_statement(store, governance, *found, today)


def chain_head(store: ArtifactStore, model: str) -> tuple[int, str] | None:
    """Sequence and digest of the stored newest statement, to chain the next one onto.

    Its signatures are not checked here: the new statement is believed only for its own signatures,
    and approvers see the sequence and previous digest they sign. (Signatures by keys revoked since
    must not block every later promotion.)
    """
    found = read_current(store, model)
    if found is None:
        return None
    payload, _ = found
    problem = _shape_problem(payload)
    if problem:
        raise SignatureError(f"the stored champion statement is malformed: {problem}", fix=_FIX)
    return int(payload["sequence"]), digest(payload)


def new_payload(
    head: tuple[int, str] | None, model: str, version: str, provenance_sha256: str, action: str, reason: str = ""
) -> dict[str, Any]:
    """The next statement in the chain after ``head`` (sequence, digest)."""
    return {
        "type": KIND,
        "model": model,
        "version": str(version),
        "provenance_sha256": provenance_sha256,
        "sequence": 1 if head is None else head[0] + 1,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "previous": None if head is None else head[1],
        "action": action,
        "reason": reason,
    }


def proposal(
    store: ArtifactStore, governance: GovernanceConfig, model: str, version: str, provenance_sha256: str, today: date
) -> dict[str, Any]:
    """The promotion statement approvers of ``version`` sign: the stored one while it still follows the
    current statement, otherwise a fresh one (older signatures then no longer count)."""
    current = chain_head(store, model)
    key = proposal_key(model, version)
    if store.exists(key):
        stored = _get_json(store, key)
        if isinstance(stored, dict) and _fresh(stored, current, provenance_sha256):
            return stored
    payload = new_payload(current, model, version, provenance_sha256, PROMOTION)
    store.put_json(key, payload)
    return payload


def add_approval(store: ArtifactStore, payload: Mapping[str, Any], private_key: Path, approver: str) -> Signed:
    signature = sign(KIND, payload, private_key, approver)
    store.put_json(
        approval_key(str(payload["model"]), str(payload["version"]), approver),
        {"statement_sha256": digest(payload), **signature.to_dict()},
    )
    return signature


def approvals(store: ArtifactStore, payload: Mapping[str, Any]) -> tuple[Signed, ...]:
    """The stored approver signatures over exactly ``payload`` (signatures of a stale proposal are left out)."""
    model, version = str(payload["model"]), str(payload["version"])
    prefix = f"models/{model}/v{version}/statement/"
    wanted = digest(payload)
    found = []
    for key in store.list_keys(prefix.rstrip("/")):
        if key == proposal_key(model, version) or not key.endswith(".json"):
            continue
        data = _get_json(store, key)
        if isinstance(data, dict) and data.get("statement_sha256") == wanted:
            try:
                found.append(Signed.from_dict(data))
            except ValueError:
                continue
    return tuple(found)


def tally_approvals(
    store: ArtifactStore, governance: GovernanceConfig, payload: Mapping[str, Any], today: date
) -> Tally:
    return tally(KIND, payload, approvals(store, payload), governance, today)


def publish(store: ArtifactStore, payload: Mapping[str, Any], signatures: tuple[Signed, ...]) -> bytes | None:
    """Make the statement current; return the previous ``current.json`` bytes (for an undo)."""
    model = str(payload["model"])
    previous = store.get_bytes(current_key(model)) if store.exists(current_key(model)) else None
    document = envelope(payload, signatures)
    store.put_json(statement_key(model, int(payload["sequence"])), document)
    store.put_json(current_key(model), document)
    return previous


def unpublish(store: ArtifactStore, model: str, previous: bytes | None) -> None:
    """Undo ``publish``: the statement before it is current again."""
    if previous is None:
        store.put_json(current_key(model), {"payload": None})
    else:
        store.put_bytes(current_key(model), previous)


# --- site trust record -----------------------------------------------------------------------------


def read_trust(path: Path) -> dict[str, Any]:
    """A site's record of what it has accepted; kept in the site's own folder, never in shared state."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def write_trust(path: Path, record: Mapping[str, Any]) -> None:
    write_json_atomically(Path(path), record)


def write_json_atomically(path: Path, record: Mapping[str, Any]) -> None:
    """Write under a temporary name, then rename: a site never reads half a record about what it trusts or runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        temp.write_text(json.dumps(dict(record), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


# --- private ---------------------------------------------------------------------------------------


def _fresh(stored: Mapping[str, Any], current: tuple[int, str] | None, provenance_sha256: str) -> bool:
    expected_sequence = 1 if current is None else current[0] + 1
    expected_previous = None if current is None else current[1]
    return (
        _shape_problem(stored) is None
        and stored["sequence"] == expected_sequence
        and stored["previous"] == expected_previous
        and stored["provenance_sha256"] == provenance_sha256
        and stored["action"] == PROMOTION
    )


def _require_earlier_champion(store: ArtifactStore, payload: Mapping[str, Any]) -> None:
    """Walk the chain back by digest: a rollback may only return to a version an earlier statement named."""
    model, wanted = str(payload["model"]), (str(payload["version"]), str(payload["provenance_sha256"]))
    link, sequence = payload.get("previous"), int(payload["sequence"]) - 1
    while link is not None and sequence >= 1:
        key = statement_key(model, sequence)
        try:
            earlier, _ = _parse(_get_json(store, key), key)
        except SignatureError:
            break
        if digest(earlier) != link:
            break
        if (str(earlier.get("version")), str(earlier.get("provenance_sha256"))) == wanted and sequence < int(
            payload["sequence"]
        ) - 1:
            return
        link, sequence = earlier.get("previous"), sequence - 1
    raise SignatureError(
        f"rollback statement {payload['sequence']} names {model} v{payload['version']}, which no earlier statement "
        "in its chain made champion (or the chain is broken)",
        fix=_FIX,
    )


def _shape_problem(payload: Mapping[str, Any]) -> str | None:
    fields: dict[str, type | tuple[type, ...]] = {
        "type": str,
        "model": str,
        "version": str,
        "provenance_sha256": str,
        "sequence": int,
        "time": str,
        "previous": (str, type(None)),
        "action": str,
        "reason": str,
    }
    if set(payload) != set(fields):
        return f"fields are {sorted(payload)}, expected {sorted(fields)}"
    wrong = [k for k, kind in fields.items() if not isinstance(payload[k], kind) or isinstance(payload[k], bool)]
    if wrong:
        return f"wrong type for {', '.join(wrong)}"
    if payload["type"] != KIND or payload["action"] not in (PROMOTION, ROLLBACK) or payload["sequence"] < 1:
        return "not a champion statement (type, action or sequence)"
    return None


def _statement(payload: Mapping[str, Any], result: Tally) -> ChampionStatement:
    return ChampionStatement(
        model=str(payload["model"]),
        version=str(payload["version"]),
        provenance_sha256=str(payload["provenance_sha256"]),
        sequence=int(payload["sequence"]),
        time=str(payload["time"]),
        previous=payload["previous"],
        action=str(payload["action"]),
        reason=str(payload["reason"]),
        digest=digest(payload),
        signers=result.valid,
    )


def _get_json(store: ArtifactStore, key: str) -> object:
    try:
        return store.get_json(key)
    except ArtifactMissing:
        raise SignatureError(f"{key} is missing from the artifact store", fix=_FIX) from None
    except (ValueError, OSError) as exc:
        raise SignatureError(f"{key} in the artifact store is unreadable: {exc}", fix=_FIX) from None


def _parse(data: object, key: str) -> tuple[dict[str, Any], tuple[Signed, ...]]:
    try:
        return parse_envelope(data)
    except ValueError as exc:
        raise SignatureError(f"{key} is not a signed champion statement: {exc}", fix=_FIX) from None

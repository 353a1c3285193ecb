"""Governance rules without any flow: key expiry and revocation, who may roll back, the champion history."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
import yaml

from quorum.configs.errors import ChampionError, ConfigError, NotPermitted, QuorumNotMet
from quorum.configs.schema import Approver, GovernanceConfig, load_governance
from quorum.flows.governance import champion_history, rollback_target
from quorum.lineage.audit import AuditEntry
from quorum.lineage.keys import generate_key_pair, public_key_fingerprint, require_rollback_right
from quorum.lineage.signing import check_quorum, require_quorum, sign_model

NAMES = ("ann", "ben", "cyd")
FP = "a" * 64  # a well-formed pin, for tests that never read the key


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("keys")
    pairs = {name: (folder / f"{name}.key", folder / f"{name}.pub") for name in NAMES}
    for private, public in pairs.values():
        generate_key_pair(private, public)
    return pairs


@pytest.fixture
def signed(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> tuple[Path, Path]:
    """A model folder signed by ann and ben."""
    model, sigs = tmp_path / "model", tmp_path / "signatures"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\x00\x01" * 64)
    for name in ("ann", "ben"):
        sign_model(model, keys[name][0], sigs / f"{name}.sig", name)
    return model, sigs


def governance(keys: dict[str, tuple[Path, Path]], **ben: object) -> GovernanceConfig:
    approvers = [Approver(name=n, public_key=keys[n][1], fingerprint=public_key_fingerprint(keys[n][1])) for n in NAMES]
    pin = public_key_fingerprint(keys["ben"][1])
    approvers[1] = Approver.model_validate({"name": "ben", "public_key": keys["ben"][1], "fingerprint": pin, **ben})
    return GovernanceConfig(quorum=2, approvers=tuple(approvers))


# --- keys: expiry and revocation ----------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "today", "problem"),
    [
        ({}, date(2030, 1, 1), None),  # no expiry, not revoked
        ({"expires": date(2026, 6, 30)}, date(2026, 6, 29), None),  # the day before expiry still counts
        (
            {"expires": date(2026, 6, 30)},
            date(2026, 6, 30),
            "key of approver ben expired on 2026-06-30",
        ),  # from then on
        ({"revoked": True}, date(2000, 1, 1), "key of approver ben is revoked in governance"),  # at once, whenever
    ],
)
def test_key_problem(changes: dict[str, object], today: date, problem: str | None, tmp_path: Path) -> None:
    approver = Approver.model_validate(
        {"name": "ben", "public_key": tmp_path / "ben.pub", "fingerprint": FP, **changes}
    )

    assert approver.key_problem(today) == problem


@pytest.mark.parametrize(
    ("ben", "now", "reason"),
    [
        ({"revoked": True}, None, "key of approver ben is revoked in governance"),
        ({"expires": date(2020, 1, 1)}, None, "key of approver ben expired on 2020-01-01"),  # default now: today, UTC
        ({"expires": date(2031, 1, 1)}, date(2031, 1, 1), "key of approver ben expired on 2031-01-01"),  # injected now
    ],
)
def test_quorum_ignores_revoked_and_expired_keys(
    signed: tuple[Path, Path], keys: dict[str, tuple[Path, Path]], ben: dict[str, object], now: date | None, reason: str
) -> None:
    model, sigs = signed
    config = governance(keys, **ben)

    result = check_quorum(model, sigs, config, now=now)

    assert result.valid_approvers == ("ann",)
    assert result.rejected == (("ben.sig", reason),)
    with pytest.raises(QuorumNotMet) as info:
        require_quorum(model, sigs, config, now=now)
    assert "ben" not in info.value.fix.split("one of:")[1]  # nobody is told to sign with a dead key


def test_a_key_still_valid_today_counts(signed: tuple[Path, Path], keys: dict[str, tuple[Path, Path]]) -> None:
    model, sigs = signed

    assert require_quorum(model, sigs, governance(keys, expires=date(2999, 1, 1))).valid_approvers == ("ann", "ben")


def test_governance_yaml_reads_expiry_revocation_and_rollback(tmp_path: Path) -> None:
    path = tmp_path / "governance.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "quorum": 1,
                "approvers": [
                    {"name": "ann", "public_key": "keys/ann.pub", "fingerprint": FP, "expires": "2027-03-31"},
                    {"name": "ben", "public_key": "keys/ben.pub", "fingerprint": "b" * 64, "revoked": True},
                ],
                "rollback": ["ann"],
            }
        )
    )

    config = load_governance(path)

    assert config.approvers[0].expires == date(2027, 3, 31) and not config.approvers[0].revoked
    assert config.approvers[1].revoked and config.approvers[1].public_key == tmp_path / "keys" / "ben.pub"
    assert config.rollback_approvers == ("ann",)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"rollback": ["ann", "zed"]}, "rollback names unknown approvers: zed"),  # a typo must not lock rollback out
        (
            {"approvers": [{"name": "ann", "public_key": "a.pub", "fingerprint": FP, "revoked": True}]},
            "only 0 approvers are not revoked",
        ),
        (
            {"approvers": [{"name": "ann", "public_key": "a.pub", "fingerprint": FP, "expires": "soon"}]},
            "approvers.0.expires",
        ),  # no date
        (
            {"approvers": [{"name": "ann", "public_key": "a.pub", "fingerprint": FP, "revoked": "maybe"}]},
            "approvers.0.revoked",
        ),
    ],
)
def test_bad_governance_is_reported_naming_the_key(tmp_path: Path, changes: dict[str, object], expected: str) -> None:
    path = tmp_path / "governance.yaml"
    path.write_text(
        yaml.safe_dump(
            {"quorum": 1, "approvers": [{"name": "ann", "public_key": "a.pub", "fingerprint": FP}], **changes}
        )
    )

    with pytest.raises(ConfigError, match=expected):
        load_governance(path)


# --- who may roll back ------------------------------------------------------------------


def test_everyone_may_roll_back_unless_governance_names_who(keys: dict[str, tuple[Path, Path]]) -> None:
    everyone = governance(keys)
    only_ann = everyone.model_copy(update={"rollback": ("ann",)})

    assert everyone.rollback_approvers == NAMES
    require_rollback_right(everyone, "cyd", date(2026, 1, 1))
    with pytest.raises(NotPermitted, match=r"may not roll back the champion \(allowed: ann\)"):
        require_rollback_right(only_ann, "cyd", date(2026, 1, 1))
    with pytest.raises(NotPermitted, match="expired on 2026-01-01"):
        require_rollback_right(governance(keys, expires=date(2026, 1, 1)), "ben", date(2026, 1, 1))


# --- the champion history ---------------------------------------------------------------


def entry(event: str, **details: object) -> AuditEntry:
    return AuditEntry(0, "t", event, "x", {"model": "m", **details}, "0", "0")


HISTORY = [
    entry("promotion", version="1"),
    entry("gate_verdict"),
    entry("promotion", version="2"),
    entry("promotion", version="2"),  # the champion promoted again: still one entry in the history
    entry("promotion", version="3", model="other"),  # another model in the same log
    entry("promotion", version="4"),
    entry("rollback", **{"from": "4", "to": "2"}),
    entry("promotion", version="5"),
]


def test_promotions_push_and_rollbacks_pop_the_champion_history() -> None:
    assert champion_history(HISTORY, "m") == ["1", "2", "5"]
    assert champion_history(HISTORY, "other") == ["3"]
    assert champion_history([], "m") == []


@pytest.mark.parametrize(
    ("current", "to_version", "expected"),
    [
        ("5", None, "2"),  # the last earlier champion
        ("5", "1", "1"),  # any earlier champion still on record
    ],
)
def test_rollback_target(current: str, to_version: str | None, expected: str) -> None:
    assert rollback_target(champion_history(HISTORY, "m"), current, to_version) == expected


@pytest.mark.parametrize(
    ("history", "current", "to_version", "expected"),
    [
        (["1", "2"], None, None, "no champion to roll back"),  # nothing promoted yet
        (["1", "2"], "1", None, "alias points at v1 but the audit log records v2"),  # alias moved outside Quorum
        ([], "1", None, "records no champion"),  # alias set without any audited promotion
        (["1"], "1", None, "v1 is the first champion"),  # nothing earlier
        (["1", "2", "5"], "5", "4", "v4 is not an earlier champion"),  # rolled back away from before: not on record
        (["1", "2", "5"], "5", "5", "v5 is not an earlier champion"),  # the current one
    ],
)
def test_rollback_target_refusals(
    history: list[str], current: str | None, to_version: str | None, expected: str
) -> None:
    with pytest.raises(ChampionError, match=expected) as info:
        rollback_target(history, current, to_version)

    assert info.value.fix

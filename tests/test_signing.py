"""Approver keys, model signatures and the approval quorum, against real model-signing."""

from __future__ import annotations

import hashlib
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from quorum.configs.errors import ConfigError, QuorumNotMet, SignatureError
from quorum.configs.schema import Approver, GovernanceConfig
from quorum.lineage.keys import generate_key_pair, public_key_fingerprint
from quorum.lineage.signing import QuorumResult, check_quorum, require_quorum, sign_model, verify_signature

MODEL_SIGNING_CLI = Path("/work/main/.venv/bin/model_signing")
PEOPLE = ("alice", "bob", "carol", "mallory")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """One key pair per person, made once: key generation is the slow part of these tests."""
    folder = tmp_path_factory.mktemp("keys")
    pairs = {name: (folder / f"{name}.pem", folder / f"{name}.pub") for name in PEOPLE}
    for private, public in pairs.values():
        generate_key_pair(private, public)
    return pairs


@pytest.fixture
def model(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    (directory / "weights").mkdir(parents=True)
    (directory / "weights" / "layer0.bin").write_bytes(bytes(range(256)) * 4)
    (directory / "config.json").write_text('{"hidden_sizes": [32, 16]}\n')
    (directory / "README.md").write_text("a tiny model\n")
    return directory


@pytest.fixture
def sigs(tmp_path: Path) -> Path:
    return tmp_path / "signatures"


def governance(
    keys: dict[str, tuple[Path, Path]], quorum: int = 2, names: tuple[str, ...] = PEOPLE[:3]
) -> GovernanceConfig:
    return GovernanceConfig(
        quorum=quorum,
        approvers=tuple(
            Approver(name=n, public_key=keys[n][1], fingerprint=public_key_fingerprint(keys[n][1])) for n in names
        ),
    )


def approve(model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]], signer: str, file_name: str = "") -> Path:
    path = sigs / (file_name or f"{signer}.sig")
    sign_model(model, keys[signer][0], path, approver=signer)
    return path


def cli_verify(model: Path, signature: Path, public_key: Path) -> subprocess.CompletedProcess[str]:
    """Run model-signing's own CLI with default flags, exactly as an outside auditor would."""
    command = ["verify", "key", "--signature", str(signature), "--public_key", str(public_key), str(model)]
    return subprocess.run([str(MODEL_SIGNING_CLI), *command], check=False, capture_output=True, text=True)


# --- keys -------------------------------------------------------------------------------


def test_private_key_is_created_owner_only(tmp_path: Path) -> None:
    generate_key_pair(tmp_path / "k.pem", tmp_path / "k.pub")
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in (tmp_path / "k.pem").read_bytes()
    assert b"PUBLIC KEY" in (tmp_path / "k.pub").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem", "k.pub"]  # no temp files left


def test_refuses_to_overwrite_an_existing_private_key(tmp_path: Path) -> None:
    generate_key_pair(tmp_path / "k.pem", tmp_path / "k.pub")
    before = (tmp_path / "k.pem").read_bytes(), (tmp_path / "k.pub").read_bytes()
    with pytest.raises(ConfigError, match="already exists") as info:
        generate_key_pair(tmp_path / "k.pem", tmp_path / "other.pub")
    assert info.value.fix
    assert ((tmp_path / "k.pem").read_bytes(), (tmp_path / "k.pub").read_bytes()) == before
    assert not (tmp_path / "other.pub").exists()


def test_fingerprint_is_sha256_of_der_public_key(keys: dict[str, tuple[Path, Path]]) -> None:
    public = keys["alice"][1]
    key = serialization.load_pem_public_key(public.read_bytes())
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert public_key_fingerprint(public) == hashlib.sha256(der).hexdigest()
    assert public_key_fingerprint(public) != public_key_fingerprint(keys["bob"][1])


def test_fingerprint_of_missing_key_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        public_key_fingerprint(tmp_path / "nope.pub")


# --- single signatures ------------------------------------------------------------------


def test_sign_and_verify_roundtrip(model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    signature = sign_model(model, keys["alice"][0], sigs / "alice.sig", approver="alice")
    assert signature.approver == "alice"
    assert signature.path == sigs / "alice.sig"
    assert signature.digest == hashlib.sha256(signature.path.read_bytes()).hexdigest()
    verify_signature(model, signature.path, keys["alice"][1])
    assert sorted(p.name for p in sigs.iterdir()) == ["alice.sig"]  # written atomically, no temp left


@pytest.mark.integration  # runs the model-signing CLI in its own process
def test_model_signing_cli_verifies_our_signature(model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    signature = approve(model, sigs, keys, "alice")
    ok = cli_verify(model, signature, keys["alice"][1])
    assert ok.returncode == 0, ok.stderr
    assert "Verification succeeded" in ok.stdout
    assert cli_verify(model, signature, keys["bob"][1]).returncode != 0
    (model / "README.md").write_text("changed\n")
    assert cli_verify(model, signature, keys["alice"][1]).returncode != 0


def test_flipped_byte_is_rejected(model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    signature = approve(model, sigs, keys, "alice")
    weights = model / "weights" / "layer0.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(SignatureError, match=r"alice\.sig.*alice.*weights/layer0\.bin"):
        verify_signature(model, signature, keys["alice"][1])


def test_added_file_is_rejected(model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    signature = approve(model, sigs, keys, "alice")
    (model / "backdoor.py").write_text("import os\n")
    with pytest.raises(SignatureError, match="backdoor.py"):
        verify_signature(model, signature, keys["alice"][1])


def test_removed_file_is_rejected(model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    signature = approve(model, sigs, keys, "alice")
    (model / "README.md").unlink()
    with pytest.raises(SignatureError, match="README.md"):
        verify_signature(model, signature, keys["alice"][1])


def test_signature_by_another_key_is_rejected(model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    signature = approve(model, sigs, keys, "mallory", "alice.sig")
    with pytest.raises(SignatureError, match="alice"):
        verify_signature(model, signature, keys["alice"][1])


def test_garbage_signature_file_is_rejected_not_crashed(
    model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]
) -> None:
    sigs.mkdir()
    for name, content in {"empty.sig": "", "text.sig": "not json", "shape.sig": '{"a": 1}'}.items():
        (sigs / name).write_text(content)
        with pytest.raises(SignatureError, match=name):
            verify_signature(model, sigs / name, keys["alice"][1])


def test_missing_public_key_names_the_path(model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    signature = approve(model, sigs, keys, "alice")
    missing = sigs.parent / "gone.pub"
    with pytest.raises(SignatureError, match="gone.pub"):
        verify_signature(model, signature, missing)


def test_signature_inside_model_dir_is_refused(model: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    with pytest.raises(ConfigError, match="inside the model directory"):
        sign_model(model, keys["alice"][0], model / "alice.sig", approver="alice")
    assert not (model / "alice.sig").exists()


@pytest.mark.integration  # signs with the model-signing CLI in its own process
def test_signature_that_skips_model_files_is_rejected(
    model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]
) -> None:
    """model-signing honours a signer's --ignore-paths at verify time; we refuse such partial approvals."""
    sigs.mkdir()
    signature = sigs / "alice.sig"
    subprocess.run(
        [str(MODEL_SIGNING_CLI), "sign", "key", "--private_key", str(keys["alice"][0]), "--signature", str(signature),
         "--ignore-paths", str(model / "weights"), str(model)],
        check=True, capture_output=True,
    )  # fmt: skip
    with pytest.raises(SignatureError, match="leaves files out of the model: weights"):
        verify_signature(model, signature, keys["alice"][1])


# --- quorum -----------------------------------------------------------------------------


def test_two_of_three_valid_meets_quorum(model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    approve(model, sigs, keys, "alice")
    approve(model, sigs, keys, "carol")
    result = require_quorum(model, sigs, governance(keys))
    assert result == QuorumResult(valid_approvers=("alice", "carol"), rejected=(), required=2)
    assert result.met


def test_same_approver_twice_counts_once(model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    approve(model, sigs, keys, "alice")
    approve(model, sigs, keys, "alice", "alice.2.sig")
    result = check_quorum(model, sigs, governance(keys))
    assert result.valid_approvers == ("alice",)
    assert not result.met


def test_key_not_in_governance_is_rejected(model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    approve(model, sigs, keys, "alice")
    approve(model, sigs, keys, "mallory")
    approve(model, sigs, keys, "mallory", "bob.sig")  # claims to be bob, signed with mallory's key
    result = check_quorum(model, sigs, governance(keys))
    assert result.valid_approvers == ("alice",)
    reasons = dict(result.rejected)
    assert reasons["mallory.sig"] == "not an approver in governance"
    assert "Key mismatch" in reasons["bob.sig"]
    assert not result.met


def test_one_short_raises_quorum_not_met_with_counts(
    model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]
) -> None:
    approve(model, sigs, keys, "alice")
    approve(model, sigs, keys, "mallory", "bob.sig")
    with pytest.raises(QuorumNotMet) as info:
        require_quorum(model, sigs, governance(keys))
    message = info.value.message
    assert message.startswith("2 of 3 approvals needed, 1 valid: alice; rejected: bob.sig (")
    assert "quorum approve" in info.value.fix
    assert "bob" in info.value.fix and "carol" in info.value.fix


def test_modified_model_rejects_every_signature(model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    approve(model, sigs, keys, "alice")
    approve(model, sigs, keys, "bob")
    (model / "config.json").write_text('{"hidden_sizes": [64]}\n')
    result = check_quorum(model, sigs, governance(keys))
    assert result.valid_approvers == ()
    assert [name for name, _ in result.rejected] == ["alice.sig", "bob.sig"]
    assert all("config.json" in reason for _, reason in result.rejected)


def test_missing_public_key_is_rejected_naming_path(
    model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    approve(model, sigs, keys, "alice")
    missing = tmp_path / "absent" / "alice.pub"
    pinned = public_key_fingerprint(keys["alice"][1])
    config = GovernanceConfig(quorum=1, approvers=(Approver(name="alice", public_key=missing, fingerprint=pinned),))
    result = check_quorum(model, sigs, config)
    assert result.rejected == (
        ("alice.sig", f"approver alice's public key cannot be used: public key {missing} does not exist"),
    )


def test_a_public_key_file_that_does_not_match_its_pin_is_rejected(
    model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    # the attacker replaced alice.pub with their own key and signed with it
    approve(model, sigs, keys, "bob", "alice.sig")
    pinned = public_key_fingerprint(keys["alice"][1])
    config = GovernanceConfig(
        quorum=1, approvers=(Approver(name="alice", public_key=keys["bob"][1], fingerprint=pinned),)
    )
    result = check_quorum(model, sigs, config)
    assert not result.met
    assert "not the" in result.rejected[0][1] and "pinned in governance (key file replaced)" in result.rejected[0][1]


def test_two_approvers_sharing_a_key_count_once(model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    shared = keys["alice"][1]
    pin = public_key_fingerprint(shared)
    entries = (
        Approver(name="alice", public_key=shared, fingerprint=pin),
        Approver(name="alias", public_key=shared, fingerprint=pin),
    )
    with pytest.raises(ValueError, match="approvers share one key fingerprint: alias, alice"):
        GovernanceConfig(quorum=2, approvers=entries)
    config = GovernanceConfig.model_construct(quorum=2, approvers=entries, rollback=None)  # the count guards too
    approve(model, sigs, keys, "alice")
    approve(model, sigs, keys, "alice", "alias.sig")
    result = check_quorum(model, sigs, config)
    assert result.valid_approvers == ("alias",)  # files are checked in name order
    assert result.rejected == (("alice.sig", "same public key as approver alias; one key cannot approve twice"),)
    assert not result.met


def test_no_signatures_folder_means_no_approvals(model: Path, sigs: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    result = check_quorum(model, sigs, governance(keys, quorum=1))
    assert result == QuorumResult(valid_approvers=(), rejected=(), required=1)
    with pytest.raises(QuorumNotMet, match="1 of 3 approvals needed, 0 valid: none"):
        require_quorum(model, sigs, governance(keys, quorum=1))

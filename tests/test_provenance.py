"""The provenance statement: its in-toto shape, what it binds, and every way it is refused."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from quorum.configs.errors import ProvenanceError, SignatureError
from quorum.lineage.keys import generate_key_pair
from quorum.lineage.provenance import (
    PREDICATE_TYPE,
    PROVENANCE_FILE,
    STATEMENT_TYPE,
    BuildFacts,
    SiteEvidence,
    build_statement,
    provenance_digest,
    verify_provenance,
    write_provenance,
)
from quorum.lineage.signing import sign_model, verify_signature

FACTS = BuildFacts(
    job_id="job-1",
    config_hash="c" * 64,
    git_commit="abc123",
    mlflow_run_id="run-parent",
    mlflow_model_run_id="run-promote",
    sites=(SiteEvidence("north", "md5-n.dir", True), SiteEvidence("east", "md5-e.dir", False)),
    verdict={"passed": True, "gates": [{"name": "auc", "value": 0.8, "bound": 0.7, "passed": True}]},
)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    directory = tmp_path / "v1" / "files"
    (directory / "data").mkdir(parents=True)
    (directory / "data" / "model.pt2").write_bytes(bytes(range(256)) * 8)
    (directory / "MLmodel").write_text("flavors: {}\n")
    return directory


def provenanced(files: Path, version: str = "1") -> Path:
    write_provenance(files, build_statement(files, "churn", version, FACTS))
    return files


def test_statement_is_in_toto_v1_over_every_file_but_itself(model: Path) -> None:
    digest = write_provenance(model, build_statement(model, "churn", "1", FACTS))

    statement = json.loads((model / PROVENANCE_FILE).read_text())

    assert statement["_type"] == STATEMENT_TYPE and statement["predicateType"] == PREDICATE_TYPE
    assert statement["subject"] == [
        {"name": "MLmodel", "digest": {"sha256": hashlib.sha256(b"flavors: {}\n").hexdigest()}},
        {"name": "data/model.pt2", "digest": {"sha256": hashlib.sha256(bytes(range(256)) * 8).hexdigest()}},
    ]
    assert statement["predicate"] == {
        "model": {"name": "churn", "version": "1"},
        "job_id": "job-1",
        "config_hash": "c" * 64,
        "git_commit": "abc123",
        "mlflow": {"run_id": "run-parent", "model_run_id": "run-promote"},
        "sites": {
            "east": {"data_hash": "md5-e.dir", "contract_passed": False},
            "north": {"data_hash": "md5-n.dir", "contract_passed": True},
        },
        "verdict": dict(FACTS.verdict),
    }
    assert digest == provenance_digest(model) == hashlib.sha256((model / PROVENANCE_FILE).read_bytes()).hexdigest()
    assert sorted(p.name for p in model.iterdir()) == ["MLmodel", "data", PROVENANCE_FILE]  # no temp file left


def test_verify_returns_the_statement_when_files_match(model: Path) -> None:
    statement = verify_provenance(provenanced(model), "churn", "1")

    assert statement["predicate"]["job_id"] == "job-1"


def _flip(files: Path) -> None:
    path = files / "data" / "model.pt2"
    data = bytearray(path.read_bytes())
    data[7] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_flip, "changed: data/model.pt2"),  # weights altered after the statement was written
        (lambda f: (f / "extra.py").write_text("x"), "not in the statement (added): extra.py"),  # a file slipped in
        (lambda f: (f / "MLmodel").unlink(), "missing (removed): MLmodel"),  # a file taken away
        (lambda f: (f / "data" / "model.pt2").rename(f / "model.pt2"), "added): model.pt2"),  # moved inside the folder
    ],
)
def test_files_that_differ_from_the_subject_are_named(
    model: Path, tamper: Callable[[Path], object], expected: str
) -> None:
    provenanced(model)
    tamper(model)

    with pytest.raises(
        ProvenanceError, match=r"does not match the files: .*" + expected.replace("(", r"\(").replace(")", r"\)")
    ):
        verify_provenance(model, "churn", "1")


@pytest.mark.parametrize(
    ("name", "version"),
    [("churn", "2"), ("other-model", "1")],  # another version of the same model; the same version of another model
)
def test_a_statement_about_another_model_or_version_is_refused(model: Path, name: str, version: str) -> None:
    provenanced(model)

    with pytest.raises(ProvenanceError, match=f"names churn v1, not {name} v{version}"):
        verify_provenance(model, name, version)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no provenance.json"),  # never written: promoted before provenance existed, or deleted
        ("{not json", "not readable JSON"),  # damaged
        ("[]", "expected a JSON object"),  # not a statement at all
        ('{"_type": "https://in-toto.io/Statement/v0.1"}', "_type is"),  # another statement version
        (json.dumps({"_type": STATEMENT_TYPE, "predicateType": "https://slsa.dev/provenance/v1"}), "predicateType is"),
        (json.dumps({"_type": STATEMENT_TYPE, "predicateType": PREDICATE_TYPE, "predicate": {}}), "predicate.model"),
        (  # a subject entry without a sha256 digest
            json.dumps(
                {
                    "_type": STATEMENT_TYPE,
                    "predicateType": PREDICATE_TYPE,
                    "predicate": {"model": {"name": "churn", "version": "1"}},
                    "subject": [{"name": "MLmodel", "digest": {"md5": "x"}}],
                }
            ),
            "subject must be a list",
        ),
    ],
)
def test_malformed_statements_are_refused_with_the_reason(model: Path, content: str | None, expected: str) -> None:
    if content is not None:
        (model / PROVENANCE_FILE).write_text(content)

    with pytest.raises(ProvenanceError, match=expected) as info:
        verify_provenance(model, "churn", "1")

    assert isinstance(info.value, SignatureError) and info.value.fix


def test_a_subject_listing_a_file_twice_is_refused(model: Path) -> None:
    statement = build_statement(model, "churn", "1", FACTS)
    statement["subject"].append(statement["subject"][0])
    write_provenance(model, statement)

    with pytest.raises(ProvenanceError, match="subject lists a file twice: MLmodel"):
        verify_provenance(model, "churn", "1")


def test_symbolic_links_are_refused(model: Path, tmp_path: Path) -> None:
    (tmp_path / "outside.bin").write_bytes(b"never hashed")
    (model / "link.bin").symlink_to(tmp_path / "outside.bin")

    with pytest.raises(ProvenanceError, match="symbolic link link.bin"):
        build_statement(model, "churn", "1", FACTS)


def test_a_signature_over_one_version_never_validates_another_with_identical_weights(
    model: Path, tmp_path: Path
) -> None:
    """Deterministic training can yield byte-identical files; the signed provenance still tells versions apart."""
    generate_key_pair(tmp_path / "ann.key", tmp_path / "ann.pub")
    second = tmp_path / "v2" / "files"
    shutil.copytree(model, second)
    provenanced(model, "1")
    provenanced(second, "2")
    signature = sign_model(model, tmp_path / "ann.key", tmp_path / "v1" / "signatures" / "ann.sig", "ann")

    verify_signature(model, signature.path, tmp_path / "ann.pub")
    with pytest.raises(SignatureError, match="provenance.json"):
        verify_signature(second, signature.path, tmp_path / "ann.pub")

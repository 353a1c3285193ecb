"""The wire format: every message kind against its golden file, both ways, and malformed messages refused.

A golden file changes only with a deliberate change of the format, which then needs the coordinator
and every site upgraded together.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from quorum.configs.errors import ReplyRejected
from quorum.evaluation.drift import DriftSummary, FeatureDrift
from quorum.evaluation.metrics import BinaryCounts
from quorum.evaluation.report import SiteEvaluation
from quorum.tasks import wire
from quorum.tasks.contract import ContractSummary, FailedExpectation
from quorum.tasks.features import Moments
from quorum.tasks.site import DataFingerprint

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "wire"

COUNTS = BinaryCounts(tp=40, fp=7, tn=45, fn=8, loss_sum=31.5, positive_hist=(1, 2, 45), negative_hist=(44, 6, 2))
VARIANT_COUNTS = BinaryCounts(
    tp=39, fp=7, tn=45, fn=9, loss_sum=31.75, positive_hist=(2, 2, 44), negative_hist=(44, 6, 2)
)
FAILED_CONTRACT = ContractSummary(
    passed=False,
    evaluated=12,
    failed=(
        FailedExpectation("expect_column_values_to_be_between", "age", 3, "3 values outside 18..100"),
        FailedExpectation("expect_table_row_count_to_be_between", None, None, "too few rows"),
    ),
    warnings=("column notes looks like free text",),
)
FEATURE = FeatureDrift("tenure", "Wasserstein distance (normed)", 0.42, 0.1, True, "")

# (golden file, value, encoder, decoder): one row per message kind
CASES: list[tuple[str, Any, Callable[[Any], Any], Callable[[Any], Any]]] = [
    (
        "request_train.json",
        wire.Request("job-7", 3, "train", ("alpha", "beta"), 2, "jobs/job-7/requests/000003.npz", "ab" * 32),
        wire.encode_request,
        wire.decode_request,
    ),
    (
        "request_reveal.json",
        wire.Request(
            "job-7",
            9,
            "reveal",
            ("alpha",),
            4,
            peers={"alpha": "01" * 64, "beta": "02" * 64, "gamma": "03" * 64},
            dropped=("beta",),
            shares={"alpha": {"gamma": "0a0b"}, "gamma": {"alpha": "0c0d"}},
        ),
        wire.encode_request,
        wire.decode_request,
    ),
    (
        "request_variants.json",
        wire.Request(
            "job-7",
            12,
            "variants",
            ("alpha", "beta"),
            weights_key="jobs/job-7/requests/000012.npz",
            weights_sha256="ab" * 32,
            files={
                "onnx": {"key": "jobs/job-7/requests/000012/onnx.bin", "sha256": "01" * 32},
                "onnx-int8": {"key": "jobs/job-7/requests/000012/onnx-int8.bin", "sha256": "02" * 32},
            },
        ),
        wire.encode_request,
        wire.decode_request,
    ),
    (
        "fingerprint.json",
        DataFingerprint(
            "alpha",
            "d41d8cd98f00b204e9800998ecf8427e",
            120,
            96,
            24,
            "5e" * 8,
            FAILED_CONTRACT,
            Moments(96, (1.5, -2.0), (9.25, 16.0)),
        ),
        wire.encode_fingerprint,
        wire.decode_fingerprint,
    ),
    (
        "train_reply.json",
        wire.TrainReply("alpha", "job-7", 2, 96, 0.6931, 1.25, False, "jobs/job-7/replies/000003/alpha.npz", "cd" * 32),
        wire.encode_train_reply,
        wire.decode_train_reply,
    ),
    (
        "evaluation.json",
        SiteEvaluation("beta", COUNTS, {"F": COUNTS, "M": COUNTS}),
        wire.encode_evaluation,
        wire.decode_evaluation,
    ),
    (
        "variant_counts.json",
        ("beta", {"torch": COUNTS, "onnx": COUNTS, "onnx-int8": VARIANT_COUNTS}),
        lambda value: wire.encode_variant_counts(*value),
        lambda data: ("beta", wire.decode_variant_counts(data)),
    ),
    (
        "drift_summary.json",
        DriftSummary(
            "beta",
            96,
            80,
            (FEATURE,),
            0.5,
            FeatureDrift("prediction", "PSI", 0.02, 0.1, False, "champion v3"),
            ("missing column plan",),
        ),
        wire.encode_drift,
        wire.decode_drift,
    ),
    (
        "failure.json",
        wire.Failure("Data contract failed", "site alpha: 3 values outside 18..100", "fix the data at the site"),
        wire.encode_failure,
        wire.decode_failure,
    ),
]
IDS = [case[0] for case in CASES]


def _golden(name: str) -> Any:
    return json.loads((GOLDEN / name).read_text())


@pytest.mark.parametrize(("name", "value", "encode", "decode"), CASES, ids=IDS)
def test_encoding_matches_the_golden_file(name: str, value: Any, encode: Callable[[Any], Any], decode: Any) -> None:
    encoded = encode(value)

    assert encoded == _golden(name)
    assert json.loads(json.dumps(encoded)) == encoded  # plain JSON: nothing a reader must know Python to read


@pytest.mark.parametrize(("name", "value", "encode", "decode"), CASES, ids=IDS)
def test_decoding_the_golden_file_gives_the_value(
    name: str, value: Any, encode: Any, decode: Callable[[Any], Any]
) -> None:
    assert decode(_golden(name)) == value


def test_key_and_share_replies_round_trip() -> None:
    key = bytes(range(64))
    seeds = {"beta": b"\x01" * 16, "gamma": b"\x02" * 16}

    assert wire.decode_public_key(wire.encode_public_key("alpha", key)) == key
    assert wire.decode_shares(wire.encode_shares("alpha", seeds)) == seeds
    assert wire.decode_failure(wire.encode_train_reply(_golden_train())) is None  # a result is not a failure


def _golden_train() -> wire.TrainReply:
    return wire.decode_train_reply(_golden("train_reply.json"))


def _without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}


@pytest.mark.parametrize(
    ("name", "decode", "broken"),
    [
        # a field missing
        ("request_train.json", wire.decode_request, lambda d: _without(d, "seq")),
        # a kind the site does not know
        ("request_train.json", wire.decode_request, lambda d: {**d, "kind": "exfiltrate"}),
        # a row count that is a bool, not a count
        ("fingerprint.json", wire.decode_fingerprint, lambda d: {**d, "train_rows": True}),
        # a contract outcome that is a string
        ("fingerprint.json", wire.decode_fingerprint, lambda d: {**d, "contract": {**d["contract"], "passed": "yes"}}),
        # moments of two different lengths
        ("fingerprint.json", wire.decode_fingerprint, lambda d: {**d, "moments": {**d["moments"], "total": [1.0]}}),
        # an example count as text
        ("train_reply.json", wire.decode_train_reply, lambda d: {**d, "num_examples": "96"}),
        # weights without their digest
        ("train_reply.json", wire.decode_train_reply, lambda d: _without(d, "weights_sha256")),
        # a histogram holding a float
        (
            "evaluation.json",
            wire.decode_evaluation,
            lambda d: {**d, "overall": {**d["overall"], "positive_hist": [0.5]}},
        ),
        # groups that are a list
        ("evaluation.json", wire.decode_evaluation, lambda d: {**d, "groups": []}),
        # a drift statistic that is text
        ("drift_summary.json", wire.decode_drift, lambda d: {**d, "drift_share": "high"}),
        # a feature entry that is not an object
        ("drift_summary.json", wire.decode_drift, lambda d: {**d, "features": ["tenure"]}),
        # a shipped file without its digest: the site could not check what it loads
        (
            "request_variants.json",
            wire.decode_request,
            lambda d: {**d, "files": {"onnx": {"key": d["files"]["onnx"]["key"]}}},
        ),
        # a shipped file reference with an extra field
        (
            "request_variants.json",
            wire.decode_request,
            lambda d: {**d, "files": {"onnx": {**d["files"]["onnx"], "path": "/etc/passwd"}}},
        ),
        # variant counts without the torch baseline they are compared with
        (
            "variant_counts.json",
            wire.decode_variant_counts,
            lambda d: {**d, "runtimes": {"onnx": d["runtimes"]["onnx"]}},
        ),
        # variant counts that are a list
        ("variant_counts.json", wire.decode_variant_counts, lambda d: {**d, "runtimes": []}),
        # a failure without its message
        ("failure.json", wire.decode_failure, lambda d: {"failure": _without(d["failure"], "message")}),
    ],
)
def test_malformed_messages_are_rejected_naming_what_is_wrong(
    name: str, decode: Callable[[Any], Any], broken: Callable[[dict[str, Any]], Any]
) -> None:
    with pytest.raises(ReplyRejected, match="malformed"):
        decode(broken(_golden(name)))


@pytest.mark.parametrize(
    "data",
    [
        {"site_id": "alpha", "public_key": "00" * 63},  # one byte short of two X25519 keys
        {"site_id": "alpha", "public_key": "00" * 32},  # one X25519 key where a round needs two
        {"site_id": "alpha", "public_key": "zz" * 64},  # not hex
        {"site_id": "alpha"},  # no key at all
    ],
)
def test_a_bad_public_key_is_rejected(data: dict[str, Any]) -> None:
    with pytest.raises(ReplyRejected):
        wire.decode_public_key(data)


def test_every_request_kind_decodes_and_nothing_else() -> None:
    base = _golden("request_train.json")

    decoded = [wire.decode_request({**base, "kind": kind}).kind for kind in wire.KINDS]

    assert decoded == list(wire.KINDS)
    assert set(wire.KINDS) == {
        "preprocess",
        "train",
        "evaluate",
        "variants",
        "monitor",
        "keys",
        "share",
        "reveal",
        "stop",
    }

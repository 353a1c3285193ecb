"""The wire format between the coordinator and the sites: every message, both directions, in one place.

Messages are JSON objects written to the artifact store; weights travel as a separate ``.npz``
object that the JSON names with its sha256, so a reader checks what it loads. ``encode_*`` turns a
typed value into plain JSON data; ``decode_*`` does the reverse and validates every field on the
way: a message comes from another machine and is treated as such. A malformed message raises
``ReplyRejected`` naming the field, never a half-read object. ``tests/fixtures/wire/`` holds a
golden file per message kind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast, get_args

from quorum.configs.errors import ReplyRejected
from quorum.evaluation.drift import DriftSummary, FeatureDrift
from quorum.evaluation.metrics import BinaryCounts
from quorum.evaluation.report import SiteEvaluation
from quorum.tasks.contract import ContractSummary, FailedExpectation
from quorum.tasks.features import Moments
from quorum.tasks.site import DataFingerprint

Kind = Literal["preprocess", "train", "evaluate", "variants", "monitor", "keys", "share", "reveal", "stop"]
KINDS: tuple[str, ...] = get_args(Kind)
PUBLIC_KEY_BYTES = 64  # a site's round keys under secure aggregation: two X25519 public keys
_FIX = "run the same Quorum version at the coordinator and at every site"

T = TypeVar("T")


# --- field readers: each names the field it rejects -------------------------------------------


def _field(data: Any, key: str) -> Any:
    if not isinstance(data, Mapping):
        raise TypeError(f"expected an object, got {type(data).__name__}")
    if key not in data:
        raise KeyError(key)
    return data[key]


def _str(data: Any, key: str) -> str:
    value = _field(data, key)
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string, got {type(value).__name__}")
    return value


def _opt_str(data: Any, key: str) -> str | None:
    value = data.get(key) if isinstance(data, Mapping) else None
    return None if value is None else _str(data, key)


def _int(data: Any, key: str) -> int:
    value = _field(data, key)
    # bool is an int subclass: a row count of True is a bug, not a count
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} must be an integer, got {type(value).__name__}")
    return value


def _float(data: Any, key: str) -> float:
    value = _field(data, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} must be a number, got {type(value).__name__}")
    return float(value)


def _bool(data: Any, key: str) -> bool:
    value = _field(data, key)
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be true or false, got {type(value).__name__}")
    return value


def _list(data: Any, key: str) -> list[Any]:
    value = _field(data, key)
    if not isinstance(value, list):
        raise TypeError(f"{key} must be a list, got {type(value).__name__}")
    return value


def _object(data: Any, key: str) -> Mapping[str, Any]:
    value = _field(data, key)
    if not isinstance(value, Mapping):
        raise TypeError(f"{key} must be an object, got {type(value).__name__}")
    return value


def _strings(values: list[Any], key: str) -> tuple[str, ...]:
    if not all(isinstance(v, str) for v in values):
        raise TypeError(f"{key} must hold strings")
    return tuple(values)


def _decoding(what: str, decode: Callable[[], T]) -> T:
    """Run ``decode``; any shape error becomes one ``ReplyRejected`` naming the message and the field."""
    try:
        return decode()
    except KeyError as exc:
        raise ReplyRejected(f"malformed {what}: missing field {exc}", fix=_FIX) from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ReplyRejected(f"malformed {what}: {exc}", fix=_FIX) from None


# --- coordinator -> site ------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One piece of work the coordinator asks of the sampled sites.

    Under secure aggregation ``peers`` maps every site of the round to its round keys (hex): a share
    request splits secrets for them, a train request masks against them (except the ``dropped`` ones,
    which shared nothing), a reveal request names the ``dropped`` sites and carries in ``shares`` the
    encrypted shares the sites sent each other (recipient -> sender -> hex).

    A ``variants`` request carries, beside the candidate's weights, the ONNX files a promotion is about
    to sign: ``files`` maps each runtime to the store key of its bytes and their sha256.
    """

    job_id: str
    seq: int
    kind: Kind
    sites: tuple[str, ...]
    server_round: int = 0
    weights_key: str | None = None
    weights_sha256: str | None = None
    peers: Mapping[str, str] | None = None
    dropped: tuple[str, ...] = ()
    shares: Mapping[str, Mapping[str, str]] | None = None
    files: Mapping[str, Mapping[str, str]] | None = None

    def shares_for(self, site_id: str) -> dict[str, bytes]:
        """The encrypted shares addressed to ``site_id``; malformed hex is rejected, not guessed at."""
        try:
            return {str(sender): bytes.fromhex(str(c)) for sender, c in (self.shares or {}).get(site_id, {}).items()}
        except (ValueError, AttributeError) as exc:
            raise ReplyRejected(f"malformed shares: {exc}", fix="check the coordinator's version") from exc

    def peer_keys(self) -> dict[str, bytes]:
        """``peers`` as raw public keys; a malformed list is rejected, not guessed at."""
        try:
            keys = {str(site): bytes.fromhex(str(key)) for site, key in (self.peers or {}).items()}
        except ValueError as exc:
            raise ReplyRejected(f"malformed peer key list: {exc}", fix="check the coordinator's version") from exc
        short = sorted(site for site, key in keys.items() if len(key) != PUBLIC_KEY_BYTES)
        if short:
            raise ReplyRejected(f"round keys of {short} are not X25519 public keys", fix="check the coordinator")
        return keys


def encode_request(request: Request) -> dict[str, Any]:
    return {
        "job_id": request.job_id,
        "seq": request.seq,
        "kind": request.kind,
        "sites": list(request.sites),
        "server_round": request.server_round,
        "weights_key": request.weights_key,
        "weights_sha256": request.weights_sha256,
        "peers": None if request.peers is None else dict(request.peers),
        "dropped": list(request.dropped),
        "shares": None if request.shares is None else {k: dict(v) for k, v in request.shares.items()},
        "files": None if request.files is None else {k: dict(v) for k, v in request.files.items()},
    }


def decode_request(data: Any) -> Request:
    def decode() -> Request:
        kind = _str(data, "kind")
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        peers, shares, files = data.get("peers"), data.get("shares"), data.get("files")
        return Request(
            job_id=_str(data, "job_id"),
            seq=_int(data, "seq"),
            kind=cast(Kind, kind),
            sites=_strings(_list(data, "sites"), "sites"),
            server_round=_int(data, "server_round"),
            weights_key=_opt_str(data, "weights_key"),
            weights_sha256=_opt_str(data, "weights_sha256"),
            peers=None if peers is None else {k: _str(peers, k) for k in _object(data, "peers")},
            dropped=_strings(_list(data, "dropped"), "dropped"),
            shares=None
            if shares is None
            else {k: {s: _str(shares[k], s) for s in _object(shares, k)} for k in _object(data, "shares")},
            files=None if files is None else {k: _file_ref(_object(files, k)) for k in _object(data, "files")},
        )

    return _decoding("request", decode)


def _file_ref(data: Mapping[str, Any]) -> dict[str, str]:
    """One shipped file: its store key and sha256, nothing else."""
    ref = {"key": _str(data, "key"), "sha256": _str(data, "sha256")}
    if set(data) != set(ref):
        raise ValueError(f"a file reference holds only key and sha256, not {sorted(set(data) - set(ref))}")
    return ref


# --- site -> coordinator: preprocess ------------------------------------------------------------


def encode_contract(summary: ContractSummary) -> dict[str, Any]:
    return {
        "passed": summary.passed,
        "evaluated": summary.evaluated,
        "failed": [
            {
                "expectation": item.expectation,
                "column": item.column,
                "unexpected_count": item.unexpected_count,
                "detail": item.detail,
            }
            for item in summary.failed
        ],
        "warnings": list(summary.warnings),
    }


def _failed_expectation(item: Any) -> FailedExpectation:
    count = _field(item, "unexpected_count")
    return FailedExpectation(
        expectation=_str(item, "expectation"),
        column=_opt_str(item, "column"),
        unexpected_count=None if count is None else _int(item, "unexpected_count"),
        detail=_str(item, "detail"),
    )


def decode_contract(data: Any) -> ContractSummary:
    return _decoding(
        "contract summary",
        lambda: ContractSummary(
            passed=_bool(data, "passed"),
            evaluated=_int(data, "evaluated"),
            failed=tuple(_failed_expectation(item) for item in _list(data, "failed")),
            warnings=_strings(_list(data, "warnings"), "warnings"),
        ),
    )


def encode_fingerprint(fp: DataFingerprint) -> dict[str, Any]:
    moments = fp.moments
    return {
        "site_id": fp.site_id,
        "data_hash": fp.data_hash,
        "raw_rows": fp.raw_rows,
        "train_rows": fp.train_rows,
        "test_rows": fp.test_rows,
        "schema_hash": fp.schema_hash,
        "contract": encode_contract(fp.contract),
        "moments": None
        if moments is None
        else {"count": moments.count, "total": list(moments.total), "total_sq": list(moments.total_sq)},
    }


def _moments(data: Any) -> Moments:
    total = tuple(float(v) for v in _list(data, "total"))
    total_sq = tuple(float(v) for v in _list(data, "total_sq"))
    if len(total) != len(total_sq):
        raise ValueError("moments: total and total_sq differ in length")
    return Moments(_int(data, "count"), total, total_sq)


def decode_fingerprint(data: Any) -> DataFingerprint:
    def decode() -> DataFingerprint:
        moments = _field(data, "moments")
        return DataFingerprint(
            site_id=_str(data, "site_id"),
            data_hash=_str(data, "data_hash"),
            raw_rows=_int(data, "raw_rows"),
            train_rows=_int(data, "train_rows"),
            test_rows=_int(data, "test_rows"),
            schema_hash=_str(data, "schema_hash"),
            contract=decode_contract(_object(data, "contract")),
            moments=None if moments is None else _moments(moments),
        )

    return _decoding("data fingerprint", decode)


# --- site -> coordinator: train, keys, reveal -----------------------------------------------------


@dataclass(frozen=True)
class TrainReply:
    """A site's answer to a train request; its weights (or one masked vector) are the named ``.npz``."""

    site_id: str
    job_id: str
    server_round: int
    num_examples: int
    train_loss: float
    train_s: float
    masked: bool
    weights_key: str = ""  # filled in by the exchange when it writes the weights
    weights_sha256: str = ""


def encode_train_reply(reply: TrainReply) -> dict[str, Any]:
    return {
        "site_id": reply.site_id,
        "job_id": reply.job_id,
        "server_round": reply.server_round,
        "num_examples": reply.num_examples,
        "train_loss": reply.train_loss,
        "train_s": reply.train_s,
        "masked": reply.masked,
        "weights_key": reply.weights_key,
        "weights_sha256": reply.weights_sha256,
    }


def decode_train_reply(data: Any) -> TrainReply:
    return _decoding(
        "train reply",
        lambda: TrainReply(
            site_id=_str(data, "site_id"),
            job_id=_str(data, "job_id"),
            server_round=_int(data, "server_round"),
            num_examples=_int(data, "num_examples"),
            train_loss=_float(data, "train_loss"),
            train_s=_float(data, "train_s"),
            masked=_bool(data, "masked"),
            weights_key=_str(data, "weights_key"),
            weights_sha256=_str(data, "weights_sha256"),
        ),
    )


def encode_public_key(site_id: str, key: bytes) -> dict[str, Any]:
    return {"site_id": site_id, "public_key": key.hex()}


def decode_public_key(data: Any) -> bytes:
    key = _decoding("key reply", lambda: bytes.fromhex(_str(data, "public_key")))
    if len(key) != PUBLIC_KEY_BYTES:
        raise ReplyRejected(f"round keys of {len(key)} bytes, expected {PUBLIC_KEY_BYTES}", fix=_FIX)
    return key


def encode_shares(site_id: str, shares: Mapping[str, bytes]) -> dict[str, Any]:
    """A share or reveal reply: encrypted shares by recipient (share), or revealed shares by owner (reveal)."""
    return {"site_id": site_id, "shares": {peer: share.hex() for peer, share in sorted(shares.items())}}


def decode_shares(data: Any) -> dict[str, bytes]:
    def decode() -> dict[str, bytes]:
        shares = _object(data, "shares")
        return {str(peer): bytes.fromhex(_str(shares, peer)) for peer in shares}

    return _decoding("shares reply", decode)


# --- site -> coordinator: evaluate, monitor -------------------------------------------------------


def encode_counts(counts: BinaryCounts) -> dict[str, Any]:
    return {
        "tp": counts.tp,
        "fp": counts.fp,
        "tn": counts.tn,
        "fn": counts.fn,
        "loss_sum": counts.loss_sum,
        "positive_hist": list(counts.positive_hist),
        "negative_hist": list(counts.negative_hist),
    }


def decode_counts(data: Any) -> BinaryCounts:
    def hist(key: str) -> tuple[int, ...]:
        values = _list(data, key)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TypeError(f"{key} must hold integers")
        return tuple(values)

    return _decoding(
        "confusion counts",
        lambda: BinaryCounts(
            tp=_int(data, "tp"),
            fp=_int(data, "fp"),
            tn=_int(data, "tn"),
            fn=_int(data, "fn"),
            loss_sum=_float(data, "loss_sum"),
            positive_hist=hist("positive_hist"),
            negative_hist=hist("negative_hist"),
        ),
    )


def encode_evaluation(evaluation: SiteEvaluation) -> dict[str, Any]:
    return {
        "site_id": evaluation.site_id,
        "overall": encode_counts(evaluation.overall),
        "groups": {name: encode_counts(counts) for name, counts in evaluation.groups.items()},
    }


def decode_evaluation(data: Any) -> SiteEvaluation:
    def decode() -> SiteEvaluation:
        groups = _object(data, "groups")
        return SiteEvaluation(
            site_id=_str(data, "site_id"),
            overall=decode_counts(_object(data, "overall")),
            groups={str(name): decode_counts(counts) for name, counts in groups.items()},
        )

    return _decoding("evaluation counts", decode)


def encode_variant_counts(site_id: str, runtimes: Mapping[str, BinaryCounts]) -> dict[str, Any]:
    """A site's answer to a variants request: its test split's counts under torch and each ONNX variant."""
    return {"site_id": site_id, "runtimes": {name: encode_counts(c) for name, c in sorted(runtimes.items())}}


def decode_variant_counts(data: Any) -> dict[str, BinaryCounts]:
    def decode() -> dict[str, BinaryCounts]:
        runtimes = _object(data, "runtimes")
        if "torch" not in runtimes:
            raise KeyError("runtimes.torch")
        return {str(name): decode_counts(_object(runtimes, name)) for name in runtimes}

    return _decoding("variant counts", decode)


def _encode_feature(feature: FeatureDrift) -> dict[str, Any]:
    return {
        "column": feature.column,
        "method": feature.method,
        "statistic": feature.statistic,
        "threshold": feature.threshold,
        "drifted": feature.drifted,
        "note": feature.note,
    }


def _decode_feature(data: Any) -> FeatureDrift:
    return FeatureDrift(
        column=_str(data, "column"),
        method=_str(data, "method"),
        statistic=_float(data, "statistic"),
        threshold=_float(data, "threshold"),
        drifted=_bool(data, "drifted"),
        note=_str(data, "note"),
    )


def encode_drift(summary: DriftSummary) -> dict[str, Any]:
    """Also the form a site's monitoring flow stores and the coordinator's drift check reads."""
    return {
        "site_id": summary.site_id,
        "rows_reference": summary.rows_reference,
        "rows_current": summary.rows_current,
        "features": [_encode_feature(feature) for feature in summary.features],
        "drift_share": summary.drift_share,
        "prediction": None if summary.prediction is None else _encode_feature(summary.prediction),
        "problems": list(summary.problems),
    }


def decode_drift(data: Any) -> DriftSummary:
    def decode() -> DriftSummary:
        prediction = _field(data, "prediction")
        return DriftSummary(
            site_id=_str(data, "site_id"),
            rows_reference=_int(data, "rows_reference"),
            rows_current=_int(data, "rows_current"),
            features=tuple(_decode_feature(item) for item in _list(data, "features")),
            drift_share=_float(data, "drift_share"),
            prediction=None if prediction is None else _decode_feature(prediction),
            problems=_strings(_list(data, "problems"), "problems"),
        )

    return _decoding("drift summary", decode)


# --- either direction: an expected failure ---------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """A site's expected failure (a ``QuorumError`` it raised), sent instead of a result."""

    headline: str
    message: str
    fix: str


def encode_failure(failure: Failure) -> dict[str, Any]:
    return {"failure": {"headline": failure.headline, "message": failure.message, "fix": failure.fix}}


def decode_failure(data: Any) -> Failure | None:
    """The failure a reply carries, ``None`` for a result; a malformed failure is rejected."""
    if not isinstance(data, Mapping) or data.get("failure") is None:
        return None
    failure = data["failure"]
    return _decoding(
        "failure",
        lambda: Failure(_str(failure, "headline"), _str(failure, "message"), _str(failure, "fix")),
    )

"""The wire format between the coordinator and site sessions, through the artifact store.

Every message is JSON; weights travel as a separate ``.npz`` object named in the JSON with its
sha256, so a reader checks what it loads. Decoding validates the shape of each message: a site
reply is input from another machine and is treated as such.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from quorum.configs.errors import ReplyRejected
from quorum.evaluation.metrics import BinaryCounts
from quorum.evaluation.report import SiteEvaluation
from quorum.tasks.contract import ContractSummary
from quorum.tasks.features import Moments

Kind = Literal["preprocess", "train", "evaluate", "monitor", "keys", "share", "reveal", "stop"]
KINDS: tuple[str, ...] = ("preprocess", "train", "evaluate", "monitor", "keys", "share", "reveal", "stop")
PUBLIC_KEY_BYTES = 64  # a site's round keys under secure aggregation: two X25519 public keys


@dataclass(frozen=True)
class Request:
    """One piece of work the coordinator asks of the sampled sites.

    Under secure aggregation ``peers`` maps every site of the round to its round keys (hex): a share
    request splits secrets for them, a train request masks against them (except the ``dropped`` ones,
    which shared nothing), a reveal request names the ``dropped`` sites and carries in ``shares`` the
    encrypted shares the sites sent each other (recipient -> sender -> hex).
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
            raise ReplyRejected(f"peer keys of {short} are not X25519 public keys", fix="check the coordinator")
        return keys

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "seq": self.seq,
            "kind": self.kind,
            "sites": list(self.sites),
            "server_round": self.server_round,
            "weights_key": self.weights_key,
            "weights_sha256": self.weights_sha256,
            "peers": None if self.peers is None else dict(self.peers),
            "dropped": list(self.dropped),
            "shares": None if self.shares is None else {k: dict(v) for k, v in self.shares.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Request:
        try:
            kind = str(data["kind"])
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            return cls(
                job_id=str(data["job_id"]),
                seq=int(data["seq"]),
                kind=kind,  # type: ignore[arg-type]
                sites=tuple(str(s) for s in data["sites"]),
                server_round=int(data.get("server_round", 0)),
                weights_key=data.get("weights_key"),
                weights_sha256=data.get("weights_sha256"),
                peers=None if data.get("peers") is None else {str(k): str(v) for k, v in data["peers"].items()},
                dropped=tuple(str(s) for s in data.get("dropped", ())),
                shares=None
                if data.get("shares") is None
                else {str(k): {str(s): str(c) for s, c in v.items()} for k, v in data["shares"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            fix = "the coordinator and site run different versions"
            raise ReplyRejected(f"malformed request: {exc}", fix=fix) from exc


def fingerprint_to_dict(fp: Any) -> dict[str, Any]:
    return dict(fp.to_dict())


def fingerprint_from_dict(data: Mapping[str, Any]) -> Any:
    from quorum.tasks.site import DataFingerprint

    try:
        moments = data.get("moments")
        return DataFingerprint(
            site_id=str(data["site_id"]),
            data_hash=str(data["data_hash"]),
            raw_rows=int(data["raw_rows"]),
            train_rows=int(data["train_rows"]),
            test_rows=int(data["test_rows"]),
            schema_hash=str(data["schema_hash"]),
            contract=ContractSummary.from_dict(data["contract"]),
            moments=None
            if moments is None
            else Moments(
                int(moments["count"]),
                tuple(float(v) for v in moments["total"]),
                tuple(float(v) for v in moments["total_sq"]),
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ReplyRejected(f"malformed data fingerprint: {exc}", fix="check the site's Quorum version") from exc


def evaluation_to_dict(evaluation: SiteEvaluation) -> dict[str, Any]:
    return evaluation.to_dict()


def evaluation_from_dict(data: Mapping[str, Any]) -> SiteEvaluation:
    try:
        return SiteEvaluation(
            site_id=str(data["site_id"]),
            overall=BinaryCounts.from_dict(data["overall"]),
            groups={str(k): BinaryCounts.from_dict(v) for k, v in data["groups"].items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ReplyRejected(f"malformed evaluation counts: {exc}", fix="check the site's Quorum version") from exc

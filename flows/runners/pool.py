"""``PoolRunner``: site work on each site's own Prefect work pool, one session per site per job.

At job start one ``site-session`` flow run per site is started on pool ``site-<id>`` (through its
deployment); from then on every preprocess/train/evaluate/monitor call is a request in the artifact
store that the sessions answer. The runner waits for every asked site or until the deadline, and
reports a site that did not answer as a failure naming how to start its worker; whether the job can
go on without it is the round loop's decision (``min_sites``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from quorum.configs.errors import QuorumError, ReplyRejected
from quorum.evaluation.drift import DriftSummary
from quorum.evaluation.report import SiteEvaluation
from quorum.flows.context import JobContext
from quorum.flows.runners.exchange import JobExchange
from quorum.flows.runners.local import Reply, SecAggRound, SiteFailure, SiteRunner
from quorum.tasks.messages import PUBLIC_KEY_BYTES, Request, evaluation_from_dict, fingerprint_from_dict
from quorum.tasks.model import Weights
from quorum.tasks.site import DataFingerprint, SiteUpdate
from quorum.tasks.site_secagg import MaskedUpdate

SESSION_FLOW = "site-session"
POLL_S = 0.02
GONE_AFTER_S = 10.0  # a session that has not beaten for this long is gone (it beats every second between requests)


def session_deployment(site_id: str) -> str:
    return f"{SESSION_FLOW}/session-{site_id}"


class PoolRunner(SiteRunner):
    def __init__(self, ctx: JobContext, config_path: str) -> None:
        self.ctx = ctx
        self.config_path = config_path
        self.exchange = JobExchange(ctx.store, ctx.job_id)
        self.flow_runs: dict[str, str] = {}
        self._started_at = 0.0
        self._first_request = True

    def start(self, site_ids: Sequence[str]) -> None:
        """Start one session per site, without waiting for any of them to be picked up."""
        from prefect.deployments import run_deployment

        self._started_at = time.monotonic()
        for site_id in site_ids:
            try:
                run = run_deployment(
                    session_deployment(site_id),
                    parameters={
                        "config_path": self.config_path,
                        "site_id": site_id,
                        "job_id": self.ctx.job_id,
                        "store_root": self.ctx.store.location,
                    },
                    timeout=0,
                    tags=[f"job:{self.ctx.job_id}"],
                )
            except Exception as exc:  # Prefect raises ObjectNotFound or HTTP errors: both mean "not deployed"
                raise QuorumError(
                    f"cannot start the session of site {site_id}: {exc}",
                    fix="run `quorum up` (it deploys infra/prefect.yaml and starts the site workers)",
                ) from exc
            self.flow_runs[site_id] = str(run.id)  # type: ignore[union-attr]  # sync call returns a FlowRun

    def close(self) -> None:
        seq = self.exchange.next_seq()
        self.exchange.post(Request(self.ctx.job_id, seq, "stop", ()))

    def _deadline_s(self) -> float:
        deployment = self.ctx.config.deployment
        return deployment.session_start_timeout_s if self._first_request else deployment.round_deadline_s

    def _dispatch(
        self,
        kind: str,
        site_ids: Sequence[str],
        weights: Weights | None = None,
        server_round: int = 0,
        secagg: SecAggRound | None = None,
        dropped: Collection[str] = (),
    ) -> dict[str, dict[str, Any] | SiteFailure]:
        request = Request(
            self.ctx.job_id,
            self.exchange.next_seq(),
            kind,  # type: ignore[arg-type]
            tuple(site_ids),
            server_round,
            peers=None if secagg is None else secagg.wire_peers(),
            dropped=tuple(sorted(dropped)),
            shares=secagg.wire_shares() if secagg is not None and kind == "reveal" else None,
        )
        request = self.exchange.post(request, weights)
        deadline = time.monotonic() + self._deadline_s()
        replies: dict[str, dict[str, Any] | SiteFailure] = {}
        while len(replies) < len(site_ids) and time.monotonic() < deadline:
            for site_id in site_ids:
                if site_id not in replies:
                    reply = self.exchange.read_reply(request.seq, site_id)
                    if reply is not None:
                        replies[site_id] = _failure(site_id, reply) or reply
                    elif self._gone(site_id):
                        replies[site_id] = self._silent(site_id, "stopped answering (its session is gone)")
            if len(replies) < len(site_ids):
                time.sleep(max(POLL_S, self.exchange.store.poll_s))
        self._first_request = False
        for site_id in site_ids:
            if site_id not in replies:
                replies[site_id] = self._silent(site_id)
        return replies

    def _gone(self, site_id: str) -> bool:
        """A session that beat before and has since been silent for several beats has died."""
        silent = self.exchange.silent_for(site_id)
        return silent is not None and silent > GONE_AFTER_S

    def _silent(self, site_id: str, what: str = "") -> SiteFailure:
        what = what or f"did not answer within {self._deadline_s():.0f}s"
        return SiteFailure(
            site_id,
            "Site did not answer",
            f"site {site_id} {what}",
            f"start its worker: `quorum up`, or `prefect worker start --pool site-{site_id}` where its data is",
        )

    def _decode(
        self, replies: dict[str, dict[str, Any] | SiteFailure], decode: Callable[[str, dict[str, Any]], Any]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for site_id, reply in replies.items():
            if isinstance(reply, SiteFailure):
                out[site_id] = reply
                continue
            try:
                out[site_id] = decode(site_id, reply)
            except (QuorumError, KeyError, TypeError, ValueError, AttributeError) as exc:
                message = exc.message if isinstance(exc, QuorumError) else repr(exc)
                out[site_id] = SiteFailure(site_id, "Malformed reply", f"site {site_id}: {message}", "")
        return out

    def preprocess(self, site_ids: Sequence[str]) -> dict[str, DataFingerprint | SiteFailure]:
        return self._decode(self._dispatch("preprocess", site_ids), lambda _, r: fingerprint_from_dict(r))

    def train(
        self, site_ids: Sequence[str], weights: Weights, server_round: int, secagg: SecAggRound | None = None
    ) -> dict[str, Reply]:
        def decode(site_id: str, reply: dict[str, Any]) -> SiteUpdate | MaskedUpdate:
            if reply.get("job_id") != self.ctx.job_id:
                raise ReplyRejected(f"reply is for job {reply.get('job_id')!r}, not {self.ctx.job_id}")
            arrays = self.exchange.reply_weights(reply)
            site, server_round = str(reply["site_id"]), int(reply["server_round"])
            examples, loss = int(reply["num_examples"]), float(reply["train_loss"])
            train_s = float(reply.get("train_s", 0.0))
            if secagg is None:
                return SiteUpdate(site, server_round, arrays, examples, loss, train_s)
            if not reply.get("masked") or len(arrays) != 1:
                raise ReplyRejected("secure aggregation is on but the reply is not one masked vector")
            return MaskedUpdate(site, server_round, arrays[0], examples, loss, train_s)

        unshared = () if secagg is None else secagg.unshared
        return self._decode(self._dispatch("train", site_ids, weights, server_round, secagg, unshared), decode)

    def keys(self, site_ids: Sequence[str], job_id: str, server_round: int) -> dict[str, bytes | SiteFailure]:
        def decode(site_id: str, reply: dict[str, Any]) -> bytes:
            key = bytes.fromhex(str(reply["public_key"]))
            if len(key) != PUBLIC_KEY_BYTES:
                raise ReplyRejected(f"round keys of {len(key)} bytes, expected {PUBLIC_KEY_BYTES}")
            return key

        return self._decode(self._dispatch("keys", site_ids, server_round=server_round), decode)

    def share(
        self, site_ids: Sequence[str], secagg: SecAggRound, server_round: int
    ) -> dict[str, dict[str, bytes] | SiteFailure]:
        def decode(site_id: str, reply: dict[str, Any]) -> dict[str, bytes]:
            return {str(to): bytes.fromhex(str(c)) for to, c in reply["shares"].items()}

        return self._decode(self._dispatch("share", site_ids, server_round=server_round, secagg=secagg), decode)

    def reveal(
        self, site_ids: Sequence[str], secagg: SecAggRound, server_round: int, dropped: Collection[str]
    ) -> dict[str, dict[str, bytes] | SiteFailure]:
        def decode(site_id: str, reply: dict[str, Any]) -> dict[str, bytes]:
            return {str(owner): bytes.fromhex(str(share)) for owner, share in reply["shares"].items()}

        replies = self._dispatch("reveal", site_ids, server_round=server_round, secagg=secagg, dropped=dropped)
        return self._decode(replies, decode)

    def evaluate(self, site_ids: Sequence[str], weights: Weights) -> dict[str, SiteEvaluation | SiteFailure]:
        return self._decode(self._dispatch("evaluate", site_ids, weights), lambda _, r: evaluation_from_dict(r))

    def monitor(self, site_ids: Sequence[str], champion: Weights | None) -> dict[str, Any]:
        return self._decode(self._dispatch("monitor", site_ids, champion), lambda _, r: DriftSummary.from_dict(r))


def _failure(site_id: str, reply: dict[str, Any]) -> SiteFailure | None:
    failure = reply.get("failure")
    if failure is None:
        return None
    if not isinstance(failure, dict):
        return SiteFailure(site_id, ReplyRejected.headline, f"site {site_id} sent a malformed failure", "")
    return SiteFailure(
        site_id, str(failure.get("headline", "")), str(failure.get("message", "")), str(failure.get("fix", ""))
    )

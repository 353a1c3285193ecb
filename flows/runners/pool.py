"""``PoolRunner``: site work on each site's own Prefect work pool, one session per site per job.

At job start one ``site-session`` flow run per site is started on pool ``site-<id>`` (through its
deployment); from then on every preprocess/train/evaluate/monitor call is a request in the artifact
store that the sessions answer, so each site starts one process per job. While waiting, the runner
tells a slow site from an absent one (``liveness.judge``): a session its worker picked up, or that
beats, is waited for up to the start-up allowance; a site whose pool has no live worker is given up
at once. While the job waits for its approvers, ``rest`` stops the sessions and the next request
starts new ones. A session that ended before it ever served (its process died on the way up, e.g. on an
overloaded machine) is started again once, as a new flow run, while the start-up allowance lasts
(``liveness.restart_session``); the site's start-up clock starts again with it. A site given up on is
reported as a failure with that true reason (a restart and the first attempt's end included);
whether the job can go on without it is the round loop's decision (``min_sites``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from quorum.configs.errors import QuorumError, ReplyRejected
from quorum.evaluation.metrics import BinaryCounts
from quorum.evaluation.report import SiteEvaluation
from quorum.flows.context import JobContext
from quorum.flows.runners.exchange import JobExchange
from quorum.flows.runners.liveness import Allowances, PrefectWatch, Signals, judge, restart_session
from quorum.flows.runners.local import Reply, SecAggRound, SiteFailure, SiteRunner
from quorum.flows.site_queue import wait_for_capacity
from quorum.tasks import wire
from quorum.tasks.site import DataFingerprint, SiteUpdate
from quorum.tasks.site_secagg import MaskedUpdate
from quorum.tasks.weights import Weights
from quorum.tasks.wire import Request

SESSION_FLOW = "site-session"
POLL_S = 0.02
START_ATTEMPTS = 6  # 1 + 2 + 4 + 8 + 16 s of backoff for a server that answers 503
GONE_AFTER_S = 10.0  # a session silent this long whose worker is gone too has died (it beats every second)


def session_deployment(site_id: str) -> str:
    return f"{SESSION_FLOW}/session-{site_id}"


def site_pool(site_id: str) -> str:
    return f"site-{site_id}"


class PoolRunner(SiteRunner):
    def __init__(self, ctx: JobContext, config_path: str) -> None:
        self.ctx = ctx
        self.config_path = config_path
        self.exchange = JobExchange(ctx.store, ctx.job_id)
        self.flow_runs: dict[str, str] = {}
        self.watch = PrefectWatch(self.flow_runs, {s: site_pool(s) for s in ctx.config.site_ids})
        self._started_at = time.monotonic()  # start() sets it again when it starts the sessions
        self._site_started_at: dict[str, float] = {}  # a restarted session's start-up clock
        self.restarts: dict[str, str] = {}  # site -> how its first session ended (sites restarted)
        self.restart_count: dict[str, int] = {}
        self.resting = False  # rest() stopped the sessions; the next request starts new ones
        self._beats_since = 0.0  # time.time() the current sessions were started after a rest
        deployment = ctx.config.deployment
        self.allowances = Allowances(deployment.session_start_timeout_s, deployment.round_deadline_s, GONE_AFTER_S)

    def start(self, site_ids: Sequence[str]) -> None:
        """Start one session per site, without waiting for any of them to be picked up."""
        self._started_at = time.monotonic()
        for site_id in site_ids:
            self.flow_runs[site_id] = self._start_session(site_id)
        wait_for_capacity(self.flow_runs, self.ctx.job_id, self.ctx.config.placement.queue_timeout_s)

    def _start_session(self, site_id: str) -> str:
        """The flow run id of the site's new session; a busy server (503) is asked again, with backoff."""
        import httpx
        from prefect.deployments import run_deployment
        from prefect.exceptions import ObjectNotFound

        parameters = {
            "config_path": self.config_path,
            "site_id": site_id,
            "job_id": self.ctx.job_id,
            "store_root": self.ctx.store.location,
        }
        refused: Exception | None = None
        for attempt in range(START_ATTEMPTS):
            try:
                run = run_deployment(
                    session_deployment(site_id), parameters=parameters, timeout=0, tags=[f"job:{self.ctx.job_id}"]
                )
                return str(run.id)  # type: ignore[union-attr]  # the sync call returns a FlowRun
            except ObjectNotFound as exc:
                raise QuorumError(
                    f"site {site_id} has no session deployment ({session_deployment(site_id)})",
                    fix="run `quorum up` (it deploys infra/prefect.yaml and starts the site workers)",
                ) from exc
            except httpx.HTTPError as exc:  # Prefect's status errors derive from it
                refused = exc
                if attempt + 1 < START_ATTEMPTS:
                    time.sleep(2.0**attempt)
        raise QuorumError(
            f"the Prefect server did not start the session of site {site_id} in {START_ATTEMPTS} tries: {refused}",
            fix="the server is overloaded or down: see its log (quorum status), then run the job again",
        )

    def _restart(self, site_id: str, reason: str) -> None:
        """A new session for a site whose first one ended before it served; the reason is kept for the log."""
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        self.restarts.setdefault(site_id, reason)
        count = self.restart_count[site_id] = self.restart_count.get(site_id, 0) + 1
        if count > 1:  # the server refused its worker before: give it a moment, doubling each time
            time.sleep(min(2.0 ** (count - 1), 8.0))
        try:
            logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = get_run_logger()
        except MissingContextError:  # driven outside a flow run (tests, tools): the module's own logger
            logger = logging.getLogger(__name__)
        logger.warning("site %s: %s; starting its session again (restart %d)", site_id, reason, count)
        self.flow_runs[site_id] = self._start_session(site_id)
        self._site_started_at[site_id] = time.monotonic()
        self.watch.forget(site_id)

    def close(self) -> None:
        seq = self.exchange.next_seq()
        self.exchange.post(Request(self.ctx.job_id, seq, "stop", ()))

    def rest(self) -> None:
        """Stop the sessions while the job waits for its approvers (possibly for days, beyond any
        session's idle allowance); the next request starts new ones, on the same pools."""
        self.close()
        self.resting = True

    def _wake(self, site_ids: Sequence[str]) -> None:
        """New sessions after a rest, started once the request they are for is posted: a session
        starts at the newest request, which must not be the ``stop`` that ended the last ones."""
        self.resting = False
        self._beats_since = time.time()  # the stopped sessions' last beats say nothing of the new ones
        for site_id in site_ids:
            self._site_started_at.pop(site_id, None)
            self.restart_count.pop(site_id, None)
            self.restarts.pop(site_id, None)
            self.watch.forget(site_id)
        self.start(site_ids)

    def _dispatch(
        self,
        kind: str,
        site_ids: Sequence[str],
        weights: Weights | None = None,
        server_round: int = 0,
        secagg: SecAggRound | None = None,
        dropped: Collection[str] = (),
        files: Mapping[str, bytes] | None = None,
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
        request = self.exchange.post(request, weights, files)
        if self.resting:
            self._wake(site_ids)
        posted = time.monotonic()
        replies: dict[str, dict[str, Any] | SiteFailure] = {}
        while len(replies) < len(site_ids):
            waiting = [s for s in site_ids if s not in replies]
            for site_id in waiting:
                reply = self.exchange.read_reply(request.seq, site_id)
                if reply is not None:
                    replies[site_id] = _failure(site_id, reply) or reply
            silent = {s: self.exchange.silent_for(s, self._beats_since) for s in site_ids if s not in replies}
            self.watch.refresh([s for s, silent_s in silent.items() if silent_s is None or silent_s > GONE_AFTER_S])
            now = time.monotonic()
            for site_id, silent_s in silent.items():
                signals = Signals(
                    self.watch.state(site_id), silent_s, self.watch.live_worker(site_id), self.watch.message(site_id)
                )
                since_start = now - self._site_started_at.get(site_id, self._started_at)
                give_up = judge(signals, since_start, now - posted, self.allowances)
                if give_up is None:
                    continue
                done = self.restart_count.get(site_id, 0)
                if restart_session(give_up, signals, done, since_start, self.allowances):
                    self._restart(site_id, give_up.reason)
                    continue
                first = self.restarts.get(site_id)
                after = "one restart" if done == 1 else f"{done} restarts"
                reason = give_up.reason if first is None else f"{give_up.reason}, after {after} (first: {first})"
                replies[site_id] = _silent(site_id, reason)
            if len(replies) < len(site_ids):
                time.sleep(max(POLL_S, self.exchange.store.poll_s))
        return replies

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
        return self._decode(self._dispatch("preprocess", site_ids), lambda _, r: wire.decode_fingerprint(r))

    def train(
        self, site_ids: Sequence[str], weights: Weights, server_round: int, secagg: SecAggRound | None = None
    ) -> dict[str, Reply]:
        def decode(site_id: str, data: dict[str, Any]) -> SiteUpdate | MaskedUpdate:
            reply = wire.decode_train_reply(data)
            if reply.job_id != self.ctx.job_id:
                raise ReplyRejected(f"reply is for job {reply.job_id!r}, not {self.ctx.job_id}")
            arrays = self.exchange.reply_weights(reply.weights_key, reply.weights_sha256)
            site, examples, loss = reply.site_id, reply.num_examples, reply.train_loss
            if secagg is None:
                return SiteUpdate(site, reply.server_round, arrays, examples, loss, reply.train_s)
            if not reply.masked or len(arrays) != 1:
                raise ReplyRejected("secure aggregation is on but the reply is not one masked vector")
            return MaskedUpdate(site, reply.server_round, arrays[0], examples, loss, reply.train_s)

        unshared = () if secagg is None else secagg.unshared
        return self._decode(self._dispatch("train", site_ids, weights, server_round, secagg, unshared), decode)

    def keys(self, site_ids: Sequence[str], job_id: str, server_round: int) -> dict[str, bytes | SiteFailure]:
        replies = self._dispatch("keys", site_ids, server_round=server_round)
        return self._decode(replies, lambda _, r: wire.decode_public_key(r))

    def share(
        self, site_ids: Sequence[str], secagg: SecAggRound, server_round: int
    ) -> dict[str, dict[str, bytes] | SiteFailure]:
        replies = self._dispatch("share", site_ids, server_round=server_round, secagg=secagg)
        return self._decode(replies, lambda _, r: wire.decode_shares(r))

    def reveal(
        self, site_ids: Sequence[str], secagg: SecAggRound, server_round: int, dropped: Collection[str]
    ) -> dict[str, dict[str, bytes] | SiteFailure]:
        replies = self._dispatch("reveal", site_ids, server_round=server_round, secagg=secagg, dropped=dropped)
        return self._decode(replies, lambda _, r: wire.decode_shares(r))

    def evaluate(self, site_ids: Sequence[str], weights: Weights) -> dict[str, SiteEvaluation | SiteFailure]:
        return self._decode(self._dispatch("evaluate", site_ids, weights), lambda _, r: wire.decode_evaluation(r))

    def compare_variants(
        self, site_ids: Sequence[str], weights: Weights, variants: Mapping[str, bytes]
    ) -> dict[str, dict[str, BinaryCounts] | SiteFailure]:
        """The variants go through the store with their sha256, which each site checks before loading them."""
        wanted = {"torch", *variants}

        def decode(site_id: str, data: dict[str, Any]) -> dict[str, BinaryCounts]:
            counts = wire.decode_variant_counts(data)
            if set(counts) != wanted:
                raise ReplyRejected(f"counts for {sorted(counts)}, asked for {sorted(wanted)}")
            return counts

        return self._decode(self._dispatch("variants", site_ids, weights, files=variants), decode)

    def monitor(self, site_ids: Sequence[str], champion: Weights | None) -> dict[str, Any]:
        return self._decode(self._dispatch("monitor", site_ids, champion), lambda _, r: wire.decode_drift(r))


def _failure(site_id: str, reply: dict[str, Any]) -> SiteFailure | None:
    try:
        failure = wire.decode_failure(reply)
    except ReplyRejected:
        return SiteFailure(site_id, ReplyRejected.headline, f"site {site_id} sent a malformed failure", "")
    return None if failure is None else SiteFailure(site_id, failure.headline, failure.message, failure.fix)


def _silent(site_id: str, reason: str) -> SiteFailure:
    return SiteFailure(
        site_id,
        "Site did not answer",
        f"site {site_id} did not answer: {reason}",
        f"start its worker: `quorum up`, or `prefect worker start --pool {site_pool(site_id)}` where its data is",
    )

"""A test harness for placement: an in-process runner whose sites differ in speed.

``SlowSitesRunner`` is the real ``LocalRunner`` plus a per-site delay added to each site's training:
the delay is added to the reply's ``train_s`` (what the sampler measures) and, with ``sleep=True``, the
round also waits for the slowest asked site's delay, as a round of sites training side by side waits
for its straggler. It lives under ``tests/`` on purpose: it is not part of the installed package, and
no configuration key reaches it, so a production config can never slow a site down by accident.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from quorum.configs.schema import FederationConfig
from quorum.flows.runners.local import LocalRunner, SecAggRound
from quorum.tasks.weights import Weights


class SlowSitesRunner(LocalRunner):
    def __init__(self, config: FederationConfig, delay_s: Mapping[str, float], *, sleep: bool = True) -> None:
        super().__init__(config)
        self.delay_s = dict(delay_s)
        self.sleep = sleep
        self.calls: list[tuple[str, tuple[str, ...]]] = []  # every request: its kind and the sites it went to

    def _delayed(self, replies: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for site_id, reply in replies.items():
            extra = self.delay_s.get(site_id, 0.0)
            out[site_id] = replace(reply, train_s=reply.train_s + extra) if hasattr(reply, "train_s") else reply
        if self.sleep and replies:
            time.sleep(max(self.delay_s.get(s, 0.0) for s in replies))
        return out

    def start(self, site_ids: Sequence[str]) -> None:
        self.calls.append(("start", tuple(site_ids)))

    def preprocess(self, site_ids: Sequence[str]) -> dict[str, Any]:
        self.calls.append(("preprocess", tuple(site_ids)))
        return super().preprocess(site_ids)

    def train(
        self, site_ids: Sequence[str], weights: Weights, server_round: int, secagg: SecAggRound | None = None
    ) -> dict[str, Any]:
        self.calls.append(("train", tuple(site_ids)))
        return self._delayed(super().train(site_ids, weights, server_round, secagg))

    def keys(self, site_ids: Sequence[str], job_id: str) -> dict[str, Any]:
        self.calls.append(("keys", tuple(site_ids)))
        return super().keys(site_ids, job_id)

    def reveal(self, site_ids: Sequence[str], secagg: SecAggRound, server_round: int, dropped: Any) -> dict[str, Any]:
        self.calls.append(("reveal", tuple(site_ids)))
        return super().reveal(site_ids, secagg, server_round, dropped)

    def evaluate(self, site_ids: Sequence[str], weights: Weights) -> dict[str, Any]:
        self.calls.append(("evaluate", tuple(site_ids)))
        return super().evaluate(site_ids, weights)

    def monitor(self, site_ids: Sequence[str], champion: Weights | None) -> dict[str, Any]:
        self.calls.append(("monitor", tuple(site_ids)))
        return super().monitor(site_ids, champion)

    def contacted(self) -> set[str]:
        return {s for _, sites in self.calls for s in sites}

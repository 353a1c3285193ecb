"""A whole SecAgg+ round in memory, driven step by step, with a dropout possible after each step.

The sites are the real :class:`SecAggSite` objects; the coordinator side is the real ``unmask_sum``
and ``checked_mean_delta``. Keys are fixed per site id, so the tests run offline and reproducibly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from quorum.tasks.secagg import Masked, RoundPlan, plan_round
from quorum.tasks.secagg_protocol import SecAggSite, checked_mean_delta, unmask_sum

JOB = "job-0001"


def fixed_site(site_id: str, job_id: str = JOB) -> SecAggSite:
    return SecAggSite(site_id, job_id, hashlib.sha256(f"quorum-test-{site_id}".encode()).digest())


@dataclass
class Round:
    """The coordinator's view of one round, filled in step by step."""

    sites: dict[str, SecAggSite]
    server_round: int = 3
    num_shares: int | None = None
    threshold: int | float | None = None
    keys: dict[str, bytes] = field(default_factory=dict)
    plan: RoundPlan | None = None
    shares: dict[str, dict[str, bytes]] = field(default_factory=dict)  # recipient -> sender -> ciphertext
    shared: list[str] = field(default_factory=list)
    masked: dict[str, Masked] = field(default_factory=dict)
    decisions: dict[str, dict[str, str]] = field(default_factory=dict)  # what each site revealed so far

    def advertise(self, gone: Collection[str] = ()) -> None:
        self.keys = {s: site.round_keys(self.server_round) for s, site in self.sites.items() if s not in gone}
        self.plan = plan_round(self.keys, JOB, self.server_round, self.num_shares, self.threshold)

    def share(self, gone: Collection[str] = ()) -> None:
        assert self.plan is not None
        for sender in sorted(self.keys):
            if sender in gone:
                continue
            for recipient, ciphertext in self.sites[sender].share_keys(self.server_round, self.keys, self.plan).items():
                self.shares.setdefault(recipient, {})[sender] = ciphertext
            self.shared.append(sender)

    def mask(self, vectors: Mapping[str, NDArray[np.float64]], weights: Mapping[str, int], gone: Collection[str] = ()):
        assert self.plan is not None
        unshared = sorted(set(self.keys) - set(self.shared))
        for s in self.shared:
            if s not in gone:
                self.masked[s] = self.sites[s].mask(
                    vectors[s], weights[s], self.server_round, self.keys, self.plan, unshared
                )

    def reveal(self, asked: Collection[str], dropped: Collection[str]) -> dict[str, dict[str, bytes]]:
        """Ask ``asked`` to unmask, calling ``dropped`` dropped; each site's answer (its decisions kept)."""
        assert self.plan is not None
        out: dict[str, dict[str, bytes]] = {}
        for s in sorted(asked):
            mine = {sender: c for sender, c in self.shares.get(s, {}).items() if sender in self.shared}
            out[s], self.decisions[s] = self.sites[s].reveal(
                self.server_round, self.keys, self.plan, dropped, mine, self.decisions.get(s, {})
            )
        return out

    def total(self, revealed: Mapping[str, Mapping[str, bytes]]) -> NDArray[np.float64]:
        assert self.plan is not None
        return unmask_sum(self.masked, self.keys, self.plan, self.shared, revealed, self.server_round, JOB)


def run_round(
    vectors: Mapping[str, NDArray[np.float64]],
    weights: Mapping[str, int],
    *,
    gone_after_keys: Collection[str] = (),
    gone_after_share: Collection[str] = (),
    gone_after_mask: Collection[str] = (),
    num_shares: int | None = None,
    threshold: int | float | None = None,
    clip_norm: float = 1e6,
) -> NDArray[np.float64]:
    """The weighted mean of the survivors' vectors through the whole protocol, with the given dropouts.

    ``gone_after_keys``: advertised keys, then gone; ``gone_after_share``: shared, never sent a masked
    vector; ``gone_after_mask``: sent its masked vector, then never answered the unmasking request.
    """
    rnd = Round({s: fixed_site(s) for s in vectors}, num_shares=num_shares, threshold=threshold)
    rnd.advertise()
    rnd.share(gone=gone_after_keys)
    rnd.mask(vectors, weights, gone=gone_after_share)
    survivors = sorted(rnd.masked)
    dropped = sorted(set(rnd.keys) - set(survivors))
    revealed = rnd.reveal([s for s in survivors if s not in gone_after_mask], dropped)
    total = rnd.total(revealed)
    return checked_mean_delta(total, float(sum(weights[s] for s in survivors)), clip_norm, len(survivors))


def plain_mean(
    vectors: Mapping[str, NDArray[np.float64]], weights: Mapping[str, int], sites: Collection[str]
) -> NDArray[np.float64]:
    total = sum(weights[s] for s in sites)
    return np.asarray(sum(vectors[s] * weights[s] for s in sites) / total, dtype=np.float64)

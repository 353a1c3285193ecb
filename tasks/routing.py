"""Traffic policy at a site's service, as pure functions over counters.

Canary routing is deterministic: request ``n`` goes to the candidate when the fractional part of
``n * φ`` falls below the share, a low-discrepancy sequence whose running share stays within a
request or two of the configured percentage, with no random state to seed or share between
threads. Shadow scoring keeps only counts: how many rows both models scored and on how many their
0/1 decisions agreed (never a row, a score or a decision per request).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from numpy.typing import NDArray

Route = Literal["champion", "candidate"]
_PHI = 0.6180339887498949  # the golden ratio's fractional part


def route_request(sequence: int, mode: str, canary_percent: float, candidate_ready: bool) -> Route:
    """Which model answers request number ``sequence`` (0, 1, 2, ...) under the site's policy."""
    if mode != "canary" or not candidate_ready:
        return "champion"
    return "candidate" if (sequence * _PHI) % 1.0 < canary_percent / 100.0 else "champion"


def agreements(champion: NDArray[np.floating], candidate: NDArray[np.floating], threshold: float = 0.5) -> int:
    """On how many rows the two models take the same 0/1 decision."""
    return int(np.sum((np.asarray(champion) >= threshold) == (np.asarray(candidate) >= threshold)))


@dataclass(frozen=True)
class RoutingCounts:
    """What a site's service reports about its traffic: counts only, summable across restarts."""

    champion_requests: int = 0
    champion_rows: int = 0
    candidate_requests: int = 0
    candidate_rows: int = 0
    shadow_rows: int = 0
    shadow_agreements: int = 0
    refused_requests: int = 0

    def answered(self, route: Route, rows: int) -> RoutingCounts:
        if route == "candidate":
            return replace(
                self, candidate_requests=self.candidate_requests + 1, candidate_rows=self.candidate_rows + rows
            )
        return replace(self, champion_requests=self.champion_requests + 1, champion_rows=self.champion_rows + rows)

    def shadowed(self, rows: int, agreed: int) -> RoutingCounts:
        return replace(self, shadow_rows=self.shadow_rows + rows, shadow_agreements=self.shadow_agreements + agreed)

    def refused(self) -> RoutingCounts:
        return replace(self, refused_requests=self.refused_requests + 1)

    @property
    def shadow_agreement_rate(self) -> float | None:
        """Share of shadow-scored rows where candidate and champion decided alike; None before any."""
        return self.shadow_agreements / self.shadow_rows if self.shadow_rows else None

    @property
    def candidate_share(self) -> float | None:
        total = self.champion_requests + self.candidate_requests
        return self.candidate_requests / total if total else None

    def to_dict(self) -> dict[str, object]:
        return {
            "champion_requests": self.champion_requests,
            "champion_rows": self.champion_rows,
            "candidate_requests": self.candidate_requests,
            "candidate_rows": self.candidate_rows,
            "shadow_rows": self.shadow_rows,
            "shadow_agreements": self.shadow_agreements,
            "refused_requests": self.refused_requests,
            "shadow_agreement_rate": self.shadow_agreement_rate,
            "candidate_share": self.candidate_share,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> RoutingCounts:
        fields = (
            "champion_requests",
            "champion_rows",
            "candidate_requests",
            "candidate_rows",
            "shadow_rows",
            "shadow_agreements",
            "refused_requests",
        )
        return cls(**{name: int(data.get(name, 0)) for name in fields})  # type: ignore[call-overload]

"""The federated evaluation of one model: what each site reported, merged exactly.

Gates read this object only, so deciding never needs a site, a file or a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from quorum.evaluation.metrics import BinaryCounts, merge, recall, selection_rate, summarize


@dataclass(frozen=True)
class SiteEvaluation:
    """One site's shareable result: counts overall and per protected group."""

    site_id: str
    overall: BinaryCounts
    groups: Mapping[str, BinaryCounts]


@dataclass(frozen=True)
class EvaluationReport:
    """A model evaluated on every participating site's held-out data."""

    sites: tuple[SiteEvaluation, ...]
    contracts_passed: Mapping[str, bool]

    @property
    def pooled(self) -> BinaryCounts:
        return merge(site.overall for site in self.sites)

    @property
    def metrics(self) -> dict[str, float]:
        return summarize(self.pooled)

    def site_metrics(self) -> dict[str, dict[str, float]]:
        return {site.site_id: summarize(site.overall) for site in self.sites}

    def group_counts(self, sites: Sequence[SiteEvaluation] | None = None) -> dict[str, BinaryCounts]:
        merged: dict[str, BinaryCounts] = {}
        for site in self.sites if sites is None else sites:
            for name, counts in site.groups.items():
                merged[name] = merged.get(name, BinaryCounts()) + counts
        return merged

    @property
    def examples(self) -> int:
        return self.pooled.n


def fairness_gaps(groups: Mapping[str, BinaryCounts], min_group_size: int = 1) -> dict[str, float]:
    """Largest difference across groups in selection rate and true-positive rate.

    Groups smaller than ``min_group_size`` are left out: a rate over three people is noise.
    """
    usable = {name: c for name, c in groups.items() if c.n >= min_group_size}
    if len(usable) < 2:
        return {"selection_rate_gap": 0.0, "tpr_gap": 0.0}
    rates = [selection_rate(c) for c in usable.values()]
    tprs = [recall(c) for c in usable.values() if c.tp + c.fn > 0]
    return {
        "selection_rate_gap": max(rates) - min(rates),
        "tpr_gap": (max(tprs) - min(tprs)) if len(tprs) >= 2 else 0.0,
    }

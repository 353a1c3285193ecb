"""Pass/fail decisions over a federated evaluation: pure, explicit and auditable.

``decide`` only reads numbers and returns a ``Verdict`` listing every gate with its measured value,
its bound and the outcome. Applying a verdict (promotion, tags, audit) happens elsewhere.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from quorum.configs.schema import GatePolicy
from quorum.evaluation.metrics import BinaryCounts, accuracy, auc
from quorum.evaluation.report import EvaluationReport, SiteEvaluation, fairness_gaps

_FAILED_RELATION = {">=": "<", "<=": ">"}
_TAG_CHARS = 500  # a reason is one line; MLflow limits tag values
_TAG_UNSAFE = re.compile(r"[^\w.\-]+")


def _number(value: float) -> str:
    """Counts print as integers, rates with four decimals: what a reviewer reads in a tag or a table."""
    if math.isfinite(value) and value == int(value) and (abs(value) >= 1 or value == 0):
        return str(int(value))
    return f"{value:.4f}"


@dataclass(frozen=True)
class GateResult:
    name: str
    value: float
    bound: float
    passed: bool
    reason: str
    relation: str = ""  # what passing requires: ">=" (a floor) or "<=" (a ceiling)

    def summary(self) -> str:
        """``pass 0.8100 >= 0.7000`` / ``FAIL 0.5500 < 0.6000``: the outcome with the numbers that decided it."""
        outcome = "pass" if self.passed else "FAIL"
        if not self.relation:
            return f"{outcome} {_number(self.value)} (bound {_number(self.bound)})"
        relation = self.relation if self.passed else _FAILED_RELATION.get(self.relation, self.relation)
        return f"{outcome} {_number(self.value)} {relation} {_number(self.bound)}"

    def to_dict(self) -> dict[str, object]:
        # An undefined metric (AUC of one class) is stored as null: JSON, the audit log and MLflow reject NaN.
        return {
            "name": self.name,
            "value": None if math.isnan(self.value) else self.value,
            "bound": self.bound,
            "relation": self.relation,
            "passed": self.passed,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Coverage:
    """Which of the configured sites trained the candidate, and why each other one did not."""

    configured: tuple[str, ...]
    excluded: tuple[tuple[str, str], ...]  # (site, reason) for every configured site that did not train

    @classmethod
    def of(cls, configured: tuple[str, ...], excluded: Mapping[str, str]) -> Coverage:
        return cls(configured, tuple((s, excluded[s]) for s in configured if s in excluded))

    @property
    def trained(self) -> tuple[str, ...]:
        left_out = {site for site, _ in self.excluded}
        return tuple(site for site in self.configured if site not in left_out)

    @property
    def fraction(self) -> float:
        return len(self.trained) / len(self.configured) if self.configured else 0.0


@dataclass(frozen=True)
class Verdict:
    passed: bool
    gates: tuple[GateResult, ...]
    excluded: tuple[tuple[str, str], ...] = ()  # configured sites that did not train the candidate, with why

    @property
    def failed(self) -> tuple[GateResult, ...]:
        return tuple(g for g in self.gates if not g.passed)

    def headline(self) -> str:
        if self.passed:
            return f"passed all {len(self.gates)} gates"
        return "failed: " + "; ".join(g.reason for g in self.failed)

    def describe_failures(self) -> str:
        """One line per failed gate, each naming its measured value and bound (the CLI shows this)."""
        return "\n".join(f"  - {g.name}: {g.summary()} ({g.reason})" for g in self.failed)

    def describe_excluded(self) -> str:
        """One line per configured site that did not train the candidate, with the reason."""
        return "\n".join(f"  - {site}: {reason}" for site, reason in self.excluded)

    def tags(self) -> dict[str, str]:
        """The verdict as model-version tags: ``gate.<name>`` = ``pass 0.81 >= 0.70`` for every gate.

        MLflow tag keys allow letters, digits and ``_ - . / : space``, so ``worst_site_accuracy[b]``
        becomes ``gate.worst_site_accuracy.b``.
        """
        tags = {"gate." + _TAG_UNSAFE.sub(".", g.name).strip("."): g.summary() for g in self.gates}
        tags.update({"excluded." + _TAG_UNSAFE.sub(".", site): reason[:_TAG_CHARS] for site, reason in self.excluded})
        return tags

    def to_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "gates": [g.to_dict() for g in self.gates],
            "excluded_sites": dict(self.excluded),
        }

    def to_markdown(self) -> str:
        rows = ["| gate | value | bound | result |", "|---|---|---|---|"]
        rows += [f"| {g.name} | {g.value:.4f} | {g.bound:.4f} | {'pass' if g.passed else 'FAIL'} |" for g in self.gates]
        text = f"# Verdict: {'PASSED' if self.passed else 'FAILED'}\n\n" + "\n".join(rows) + "\n"
        if self.excluded:
            text += "\n## Sites that did not train the candidate\n\n" + self.describe_excluded() + "\n"
        return text


def _at_least(name: str, value: float, bound: float) -> GateResult:
    ok = not math.isnan(value) and value >= bound
    relation = ">=" if ok else "<"
    return GateResult(name, value, bound, ok, f"{name} {value:.4f} {relation} {bound:.4f}", ">=")


def _at_most(name: str, value: float, bound: float) -> GateResult:
    ok = not math.isnan(value) and value <= bound
    relation = "<=" if ok else ">"
    return GateResult(name, value, bound, ok, f"{name} {value:.4f} {relation} {bound:.4f}", "<=")


def _quality_gates(candidate: EvaluationReport, policy: GatePolicy) -> list[GateResult]:
    metrics = candidate.metrics
    floors: list[tuple[str, float | None]] = [
        ("accuracy", policy.min_accuracy),
        ("auc", policy.min_auc),
        ("f1", policy.min_f1),
    ]
    ceilings: list[tuple[str, float | None]] = [
        ("log_loss", policy.max_log_loss),
        ("calibration_error", policy.max_calibration_error),
    ]
    gates = [_at_least(name, metrics[name], bound) for name, bound in floors if bound is not None]
    gates += [_at_most(name, metrics[name], bound) for name, bound in ceilings if bound is not None]
    return gates


def _worst_site_gate(candidate: EvaluationReport, policy: GatePolicy) -> list[GateResult]:
    if policy.min_site_accuracy is None or not candidate.sites:
        return []
    worst = min(candidate.sites, key=lambda s: accuracy(s.overall))
    gate = _at_least(f"worst_site_accuracy[{worst.site_id}]", accuracy(worst.overall), policy.min_site_accuracy)
    return [gate]


def _regression_gate(
    candidate: EvaluationReport, champion: EvaluationReport | None, policy: GatePolicy
) -> list[GateResult]:
    if champion is None or policy.max_regression is None:
        return []
    drop = champion.metrics["auc"] - candidate.metrics["auc"]
    return [_at_most("auc_drop_vs_champion", drop, policy.max_regression)]


_SITE_METRICS: dict[str, Callable[[BinaryCounts], float]] = {"auc": auc, "accuracy": accuracy}


def _site_regression_gate(
    candidate: EvaluationReport, champion: EvaluationReport | None, policy: GatePolicy
) -> list[GateResult]:
    """No site may lose more than the margin against the champion on that same site's data.

    A pooled gain can hide a site that got much worse (the pooled metric is dominated by large
    sites). Sites without a defined value for both models (a test split of one class has no AUC)
    cannot be compared and are left out; the gate is reported for the site that lost the most.
    """
    if champion is None or policy.max_site_regression is None:
        return []
    metric = _SITE_METRICS[policy.site_regression_metric]
    before = {site.site_id: metric(site.overall) for site in champion.sites}
    drops = {
        site.site_id: before[site.site_id] - metric(site.overall)
        for site in candidate.sites
        if site.site_id in before and not math.isnan(before[site.site_id]) and not math.isnan(metric(site.overall))
    }
    if not drops:
        return []
    worst = max(sorted(drops), key=lambda site_id: drops[site_id])
    name = f"site_{policy.site_regression_metric}_drop_vs_champion[{worst}]"
    return [_at_most(name, drops[worst], policy.max_site_regression)]


def _gap_gates(suffix: str, groups: dict[str, BinaryCounts], policy: GatePolicy) -> list[GateResult]:
    gaps = fairness_gaps(groups, policy.min_group_size)
    bounds: list[tuple[str, float | None]] = [
        ("selection_rate_gap", policy.max_selection_rate_gap),
        ("tpr_gap", policy.max_tpr_gap),
    ]
    return [_at_most(f"{key}{suffix}", gaps[key], bound) for key, bound in bounds if bound is not None]


def _fairness_gates(candidate: EvaluationReport, policy: GatePolicy) -> list[GateResult]:
    """Gaps across protected groups pooled over all sites and, with ``fairness_per_site``, at each site.

    Pooling can hide a gap that only one site's population shows, or cancel opposite gaps at two
    sites. A site where fewer than two groups reach ``min_group_size`` has no per-site gate: a rate
    over a handful of people says nothing. Such a small group is not even named by its site (its name
    is a raw value), so the pooled gate judges a group over the sites where it reaches that size.
    """
    gates = _gap_gates("", candidate.group_counts(), policy)
    if policy.fairness_per_site:
        for site in candidate.sites:
            if _usable_groups(site, policy.min_group_size) >= 2:
                gates += _gap_gates(f"[{site.site_id}]", candidate.group_counts([site]), policy)
    return gates


def _usable_groups(site: SiteEvaluation, min_group_size: int) -> int:
    return sum(counts.n >= min_group_size for counts in site.groups.values())


def _data_gates(candidate: EvaluationReport, policy: GatePolicy) -> list[GateResult]:
    failed_contracts = sorted(site for site, ok in candidate.contracts_passed.items() if not ok)
    contract = GateResult(
        "data_contracts",
        float(len(failed_contracts)),
        0.0,
        not failed_contracts,
        "every site passed its data contract"
        if not failed_contracts
        else f"data contract failed at {', '.join(failed_contracts)}",
        "<=",
    )
    return [
        contract,
        _at_least("sites", float(len(candidate.sites)), float(policy.min_sites)),
        _at_least("examples", float(candidate.examples), float(policy.min_examples)),
    ]


_GATE_GROUPS: tuple[Callable[[EvaluationReport, GatePolicy], list[GateResult]], ...] = (
    _data_gates,
    _quality_gates,
    _worst_site_gate,
    _fairness_gates,
)


def _coverage_gate(coverage: Coverage, policy: GatePolicy) -> GateResult:
    """Enough of the federation trained the candidate: a model from 2 of 8 sites speaks for 2 sites."""
    trained, configured = len(coverage.trained), len(coverage.configured)
    ok = coverage.fraction >= policy.min_site_fraction
    relation = ">=" if ok else "<"
    left_out = ", ".join(site for site, _ in coverage.excluded)
    reason = (
        f"site_coverage {coverage.fraction:.4f} {relation} {policy.min_site_fraction:.4f}: "
        f"{trained} of {configured} configured sites trained the candidate" + (f" (not {left_out})" if left_out else "")
    )
    return GateResult("site_coverage", coverage.fraction, policy.min_site_fraction, ok, reason, ">=")


def decide(
    candidate: EvaluationReport,
    champion: EvaluationReport | None,
    policy: GatePolicy,
    coverage: Coverage | None = None,
) -> Verdict:
    """Apply every configured gate; the champion, when given, was evaluated on the same site data.

    ``coverage`` says which configured sites trained the candidate; with it, the ``site_coverage``
    gate holds the share to ``policy.min_site_fraction`` and the verdict lists the sites left out.
    """
    gates = [] if coverage is None else [_coverage_gate(coverage, policy)]
    gates += [gate for group in _GATE_GROUPS for gate in group(candidate, policy)]
    gates += _regression_gate(candidate, champion, policy)
    gates += _site_regression_gate(candidate, champion, policy)
    excluded = () if coverage is None else coverage.excluded
    return Verdict(passed=all(g.passed for g in gates), gates=tuple(gates), excluded=excluded)

"""Pass/fail decisions over a federated evaluation: pure, explicit and auditable.

``decide`` only reads numbers and returns a ``Verdict`` listing every gate with its measured value,
its bound and the outcome. Applying a verdict (promotion, tags, audit) happens elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from configs.schema import GatePolicy
from evaluation.metrics import accuracy
from evaluation.report import EvaluationReport, fairness_gaps

MIN_GROUP_SIZE = 20


@dataclass(frozen=True)
class GateResult:
    name: str
    value: float
    bound: float
    passed: bool
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "value": self.value,
            "bound": self.bound,
            "passed": self.passed,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Verdict:
    passed: bool
    gates: tuple[GateResult, ...]

    @property
    def failed(self) -> tuple[GateResult, ...]:
        return tuple(g for g in self.gates if not g.passed)

    def headline(self) -> str:
        if self.passed:
            return f"passed all {len(self.gates)} gates"
        return "failed: " + "; ".join(g.reason for g in self.failed)

    def to_dict(self) -> dict[str, object]:
        return {"passed": self.passed, "gates": [g.to_dict() for g in self.gates]}

    def to_markdown(self) -> str:
        rows = ["| gate | value | bound | result |", "|---|---|---|---|"]
        rows += [f"| {g.name} | {g.value:.4f} | {g.bound:.4f} | {'pass' if g.passed else 'FAIL'} |" for g in self.gates]
        return f"# Verdict: {'PASSED' if self.passed else 'FAILED'}\n\n" + "\n".join(rows) + "\n"


def _at_least(name: str, value: float, bound: float) -> GateResult:
    ok = not math.isnan(value) and value >= bound
    relation = ">=" if ok else "<"
    return GateResult(name, value, bound, ok, f"{name} {value:.4f} {relation} {bound:.4f}")


def _at_most(name: str, value: float, bound: float) -> GateResult:
    ok = not math.isnan(value) and value <= bound
    relation = "<=" if ok else ">"
    return GateResult(name, value, bound, ok, f"{name} {value:.4f} {relation} {bound:.4f}")


def _quality_gates(candidate: EvaluationReport, policy: GatePolicy) -> list[GateResult]:
    metrics = candidate.metrics
    floors: list[tuple[str, float | None]] = [
        ("accuracy", policy.min_accuracy),
        ("auc", policy.min_auc),
        ("f1", policy.min_f1),
    ]
    gates = [_at_least(name, metrics[name], bound) for name, bound in floors if bound is not None]
    if policy.max_log_loss is not None:
        gates.append(_at_most("log_loss", metrics["log_loss"], policy.max_log_loss))
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


def _fairness_gates(candidate: EvaluationReport, policy: GatePolicy) -> list[GateResult]:
    gaps = fairness_gaps(candidate.group_counts(), MIN_GROUP_SIZE)
    bounds: list[tuple[str, str, float | None]] = [
        ("selection_rate_gap", "selection_rate_gap", policy.max_selection_rate_gap),
        ("tpr_gap", "tpr_gap", policy.max_tpr_gap),
    ]
    return [_at_most(name, gaps[key], bound) for name, key, bound in bounds if bound is not None]


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


def decide(candidate: EvaluationReport, champion: EvaluationReport | None, policy: GatePolicy) -> Verdict:
    """Apply every configured gate; the champion, when given, was evaluated on the same site data."""
    gates = [gate for group in _GATE_GROUPS for gate in group(candidate, policy)]
    gates += _regression_gate(candidate, champion, policy)
    return Verdict(passed=all(g.passed for g in gates), gates=tuple(gates))

"""A verdict as one self-contained HTML page a reviewer can open from MLflow: every gate, every site.

The page carries its per-site chart as inline SVG, so it is a single artifact that renders offline
and cannot lose its picture. Rendering is pure (numbers in, text out); logging it is the evaluate
flow's job.
"""

from __future__ import annotations

import html
import math

from quorum.configs.schema import GatePolicy
from quorum.evaluation.gates import Verdict
from quorum.evaluation.report import EvaluationReport

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child, td.reason { text-align: left; }
tr.fail td { background: #fde2e2; }
.passed { color: #1a7f37; } .failed { color: #cf222e; }
"""


_BAR_COLOURS = {"accuracy": "#4878d0", "auc": "#ee854a"}
_FLOOR_COLOURS = {"site accuracy floor": "#1f3d7a", "AUC floor": "#a4501c"}
_OUTLINE = "fill='none' stroke='#333' stroke-dasharray='4 3'"
_PLOT_H = 240.0  # pixels from 0 to 1 on the value axis
_TOP, _LEFT, _SLOT, _BAR = 20.0, 50.0, 90.0, 30.0


def site_chart_svg(candidate: EvaluationReport, policy: GatePolicy, champion: EvaluationReport | None = None) -> str:
    """Per-site accuracy and AUC as bars, the champion's as dashed outlines, the configured floors as lines.

    Plain SVG text: it renders in any browser, offline, inside the one HTML file, and costs no plotting
    library (matplotlib took seconds to import and draw on every evaluation).
    """
    sites = candidate.site_metrics()
    before = champion.site_metrics() if champion is not None else {}
    width = _LEFT + _SLOT * max(len(sites), 1) + 220.0
    height = _TOP + _PLOT_H + 40.0
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
        "role='img' aria-label='per-site accuracy and AUC against the floors' font-size='12'>",
        f"<line x1='{_LEFT}' y1='{_TOP}' x2='{_LEFT}' y2='{_y(0.0)}' stroke='#333'/>",
        f"<line x1='{_LEFT}' y1='{_y(0.0)}' x2='{width - 220.0:.1f}' y2='{_y(0.0)}' stroke='#333'/>",
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f"<text x='{_LEFT - 6}' y='{_y(tick) + 4:.1f}' text-anchor='end'>{tick:.2f}</text>")
    for index, (site_id, metrics) in enumerate(sites.items()):
        centre = _LEFT + _SLOT * (index + 0.5)
        for offset, metric in ((-_BAR / 2, "accuracy"), (_BAR / 2, "auc")):
            value = _plottable(metrics[metric])
            parts.append(_bar(centre + offset, value, f"class='{metric}' fill='{_BAR_COLOURS[metric]}'"))
            if before:
                old = _plottable(before.get(site_id, {}).get(metric, math.nan))
                parts.append(_bar(centre + offset, old, f"class='champion' {_OUTLINE}"))
        parts.append(
            f"<text x='{centre:.1f}' y='{_y(0.0) + 16:.1f}' text-anchor='middle'>{html.escape(site_id)}</text>"
        )
    legend = [(f"{metric} (candidate)", f"fill='{colour}'") for metric, colour in _BAR_COLOURS.items()]
    if before:
        legend.append(("champion (outline)", _OUTLINE))
    for label, floor in (("site accuracy floor", policy.min_site_accuracy), ("AUC floor", policy.min_auc)):
        if floor is not None:
            colour = _FLOOR_COLOURS[label]
            parts.append(
                f"<line class='floor' x1='{_LEFT}' y1='{_y(floor):.1f}' x2='{width - 220.0:.1f}' y2='{_y(floor):.1f}' "
                f"stroke='{colour}' stroke-width='1.5' stroke-dasharray='2 3'/>"
            )
            legend.append((f"{label} {floor:.2f}", f"fill='{colour}'"))
    for row, (label, style) in enumerate(legend):
        y = _TOP + 18.0 * row
        parts.append(f"<rect x='{width - 210.0:.1f}' y='{y:.1f}' width='12' height='12' {style}/>")
        parts.append(f"<text x='{width - 192.0:.1f}' y='{y + 10:.1f}'>{html.escape(label)}</text>")
    parts.append("</svg>")
    return "\n".join(parts)


def _y(value: float) -> float:
    return _TOP + _PLOT_H * (1.0 - value)


def _bar(centre: float, value: float, style: str) -> str:
    return (
        f"<rect x='{centre - _BAR / 2:.1f}' y='{_y(value):.1f}' width='{_BAR:.1f}' "
        f"height='{_PLOT_H * value:.1f}' {style}/>"
    )


def _plottable(value: float) -> float:
    """An undefined metric (AUC of one class) is drawn as no bar rather than breaking the chart."""
    return 0.0 if math.isnan(value) else value


def verdict_html(
    verdict: Verdict,
    candidate: EvaluationReport,
    policy: GatePolicy,
    champion: EvaluationReport | None = None,
    title: str = "Evaluation verdict",
) -> str:
    """The verdict page: outcome, the gates table, per-site metrics and the per-site chart."""
    outcome = "PASSED" if verdict.passed else "FAILED"
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}: <span class='{outcome.lower()}'>{outcome}</span></h1>",
        f"<p>{html.escape(verdict.headline())}</p>",
        "<h2>Gates</h2>",
        _gates_table(verdict),
        "<h2>Sites</h2>",
        _sites_table(candidate, champion),
        site_chart_svg(candidate, policy, champion),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _gates_table(verdict: Verdict) -> str:
    rows = ["<table><tr><th>gate</th><th>value</th><th>requires</th><th>bound</th><th>result</th><th>reason</th></tr>"]
    for gate in verdict.gates:
        rows.append(
            f"<tr class='{'pass' if gate.passed else 'fail'}'><td>{html.escape(gate.name)}</td>"
            f"<td>{gate.value:.4f}</td><td>{html.escape(gate.relation)}</td><td>{gate.bound:.4f}</td>"
            f"<td>{'pass' if gate.passed else 'FAIL'}</td><td class='reason'>{html.escape(gate.reason)}</td></tr>"
        )
    return "\n".join([*rows, "</table>"])


def _sites_table(candidate: EvaluationReport, champion: EvaluationReport | None) -> str:
    columns = ("examples", "accuracy", "auc", "f1", "log_loss", "calibration_error", "selection_rate")
    before = champion.site_metrics() if champion is not None else {}
    header = "".join(f"<th>{name}</th>" for name in columns)
    extra = "<th>champion accuracy</th><th>champion auc</th>" if before else ""
    rows = [f"<table><tr><th>site</th>{header}{extra}</tr>"]
    for site_id, metrics in candidate.site_metrics().items():
        cells = "".join(f"<td>{_cell(name, metrics[name])}</td>" for name in columns)
        if before:
            old = before.get(site_id, {})
            cells += "".join(f"<td>{_cell(name, old.get(name, math.nan))}</td>" for name in ("accuracy", "auc"))
        rows.append(f"<tr><td>{html.escape(site_id)}</td>{cells}</tr>")
    return "\n".join([*rows, "</table>"])


def _cell(name: str, value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return str(int(value)) if name == "examples" else f"{value:.4f}"

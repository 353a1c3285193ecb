"""A verdict as one self-contained HTML page a reviewer can open from MLflow: every gate, every site.

The page carries its per-site chart as a base64 PNG, so it is a single artifact that renders
offline and cannot lose its picture. Rendering is pure (numbers in, text out); logging it is the
evaluate flow's job. matplotlib is imported only here, and only when a page is rendered.
"""

from __future__ import annotations

import base64
import html
import io
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


def site_chart_png(candidate: EvaluationReport, policy: GatePolicy, champion: EvaluationReport | None = None) -> bytes:
    """Per-site accuracy and AUC as bars, the champion's as outlines, the configured floors as lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sites = candidate.site_metrics()
    names = list(sites)
    before = champion.site_metrics() if champion is not None else {}
    figure = Figure(figsize=(max(6.0, 1.4 * len(names) + 4.0), 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.38
    for offset, metric, colour in ((-width / 2, "accuracy", "#4878d0"), (width / 2, "auc", "#ee854a")):
        xs = [i + offset for i in range(len(names))]
        values = [_plottable(sites[name][metric]) for name in names]
        axes.bar(xs, values, width, label=f"{metric} (candidate)", color=colour)
        if before:
            previous = [_plottable(before.get(name, {}).get(metric, math.nan)) for name in names]
            label = "champion (outline)" if metric == "accuracy" else None
            axes.bar(xs, previous, width, fill=False, edgecolor="#333", linestyle="--", label=label)
    floors = [("site accuracy floor", policy.min_site_accuracy, "#1f3d7a"), ("AUC floor", policy.min_auc, "#a4501c")]
    for label, floor, colour in floors:
        if floor is not None:
            axes.axhline(floor, color=colour, linestyle=":", linewidth=1.5, label=f"{label} {floor:.2f}")
    axes.set_xticks(range(len(names)), names)
    axes.set_ylim(0.0, 1.05)
    axes.set_ylabel("metric on the site's test split")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


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
    chart = base64.b64encode(site_chart_png(candidate, policy, champion)).decode("ascii")
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}: <span class='{outcome.lower()}'>{outcome}</span></h1>",
        f"<p>{html.escape(verdict.headline())}</p>",
        "<h2>Gates</h2>",
        _gates_table(verdict),
        "<h2>Sites</h2>",
        _sites_table(candidate, champion),
        f"<img alt='per-site accuracy and AUC against the floors' src='data:image/png;base64,{chart}'>",
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

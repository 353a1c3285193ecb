"""The verdict a reviewer reads: the HTML page with its chart, the MLflow artifacts, and the CLI on failure."""

from __future__ import annotations

import re
from pathlib import Path
from xml.etree import ElementTree

import pytest

from quorum.cli.main import main
from quorum.configs.schema import GatePolicy, load_federation
from quorum.evaluation.gates import decide
from quorum.evaluation.report import EvaluationReport, SiteEvaluation
from quorum.evaluation.verdict_report import site_chart_svg, verdict_html
from quorum.lineage.state import StateLayout
from tests.federation import write_federation, write_governance
from tests.test_metrics_gates import BETTER_CHAMPION, GOOD, POLICY, counts


def test_chart_draws_each_site_metric_the_champion_and_the_floors() -> None:
    chart = ElementTree.fromstring(site_chart_svg(GOOD, POLICY, BETTER_CHAMPION))
    shapes = [*chart.iter("{http://www.w3.org/2000/svg}rect"), *chart.iter("{http://www.w3.org/2000/svg}line")]
    labels = [text.text for text in chart.iter("{http://www.w3.org/2000/svg}text")]

    def heights(kind: str) -> list[float]:
        return sorted(float(shape.get("height", "nan")) for shape in shapes if shape.get("class") == kind)

    sites, champion = GOOD.site_metrics(), BETTER_CHAMPION.site_metrics()
    assert heights("accuracy") == sorted(round(240 * sites[s]["accuracy"], 1) for s in sites)
    assert heights("auc") == sorted(round(240 * sites[s]["auc"], 1) for s in sites)
    assert heights("champion") == sorted(round(240 * champion[s][m], 1) for s in sites for m in ("accuracy", "auc"))
    assert len([shape for shape in shapes if shape.get("class") == "floor"]) == 2
    assert set(sites) <= set(labels)
    assert f"AUC floor {POLICY.min_auc:.2f}" in labels


def test_page_lists_every_gate_and_site_and_embeds_the_chart() -> None:
    policy = POLICY.model_copy(update={"min_accuracy": 0.85})
    verdict = decide(GOOD, BETTER_CHAMPION, policy)

    page = verdict_html(verdict, GOOD, policy, BETTER_CHAMPION, title="churn <v2>")

    assert page.startswith("<!DOCTYPE html>") and "churn &lt;v2&gt;" in page  # names are escaped
    assert "FAILED" in page
    for gate in verdict.gates:
        assert f"<td>{gate.name}</td>" in page
    assert page.count("<tr class='fail'>") == len(verdict.failed)
    assert "<td>a</td>" in page and "<td>b</td>" in page and "champion auc" in page
    assert page.count("<svg ") == 1 and "per-site accuracy and AUC against the floors" in page


def test_page_renders_a_site_without_auc() -> None:
    one_class = counts(0, 5, 45, 0)
    candidate = EvaluationReport((SiteEvaluation("a", one_class, {}),), {"a": True})

    page = verdict_html(decide(candidate, None, GatePolicy()), candidate, GatePolicy())

    assert "n/a" in page  # the undefined AUC is shown as such, not as nan or a crash


def test_failing_gates_stop_the_run_and_the_cli_names_each_with_value_and_bound(
    tmp_path: Path, prefect_harness: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("quorum.cli.commands._quiet_console", lambda verbose: None)  # it adds handlers for good
    gates = {"min_accuracy": 0.99, "min_auc": 0.99, "max_calibration_error": 0.001, "min_sites": 2, "min_examples": 50}
    config_path = write_federation(tmp_path, ("alpha", "beta"), rounds=1, gates=gates)
    governance_path, keys = write_governance(tmp_path)

    code = main(["run", "--config", str(config_path), "--governance", str(governance_path), "--approve-with", keys[0]])

    err = capsys.readouterr().err
    assert code == 5, err
    shown = err[err.index("error: Evaluation gates failed") :]  # what the CLI itself printed
    assert "Traceback" not in shown and "fix: nothing was registered" in shown
    failed = re.findall(r"  - (\w+): FAIL ([\d.]+) ([<>]) ([\d.]+)", err)
    assert {name for name, *_ in failed} == {"accuracy", "auc", "calibration_error"}
    assert ("accuracy", "<", "0.9900") in {(name, rel, bound) for name, _, rel, bound in failed}
    html = _evaluate_artifact(config_path, "verdict.html")
    assert "FAILED" in html and "<svg " in html


def _evaluate_artifact(config_path: Path, name: str) -> str:
    from mlflow import MlflowClient

    state = StateLayout(load_federation(config_path).state_dir)
    client = MlflowClient(tracking_uri=state.tracking_uri)
    experiment = client.get_experiment_by_name(load_federation(config_path).name)
    assert experiment is not None
    [evaluate] = client.search_runs([experiment.experiment_id], "attributes.run_name = 'evaluate'")
    path = client.download_artifacts(evaluate.info.run_id, name, str(state.root / "downloaded"))
    return Path(path).read_text(encoding="utf-8")

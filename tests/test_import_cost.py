"""Each command pays only for what it runs: which heavy libraries a module or a site's work imports.

Asserted as sets of imported top-level packages in a fresh interpreter, never as times: MLflow,
Evidently and Great Expectations each take seconds to import, and a site process, `quorum --help`
or a drift check without its HTML report must not load the ones it does not use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.federation import write_federation

HEAVY = ("mlflow", "evidently", "great_expectations", "prefect", "torch", "pandas", "dvc")

_PROBE = """
import json, sys
{code}
heavy = {heavy!r}
print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set(heavy))))
"""


def imported_after(code: str, cwd: Path | None = None) -> set[str]:
    """The heavy top-level packages loaded once ``code`` ran in a new Python process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(code=code, heavy=HEAVY)],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_command_line_parser_imports_nothing_heavy() -> None:
    loaded = imported_after("from quorum.cli.main import build_parser\nbuild_parser().format_help()")

    assert loaded == set()


@pytest.mark.parametrize(
    "module",
    ["quorum.tasks.site", "quorum.flows.site_flows", "quorum.flows.runners.site_session"],
)
def test_site_code_imports_no_mlflow_evidently_or_great_expectations(module: str) -> None:
    loaded = imported_after(f"import {module}")

    assert not loaded & {"mlflow", "evidently", "great_expectations"}, loaded


def test_the_lifecycle_flow_module_defers_mlflow_evidently_and_great_expectations() -> None:
    loaded = imported_after("import quorum.flows.lifecycle")

    assert not loaded & {"mlflow", "evidently", "great_expectations"}, loaded


def test_drift_verdicts_import_no_evidently() -> None:
    loaded = imported_after("import quorum.evaluation.drift, quorum.evaluation.drift_report")

    assert "evidently" not in loaded


@pytest.mark.integration  # imports Great Expectations in a fresh process: slow
def test_a_site_preprocesses_and_monitors_without_mlflow_or_evidently(tmp_path: Path) -> None:
    """At run time: the contract loads Great Expectations, a drift check without its HTML report no Evidently."""
    config = write_federation(tmp_path, ("alpha", "beta"))
    data = yaml.safe_load(config.read_text())
    data["drift"]["html_report"] = False
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    code = (
        "from quorum.configs.schema import load_federation\n"
        "from quorum.tasks.site import monitor_site, preprocess_site\n"
        f"config = load_federation({str(config)!r})\n"
        "assert preprocess_site(config, 'alpha').usable\n"
        "monitor_site(config, 'alpha', None)"
    )

    loaded = imported_after(code, cwd=tmp_path)

    assert "great_expectations" in loaded  # the contract ran
    assert not loaded & {"mlflow", "evidently"}, loaded


@pytest.mark.integration  # imports Great Expectations and Evidently in a fresh process: slow
def test_the_html_drift_report_is_what_loads_evidently(tmp_path: Path) -> None:
    config = write_federation(tmp_path, ("alpha", "beta"), extra={"drift": {"min_rows": 30, "html_report": True}})
    code = (
        "from quorum.configs.schema import load_federation\n"
        "from quorum.tasks.site import monitor_site, preprocess_site\n"
        f"config = load_federation({str(config)!r})\n"
        "assert config.drift.html_report and preprocess_site(config, 'alpha').usable\n"
        "monitor_site(config, 'alpha', None)"
    )

    loaded = imported_after(code, cwd=tmp_path)

    assert "evidently" in loaded
    assert "mlflow" not in loaded

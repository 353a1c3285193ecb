"""No `quorum` command ends in a traceback: the one guard, known tool failures, and the temporary Prefect API.

Unexpected errors become one `error:` line naming a log file that holds the traceback (`-v` prints it);
Prefect's own start-up timeout and a temporary API that never answers become exit 8 with a fix.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from quorum.cli import commands
from quorum.cli.main import UNEXPECTED_EXIT, main
from quorum.configs.errors import ToolError
from quorum.infra.local_api import TemporaryApi
from tests.federation import write_federation, write_governance


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_failure(code: int, err: str, expected_code: int) -> None:
    lines = err.splitlines()
    assert code == expected_code, err
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    assert any(line.strip().startswith("fix: ") for line in lines), err
    assert "Traceback" not in err


@pytest.fixture
def log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "logs"
    monkeypatch.setenv("QUORUM_LOG_DIR", str(folder))
    return folder


def _broken_synth(config_path: Path, overwrite: bool) -> int:
    raise ValueError("unforeseen state in the synthesiser")


# --- the guard --------------------------------------------------------------------------------------


def test_an_unexpected_error_is_one_line_naming_the_log_with_the_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, log_dir: Path
) -> None:
    monkeypatch.setattr(commands, "synth", _broken_synth)

    code, _, err = run(capsys, "data", "synth", "--config", "any.yaml")

    assert_clean_failure(code, err, UNEXPECTED_EXIT)
    [log] = list(log_dir.iterdir())
    assert f"error: unexpected ValueError: unforeseen state in the synthesiser; the traceback is in {log}" in err
    saved = log.read_text(encoding="utf-8")
    assert saved.startswith("quorum data synth --config any.yaml")
    assert "Traceback" in saved and "_broken_synth" in saved


def test_verbose_prints_the_traceback_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, log_dir: Path
) -> None:
    monkeypatch.setattr(commands, "synth", _broken_synth)

    code, _, err = run(capsys, "-v", "data", "synth", "--config", "any.yaml")

    assert code == UNEXPECTED_EXIT
    assert "Traceback (most recent call last)" in err and "_broken_synth" in err
    assert err.rstrip().splitlines()[-2].startswith("error: unexpected ValueError")
    assert len(list(log_dir.iterdir())) == 1


def test_prefects_own_start_up_timeout_is_a_tool_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, log_dir: Path
) -> None:
    def slow_server(config_path: Path, overwrite: bool) -> int:
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    monkeypatch.setattr(commands, "synth", slow_server)

    code, _, err = run(capsys, "data", "synth", "--config", "any.yaml")

    assert_clean_failure(code, err, 8)
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in err
    assert not log_dir.exists()  # an expected failure needs no traceback file


# --- known cases: an approver key that is a folder --------------------------------------------------


@pytest.fixture
def federation(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    config = write_federation(tmp_path, ("alpha", "beta"))
    governance, keys = write_governance(tmp_path, ("ann", "ben"), quorum=2)
    return config, governance, keys


@pytest.mark.parametrize(
    "command",
    [
        ["approve", "test-model", "--version", "1", "--key", "{folder}"],
        ["rollback", "test-model", "--key", "{folder}"],
        ["run", "--approve-with", "{folder}"],
    ],
    ids=["approve", "rollback", "run --approve-with"],
)
def test_a_key_that_is_a_folder_is_refused_with_a_fix(
    capsys: pytest.CaptureFixture[str],
    federation: tuple[Path, Path, list[str]],
    command: list[str],
    log_dir: Path,
) -> None:
    config, governance, keys = federation
    folder = str(Path(keys[0]).parent)
    argv = [part.replace("{folder}", folder) for part in command]

    code, _, err = run(capsys, *argv, "--config", str(config), "--governance", str(governance))

    assert_clean_failure(code, err, 2)
    assert f"{folder} is a folder, not a private key file" in err
    assert not log_dir.exists()


# --- the temporary Prefect API ----------------------------------------------------------------------


def _api(command: list[str], timeout_s: float, tmp_path: Path) -> TemporaryApi:
    process = subprocess.Popen(command)
    return TemporaryApi(process, "http://127.0.0.1:9/api", tmp_path / "api.log", first_run=True, timeout_s=timeout_s)


def test_a_temporary_api_that_exits_is_a_tool_error_naming_its_log(tmp_path: Path) -> None:
    api = _api([sys.executable, "-c", "raise SystemExit(3)"], 300, tmp_path)

    with pytest.raises(ToolError) as caught:
        api.wait()

    assert "exited with code 3" in caught.value.message and str(tmp_path / "api.log") in caught.value.message
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in caught.value.fix


def test_a_temporary_api_that_never_answers_is_stopped_and_reported(tmp_path: Path) -> None:
    api = _api([sys.executable, "-c", "import time; time.sleep(120)"], 0.5, tmp_path)

    with pytest.raises(ToolError, match=r"did not answer within 0.5 s"):
        api.wait()

    assert api.process.poll() is not None  # stopped, not left behind


# --- what the command does while its temporary API starts ----------------------------------------------


@pytest.mark.parametrize(
    ("has_workers", "resume", "answers", "loads"),
    [
        (False, False, False, True),  # still starting, preprocessing here: load Great Expectations meanwhile
        (False, False, True, False),  # already answering: nothing to wait for
        (True, False, False, False),  # site worker processes preprocess, not this process
        (False, True, False, False),  # a resumed job may not preprocess at all
    ],
)
def test_the_wait_loads_the_first_stage_only_when_it_helps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, has_workers: bool, resume: bool, answers: bool, loads: bool
) -> None:
    loaded: list[bool] = []
    monkeypatch.setattr(commands, "_load_first_stage", lambda: loaded.append(True))
    api = _api([sys.executable, "-c", "import time; time.sleep(120)"], 300, tmp_path)
    monkeypatch.setattr(api, "answers", lambda: answers)
    workers: Any = object() if has_workers else None

    try:
        commands._use_the_wait(api, workers, resume)
    finally:
        api.stop()

    assert loaded == ([True] if loads else [])


def test_a_first_stage_that_fails_to_load_is_left_to_preprocessing(monkeypatch: pytest.MonkeyPatch) -> None:
    from quorum.tasks import contract

    def broken() -> None:
        raise ToolError("great_expectations cannot be imported: no module", fix="install it")

    monkeypatch.setattr(contract, "warm_up", broken)

    commands._load_first_stage()  # no error here: preprocessing imports it again and reports it per site

"""A site worker is pinned to its config and governance files; flow runs naming others are refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from quorum.configs.errors import ConfigError
from quorum.configs.site_pins import CONFIG_PIN_ENV, GOVERNANCE_PIN_ENV, require_pinned, site_pins

pytestmark = pytest.mark.unit


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    project = tmp_path / "project"
    project.mkdir()
    config, governance = project / "federation.yaml", project / "governance.yaml"
    config.write_text("name: x\n")
    governance.write_text("approvers: []\n")
    return config, governance


def test_the_pinned_files_pass_however_the_run_spells_them(
    files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, governance = files
    pins = site_pins(config, governance)
    (tmp_path / "link").symlink_to(config.parent)
    monkeypatch.chdir(tmp_path)

    require_pinned("project/federation.yaml", "project/../project/governance.yaml", pins)
    require_pinned(tmp_path / "link" / "federation.yaml", tmp_path / "link" / "governance.yaml", pins)
    require_pinned("anything.yaml", "anything-else.yaml", {})  # a worker started without pins checks nothing


@pytest.mark.parametrize("forged", ["config", "governance"])
def test_a_run_naming_another_file_is_refused_with_a_fix(files: tuple[Path, Path], tmp_path: Path, forged: str) -> None:
    config, governance = files
    pins = site_pins(config, governance)
    other = tmp_path / "state" / "forged.yaml"  # e.g. written into the coordinator's state folder
    given = (other, governance) if forged == "config" else (config, other)

    with pytest.raises(ConfigError) as refused:
        require_pinned(*given, pins)

    assert str(other) in refused.value.message
    assert str(config if forged == "config" else governance) in refused.value.message
    assert ("--config" if forged == "config" else "--governance") in refused.value.fix


def test_a_flow_without_a_governance_parameter_checks_the_config_alone(files: tuple[Path, Path]) -> None:
    config, governance = files
    pins = site_pins(config, governance)
    require_pinned(config, None, pins)
    with pytest.raises(ConfigError):
        require_pinned(governance, None, pins)


def _site_entry_points() -> dict[str, Callable[[str, str], object]]:
    from quorum.flows.deploy import load_site_context
    from quorum.flows.runners.site_session import site_session
    from quorum.flows.site_flows import monitor_site_flow, preprocess_site_flow

    return {
        "preprocess": lambda config, governance: preprocess_site_flow.fn(config, "alpha"),
        "monitor": lambda config, governance: monitor_site_flow.fn(config, governance, "alpha"),
        "session": lambda config, governance: site_session.fn(config, "alpha", "job", "/nowhere"),
        "deploy and serve": lambda config, governance: load_site_context(config, governance, "alpha"),
    }


@pytest.mark.parametrize("entry", ["preprocess", "monitor", "session", "deploy and serve"])
def test_every_site_flow_refuses_parameters_its_worker_was_not_pinned_to(
    files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    config, governance = files
    forged = tmp_path / "forged.yaml"  # never read: the refusal comes first
    for name, value in site_pins(config, governance).items():
        monkeypatch.setenv(name, value)
    run = _site_entry_points()[entry]

    with pytest.raises(ConfigError, match="this site's worker was started for"):
        run(str(forged), str(governance))
    if entry in ("monitor", "deploy and serve"):
        with pytest.raises(ConfigError, match="this site.s worker was started for the governance"):
            run(str(config), str(forged))


def test_quorum_up_and_quorum_worker_pin_site_workers_and_not_the_coordinator(files: tuple[Path, Path]) -> None:
    from quorum.configs.schema import load_federation
    from quorum.infra.stack import Stack
    from quorum.lineage.state import StateLayout
    from tests.federation import write_federation

    config_file, governance = files
    path = write_federation(config_file.parent, ["alpha", "beta"])
    config = load_federation(path)
    state = StateLayout(config.state_dir)

    pinned = Stack(config, state, governance_path=governance)
    unpinned = Stack(config, state)

    for site in ("alpha", "beta"):
        env = pinned.site_env(site)
        assert env[CONFIG_PIN_ENV] == str(path.resolve()) and env[GOVERNANCE_PIN_ENV] == str(governance.resolve())
        assert CONFIG_PIN_ENV not in unpinned.site_env(site)
    assert CONFIG_PIN_ENV not in pinned.coordinator_env()


def test_quorum_worker_takes_the_governance_it_pins() -> None:
    from quorum.cli.main import build_parser

    args = build_parser().parse_args(["worker", "--site", "alpha", "--governance", "g.yaml"])
    assert args.governance == "g.yaml"

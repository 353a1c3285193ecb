"""Quorum installs as one `quorum` namespace: the wheel holds only `quorum/`, and neither an installed
copy nor a user's own `configs/` folder makes a bare `flows`, `tasks`, `configs`, ... importable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration  # builds a wheel with `python -m build`, runs the quorum CLI

OLD_NAMES = ("flows", "tasks", "lineage", "evaluation", "configs", "infra", "cli")
NOT_SOURCES = (".git", ".venv", "build", "dist", "*.egg-info", ".quorum", "data", "__pycache__", ".*_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `python -m build --wheel` makes, built from a copy so the build writes nothing here."""
    source = tmp_path_factory.mktemp("source") / "quorum"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCES), symlinks=True)
    out = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(source)]
    done = subprocess.run(build, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (built,) = out.glob("quorum-*.whl")
    return built


def test_the_wheel_holds_only_the_quorum_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()

    assert {name.split("/")[0] for name in names} == {"quorum", wheel.name.split("-py3")[0] + ".dist-info"}
    assert not any(name.startswith("quorum/__init__") for name in names)  # a namespace: nothing of its own
    for packaged in ("quorum/flows/lifecycle.py", "quorum/configs/federation.yaml", "quorum/infra/prefect.yaml"):
        assert packaged in names
    assert "quorum/flows/runners/pool.py" in names and "quorum/cli/main.py" in names


def test_an_installed_copy_exposes_no_bare_top_level_names(wheel: Path, tmp_path: Path) -> None:
    target, elsewhere = tmp_path / "site", tmp_path / "cwd"
    elsewhere.mkdir()
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True)
    probe = (
        "import importlib.util, sys\n"
        f"print(*[n for n in {OLD_NAMES!r} if importlib.util.find_spec(n) is not None])\n"
        "print(importlib.util.find_spec('quorum.flows.lifecycle').origin)\n"
        "print(importlib.util.find_spec('quorum.infra.stack').origin)\n"
    )
    # -S: no site-packages, so only the installed copy (and the standard library) can answer
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(target)}
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, check=True
    )

    bare, lifecycle, stack = done.stdout.splitlines()
    assert bare == ""  # none of flows, tasks, lineage, ... is importable on its own
    assert Path(lifecycle) == target / "quorum" / "flows" / "lifecycle.py"
    assert Path(stack) == target / "quorum" / "infra" / "stack.py"
    top = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert top - {"bin"} == {"quorum"}  # bin/ holds the `quorum` console script


SHADOW = """\
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text(__name__)
raise ImportError("the user's configs/ folder was imported in place of quorum.configs")
"""


@pytest.mark.parametrize(
    "launch",
    [
        [str(Path(sys.executable).with_name("quorum"))],  # the console script users run
        [sys.executable, "-m", "quorum.cli.main"],  # `python -m` puts the working directory first on sys.path
    ],
    ids=["quorum", "python-m"],
)
def test_a_configs_folder_in_the_working_directory_does_not_shadow_quorum_configs(
    tmp_path: Path, launch: list[str]
) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("federation.yaml", "governance.yaml"):  # the user's own configs, where the CLI looks by default
        shutil.copy(REPO / "configs" / name, configs / name)
    for module in ("__init__.py", "schema.py", "errors.py"):  # a package that would win if it were on the path
        (configs / module).write_text(SHADOW)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HOME": str(tmp_path)}

    done = subprocess.run(
        [*launch, "infra", "render", "--out", "prefect.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "wrote prefect.yaml" in done.stdout
    assert not (configs / "IMPORTED").exists()
    assert "name: lifecycle" in (tmp_path / "prefect.yaml").read_text()

"""DVC adapter: the content hash of a site's processed data, and recording it in ``dvc.lock``.

The hash is DVC's own directory digest (md5 of the sorted ``{md5, relpath}`` list, suffixed
``.dir``), so the fingerprint a site shares is exactly what ``dvc.lock`` records for its stage and a
test pins that equality against the real ``dvc`` command. Only this hash ever leaves the site.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from quorum.configs.errors import ToolError

STAGE = "preprocess"


def find_repo(path: Path) -> Path | None:
    """The DVC project enclosing ``path`` that defines the preprocess stage, if any."""
    for folder in (path, *path.parents):
        if (folder / ".dvc").is_dir() and (folder / "dvc.yaml").is_file():
            return folder
    return None


def stage_name(site_id: str) -> str:
    return f"{STAGE}@{site_id}"


def _dvc_command() -> list[str]:
    beside = Path(sys.executable).with_name("dvc")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("dvc")
    if found is None:
        raise ToolError("the dvc command is not installed", fix="pip install dvc (make demo installs it)")
    return [found]


_AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _run(repo: Path, *args: str, fix: str = "", credentials_file: Path | None = None) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    if credentials_file is not None:  # the site's own file and nothing the shell happens to carry
        env = {k: v for k, v in env.items() if k not in _AWS_CREDENTIALS}
        env["AWS_SHARED_CREDENTIALS_FILE"] = str(credentials_file)
    result = subprocess.run([*_dvc_command(), *args], cwd=repo, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        errors = [line.strip() for line in lines if line.startswith("ERROR")]  # DVC ends with a support banner
        detail = errors[-1] if errors else (lines[-1] if lines else "no output")
        raise ToolError(
            f"dvc {' '.join(args)} failed in {repo}: {detail}",
            fix=fix or "run the same dvc command in that folder to see the full message",
        )
    return result.stdout


def defined_stages(repo: Path) -> set[str]:
    return set(_run(repo, "stage", "list", "--name-only").split())


def commit_stages(repo: Path, site_ids: Sequence[str]) -> dict[str, str]:
    """Record the sites' current processed data in ``dvc.lock`` and the DVC cache.

    Returns the hash ``dvc.lock`` now holds for each site whose stage the project defines; sites
    without a stage (data outside this DVC project) are left out.
    """
    known = defined_stages(repo)
    stages = [stage_name(s) for s in site_ids if stage_name(s) in known]
    if not stages:
        return {}
    _run(repo, "commit", "--force", "--quiet", *stages)
    return {s: h for s, h in locked_hashes(repo).items() if stage_name(s) in stages}


def locked_hashes(repo: Path) -> dict[str, str]:
    """Each site's processed-data hash as the ``dvc.lock`` in the working tree records it."""
    lock = repo / "dvc.lock"
    if not lock.is_file():
        return {}
    return parse_lock(lock.read_text(encoding="utf-8"))


def committed_hashes(repo: Path) -> tuple[dict[str, str], str]:
    """Each site's hash in the *committed* ``dvc.lock`` (git ``HEAD``), and where it was read from.

    A data version is what git records: a hash only in the working tree is an experiment nobody
    reviewed yet. Outside a git checkout, or before ``dvc.lock`` is first committed, the working
    tree's file is the best there is, and the second value says so.
    """
    try:
        shown = subprocess.run(
            ["git", "show", "HEAD:./dvc.lock"], cwd=repo, capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        shown = None
    if shown is not None and shown.returncode == 0:
        return parse_lock(shown.stdout), "git HEAD"
    return locked_hashes(repo), "working tree"


def parse_lock(text: str) -> dict[str, str]:
    """Site id -> output hash of each ``preprocess@<site>`` stage in a ``dvc.lock`` text."""
    data = yaml.safe_load(text) or {}
    hashes = {}
    for name, stage in (data.get("stages") or {}).items():
        if not name.startswith(f"{STAGE}@"):
            continue
        outs = stage.get("outs") or []
        if outs:
            hashes[name.split("@", 1)[1]] = str(outs[0].get("md5", ""))
    return hashes


def remote_name(site_id: str) -> str:
    return f"site-{site_id}"


def push_site(
    repo: Path, site_id: str, url: str, endpoint_url: str | None = None, credentials_file: Path | None = None
) -> str:
    """Push one site's committed processed data to that site's own remote; return DVC's summary line.

    The remote is written to ``.dvc/config.local`` (git-ignored by DVC), never to the shared
    ``.dvc/config``: where a site keeps its data is the site's business, and a remote in the shared
    config would invite ``dvc push`` of everything to one place. Only ``preprocess@<site>`` is
    pushed, so no other site's objects can reach this remote. For S3 the site's own credentials file
    goes into that same local config, so no other site's push can use it.
    """
    stage = stage_name(site_id)
    if stage not in defined_stages(repo):
        raise ToolError(
            f"dvc.yaml in {repo} defines no stage {stage}",
            fix="add the site to the federation config that dvc.yaml iterates over",
        )
    if "://" not in url:
        Path(url).mkdir(parents=True, exist_ok=True)
    name = remote_name(site_id)
    _run(repo, "remote", "add", "--local", "--force", name, url)
    if url.startswith("s3://"):
        for option, value in (("endpointurl", endpoint_url), ("credentialpath", credentials_file)):
            if value is not None:
                _run(repo, "remote", "modify", "--local", name, option, str(value))
    out = _run(
        repo,
        "push",
        "--remote",
        name,
        "--no-run-cache",
        stage,
        credentials_file=credentials_file if url.startswith("s3://") else None,
        fix=f"if files are missing from the cache, record the data first: `dvc commit {stage}` (the lifecycle does)",
    )
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[-1] if lines else "pushed"

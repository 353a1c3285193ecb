"""Where the coordinator keeps its state: one folder, git-ignored, named by the config.

Tracking store, artifact store, keys, audit log and Prefect's database all live below it, so
removing the folder resets a federation and tests get full isolation from a temp dir.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SITE_ROOT_ENV = "QUORUM_SITE_ROOT"  # the one data root a site worker may read
# How long a temporary Prefect API may take to start. Prefect allows 20 s; a first run on a busy 2-core
# machine also creates the database and can take over a minute, so Quorum allows 300 s unless the user chose.
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_S = 300


@dataclass(frozen=True)
class StateLayout:
    root: Path

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow" / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlflow" / "artifacts"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    @property
    def artifacts(self) -> Path:
        """The artifact store: round weights, checkpoints, signatures, model copies."""
        return self.root / "artifacts"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    def ensure(self) -> StateLayout:
        for folder in (self.mlflow_db.parent, self.mlflow_artifacts, self.artifacts, self.keys, self.prefect_home):
            folder.mkdir(parents=True, exist_ok=True)
        return self


def configure_environment(state: StateLayout) -> None:
    """Point Prefect and MLflow at this state folder before either is imported.

    Prefect reads these at import time; an explicit ``PREFECT_API_URL`` (a real server) wins. The
    MLflow store is chosen in ``quorum.lineage.tracking.open_tracker`` (``MLFLOW_TRACKING_URI`` wins there).
    """
    state.ensure()
    os.environ.setdefault("PREFECT_HOME", str(state.prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(STARTUP_TIMEOUT_ENV, str(STARTUP_TIMEOUT_S))
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def use_tracking_server(state: StateLayout, configured_uri: str | None) -> None:
    """Talk to the MLflow server that owns this federation's store, when there is one.

    With ``quorum up`` running (or a server named in the config), the store may be PostgreSQL
    and S3 that only the server reaches; writing to the SQLite file beside it would split the
    lineage in two. An explicit ``MLFLOW_TRACKING_URI`` still wins.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    if configured_uri:
        os.environ["MLFLOW_TRACKING_URI"] = configured_uri
        return
    services = state.root / "services"
    try:
        pid = int((services / "mlflow-server.pid").read_text().strip())
        os.kill(pid, 0)
        uri = json.loads((services / "endpoints.json").read_text())["mlflow_tracking_uri"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    os.environ["MLFLOW_TRACKING_URI"] = str(uri)

"""MLflow adapter: runs, metrics, dataset inputs, the logged model and its registry entries.

Everything goes through an explicit ``MlflowClient`` and run ids rather than the fluent active-run
stack, because site work runs in threads and a Prefect flow may span several of them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from quorum.configs.errors import ToolError
from quorum.lineage.state import StateLayout

if TYPE_CHECKING:
    from mlflow import MlflowClient

CANDIDATE = "candidate"
CHAMPION = "champion"


@dataclass(frozen=True)
class Tracker:
    """A tracking store plus the experiment of one federation."""

    client: MlflowClient
    experiment_id: str
    uri: str

    def start_run(self, name: str, *, parent_id: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        all_tags = dict(tags or {})
        all_tags["mlflow.runName"] = name
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        return str(self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id)

    def end_run(self, run_id: str, *, failed: bool = False) -> None:
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        stamp = _now_ms()
        batch = [Metric(key, float(value), stamp, step) for key, value in metrics.items() if np.isfinite(value)]
        self.client.log_batch(run_id, metrics=batch)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Tags mark what happened to a run (e.g. training stopped at the privacy budget), to search runs by it."""
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_dict(self, run_id: str, payload: object, artifact_file: str) -> None:
        self.client.log_dict(run_id, payload, artifact_file)  # type: ignore[arg-type]

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_data_versions(self, run_id: str, versions: Mapping[str, tuple[str, int, dict[str, Any]]]) -> None:
        """One dataset input per site: its DVC hash as digest and the site as context; no rows."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                dataset=Dataset(
                    name=f"{site_id}-processed",
                    digest=data_hash,
                    source_type="dvc",
                    source=json.dumps({"site": site_id, "stage": f"preprocess@{site_id}"}),
                    schema=json.dumps(schema),
                    profile=json.dumps({"num_rows": rows}),
                ),
                tags=[InputTag("mlflow.data.context", site_id)],
            )
            for site_id, (data_hash, rows, schema) in versions.items()
        ]
        self.client.log_inputs(run_id, datasets=inputs)


def open_tracker(state: StateLayout, experiment: str) -> Tracker:
    """Connect to the tracking store (local SQLite by default) and the federation's experiment."""
    _quiet_mlflow()
    from mlflow import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI") or state.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return Tracker(client, str(found.experiment_id), uri)
    location = state.mlflow_artifacts.resolve().as_uri() if uri.startswith("sqlite:") else None
    return Tracker(client, str(client.create_experiment(experiment, artifact_location=location)), uri)


def log_model(
    tracker: Tracker,
    run_id: str,
    model: Any,
    input_example: NDArray[np.float32],
) -> str:
    """Log the torch model with its signature and a non-personal input example; return its URI."""
    _quiet_mlflow()
    import mlflow
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        output = torch.sigmoid(model(torch.from_numpy(input_example))).numpy()
    signature = infer_signature(input_example, output)
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracker.uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                signature=signature,
                input_example=input_example,
                pip_requirements=model_requirements(),
            )
    finally:
        # set_tracking_uri also exports MLFLOW_TRACKING_URI, which open_tracker honours: left in place,
        # every later federation opened in this process would write into this one's store
        if exported is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = exported
    return str(info.model_uri)


def model_requirements() -> list[str]:
    """The logged model's pip requirements, given outright: left to infer them, MLflow loads the model
    in a new Python process on every call to see what it imports (seconds of torch and MLflow imports).
    MLflow adds its own pin; the model needs torch, cloudpickle (its pickle module) and numpy, pinned as
    installed (torch with its local label, ``+cpu``, as MLflow's inference wrote it)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "cloudpickle", "numpy")]


def register(tracker: Tracker, name: str, model_uri: str, run_id: str, tags: Mapping[str, str]) -> str:
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Federated model trained by Quorum")
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(name, model_uri, run_id=run_id, tags=dict(tags), model_id=model_id)
    return str(version.version)


def set_version_tags(tracker: Tracker, name: str, version: str, tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        tracker.client.set_model_version_tag(name, version, key, value)


def alias_version(tracker: Tracker, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(tracker.client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_alias(tracker: Tracker, name: str, alias: str, version: str | None) -> None:
    """Point ``alias`` at ``version``; ``None`` removes it (the undo of a first promotion)."""
    if version is None:
        tracker.client.delete_registered_model_alias(name, alias)
    else:
        tracker.client.set_registered_model_alias(name, alias, version)


def version_tags(tracker: Tracker, name: str, version: str) -> dict[str, str]:
    return dict(tracker.client.get_model_version(name, version).tags)


def download_version(tracker: Tracker, name: str, version: str, destination: Path) -> Path:
    """Copy a registered version's model files to ``destination`` (which must not exist yet)."""
    import mlflow

    try:
        source = tracker.client.get_model_version_download_uri(name, version)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(destination), tracking_uri=tracker.uri
        )
    except Exception as exc:  # MLflow raises many types here; all mean the same to a user
        raise ToolError(f"cannot fetch model {name} version {version}: {exc}", fix="check `quorum ui`") from exc
    return Path(local)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _quiet_mlflow() -> None:
    """MLflow's alembic migrations and integrations log at INFO/WARNING on first use."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("alembic", "mlflow", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.ERROR)

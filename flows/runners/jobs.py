"""The record of a job in the artifact store: enough for ``quorum run --resume JOB`` to continue.

Written once preprocessing settled which sites take part; together with the per-round checkpoints
(``jobs/JOB/rounds/NNNN``) it lets a restarted coordinator skip every completed stage and round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quorum.configs.errors import QuorumError
from quorum.flows.preprocess import PreprocessResult
from quorum.lineage.artifacts import ArtifactStore
from quorum.tasks.weights import Weights
from quorum.tasks.wire import decode_fingerprint, encode_fingerprint


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    run_id: str
    config_path: str
    governance_path: str
    preprocess: PreprocessResult


def _key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/{name}"


def save_job(store: ArtifactStore, record: JobRecord) -> None:
    prep = record.preprocess
    store.put_json(
        _key(record.job_id, "job.json"),
        {
            "job_id": record.job_id,
            "run_id": record.run_id,
            "config_path": record.config_path,
            "governance_path": record.governance_path,
            "fingerprints": {s: encode_fingerprint(fp) for s, fp in prep.fingerprints.items()},
            "excluded": prep.excluded,
        },
    )


def load_job(store: ArtifactStore, job_id: str) -> JobRecord:
    key = _key(job_id, "job.json")
    if not store.exists(key):
        raise QuorumError(
            f"job {job_id} has no record in {store.location} (it stopped before its sites were prepared)",
            fix="start a new job with `quorum run` (nothing of that job needs keeping)",
        )
    data: Any = store.get_json(key)
    prep = PreprocessResult(
        {s: decode_fingerprint(fp) for s, fp in data["fingerprints"].items()}, dict(data["excluded"])
    )
    return JobRecord(job_id, str(data["run_id"]), str(data["config_path"]), str(data["governance_path"]), prep)


def last_checkpoint(store: ArtifactStore, job_id: str) -> tuple[int, Weights | None, list[dict[str, Any]]]:
    """The newest completed round, its global weights (sha256-checked) and every completed round's manifest."""
    manifests: list[dict[str, Any]] = []
    server_round = 1
    while store.exists(_key(job_id, f"rounds/{server_round:04d}/manifest.json")):
        manifest: Any = store.get_json(_key(job_id, f"rounds/{server_round:04d}/manifest.json"))
        manifests.append(manifest)
        server_round += 1
    if not manifests:
        return 0, None, []
    last = manifests[-1]
    weights = store.get_weights(_key(job_id, f"rounds/{last['server_round']:04d}/global.npz"), last["sha256"])
    return int(last["server_round"]), weights, manifests

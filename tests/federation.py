"""Builders for small federations in a temp folder, shared by flow and CLI tests."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path

import yaml

from quorum.configs.schema import load_federation
from quorum.lineage.keys import generate_key_pair, public_key_fingerprint
from quorum.tasks.synth import synth_federation

FEATURES = {
    "numeric": ["age", "income", "tenure_months", "num_products", "balance", "credit_score"],
    "categorical": {"region_type": ["urban", "suburban", "rural"], "channel": ["online", "branch", "phone"]},
}

# gates a 2-site pool job on a few hundred rows can pass: the pool tests are about dispatch, not quality
POOL_GATES = {
    "min_accuracy": 0.5,
    "min_auc": 0.55,
    "min_site_accuracy": 0.4,
    "max_selection_rate_gap": 0.6,
    "max_regression": None,
    "min_sites": 1,
    "min_examples": 50,
}


def site_entry(site_id: str) -> dict[str, object]:
    """One synthetic site's config entry, laid out the way quorum.tasks.synth writes its data."""
    return {
        "root": f"sites/{site_id}",
        "target": "churned",
        "id_column": "customer_id",
        "pii_columns": ["name", "email", "phone"],
        "protected_attribute": "gender",
    }


def write_federation(
    root: Path,
    site_ids: Sequence[str] = ("alpha", "beta", "gamma"),
    *,
    rounds: int = 2,
    min_sites: int = 2,
    gates: dict[str, object] | None = None,
    extra: dict[str, object] | None = None,
    training: dict[str, object] | None = None,
    name: str = "federation.yaml",
) -> Path:
    """A federation.yaml over synthetic sites below ``root``; returns the config path.

    ``training`` adds to (or overrides) the training keys; ``extra`` replaces whole top-level sections.
    """
    sites = {site_id: site_entry(site_id) for site_id in site_ids}
    config = {
        "name": "test-federation",
        "model_name": "test-model",
        "seed": 3,
        "state_dir": "state",
        "features": FEATURES,
        "contract": {"min_rows": 50, "numeric_ranges": {"age": [18, 110]}, "label_rate": [0.02, 0.7]},
        "sites": sites,
        "model": {"hidden_sizes": [8]},
        "training": {
            "rounds": rounds,
            "local_epochs": 2,
            "batch_size": 64,
            "learning_rate": 0.2,
            "min_sites": min_sites,
            **(training or {}),
        },
        "gates": gates
        or {
            "min_accuracy": 0.5,
            "min_auc": 0.6,
            "min_site_accuracy": 0.4,
            "max_selection_rate_gap": 0.5,
            "min_sites": min_sites,
            "min_examples": 50,
        },
        # no Evidently HTML page at each site: loading Evidently costs seconds per test process, and
        # tests/test_drift.py and tests/test_import_cost.py check that page themselves
        "drift": {"min_rows": 30, "min_sites_to_retrain": 1, "html_report": False},
        # the sites' work stays in the test's own process, which has its imports paid already
        "deployment": {"site_processes": 0},
    }
    config.update(extra or {})
    path = root / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    synth_federation(load_federation(path))
    return path


def write_governance(
    root: Path, approvers: Sequence[str] = ("ann", "ben", "cyd"), quorum: int = 2, checkpoints: bool = True
) -> tuple[Path, list[str]]:
    """governance.yaml pinning a fresh key pair per approver (and a checkpoint key); returns the path and
    the approvers' private keys. The checkpoint key's private half sits beside its public key."""
    keys = root / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    private = []
    for name in (*approvers, *(["coordinator"] if checkpoints else [])):
        if not (keys / f"{name}.key").exists():
            generate_key_pair(keys / f"{name}.key", keys / f"{name}.pub")
    for name in approvers:
        private.append(str(keys / f"{name}.key"))
    config: dict[str, object] = {
        "quorum": quorum,
        "approvers": [
            {"name": n, "public_key": f"keys/{n}.pub", "fingerprint": public_key_fingerprint(keys / f"{n}.pub")}
            for n in approvers
        ],
    }
    if checkpoints:
        config["checkpoints"] = {
            "public_key": "keys/coordinator.pub",
            "fingerprint": public_key_fingerprint(keys / "coordinator.pub"),
        }
    path = root / "governance.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, private


def pin_governance_root(config_path: Path, governance_path: Path) -> None:
    """Pin ``governance_path`` (version 1) as the federation's governance root, as a repository does in git."""
    config = yaml.safe_load(config_path.read_text())
    config["governance_root"] = hashlib.sha256(governance_path.read_bytes()).hexdigest()
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))


GOVERNED_KEYS = ("ann", "ben", "cyd", "mallory")  # the approvers of ``governed_history``, and an outsider


def private_copy(history: Path, into: Path) -> tuple[Path, Path, Path, dict[str, Path]]:
    """A test's own copy of ``governed_history`` (tests/conftest.py): its root, config, governance file
    and every key in it, so a test can tamper with anything without touching the shared history."""
    root = into / "federation"
    shutil.copytree(history, root)
    keys = {name: root / "keys" / f"{name}.key" for name in GOVERNED_KEYS}
    return root, root / "federation.yaml", root / "governance.yaml", keys

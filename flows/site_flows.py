"""Flows a site runs on its own work pool outside a training job: preprocessing and drift monitoring.

Both are deployments per site (``infra/prefect.yaml``): a user triggers them from the Prefect UI or
they run on their schedule. They read only the site's own folder; what they report upward is the
same summary the lifecycle gets (a fingerprint, a drift summary). Like the site session, they import
only site code: no MLflow and no registry (``tests/test_site_flow_imports.py``); the champion comes
from the signed champion statement and the files it names in the artifact store.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger

from quorum.configs.errors import ContractFailed
from quorum.configs.schema import load_federation, load_governance
from quorum.configs.site_pins import require_pinned
from quorum.flows.runners.site_session import check_site_root
from quorum.lineage.artifacts import federation_store
from quorum.tasks import site as site_work
from quorum.tasks.wire import encode_drift, encode_fingerprint


@flow(name="site-preprocess")
def preprocess_site_flow(config_path: str, site_id: str) -> dict[str, Any]:
    """Validate and prepare this site's data; returns its fingerprint (hashes and counts only)."""
    require_pinned(config_path)
    config = load_federation(config_path)
    check_site_root(config, site_id)
    fingerprint = site_work.preprocess_site(config, site_id)
    if not fingerprint.contract.passed:
        raise ContractFailed(
            f"site {site_id}: " + "; ".join(fingerprint.contract.describe().splitlines()),
            fix="fix the data at the site; its previous processed data is unchanged",
        )
    get_run_logger().info(
        "%s: %d train / %d test rows, data %s",
        site_id,
        fingerprint.train_rows,
        fingerprint.test_rows,
        fingerprint.data_hash,
    )
    return encode_fingerprint(fingerprint)


@flow(name="site-monitor")
def monitor_site_flow(config_path: str, governance_path: str, site_id: str) -> dict[str, Any]:
    """Drift of this site's current window against its training snapshot, scored by the verified champion."""
    from quorum.flows.deploy import trust_record
    from quorum.lineage.model_files import load_champion

    require_pinned(config_path, governance_path)
    config = load_federation(config_path)
    check_site_root(config, site_id)
    store = federation_store(config, site_id)
    governance = load_governance(governance_path)
    # the champion as the site trusts it: the signed statement and the files it names, never MLflow's alias
    loaded = load_champion(store, governance, config.model_name, trust_record(config.site(site_id)))
    version, champion = (loaded[0].version, loaded[1]) if loaded is not None else (None, None)
    summary = site_work.monitor_site(config, site_id, champion)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    store.put_json(f"monitoring/{site_id}/{stamp}.json", {"champion_version": version, **encode_drift(summary)})
    get_run_logger().info(
        "%s: drift share %.0f%% (%s)",
        site_id,
        100 * summary.drift_share,
        ", ".join(summary.drifted_columns) or "no drifted columns",
    )
    return encode_drift(summary)

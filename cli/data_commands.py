"""What the site-data ``quorum`` commands do: contract init, data push, data example, lineage.

Like ``quorum.cli.commands``, imported only once one of these commands was chosen; none of them starts
Prefect. ``contract init`` and ``data push`` run *at a site*, on that site's own files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from quorum.configs.errors import ConfigError, UnknownModelVersion
from quorum.configs.schema import load_federation
from quorum.lineage.state import StateLayout, configure_environment, use_tracking_server


def contract_init(config_path: Path, site_id: str, out: Path | None, margin: float, overwrite: bool) -> int:
    """Profile one site's snapshot and write the contract it suggests, for a person to review and commit."""
    from quorum.tasks.contract import validate_contract
    from quorum.tasks.profile import Margins, contract_document, contract_from_profile, profile_frame, read_snapshot

    config = load_federation(config_path)
    site = config.site(site_id)
    assert config.source is not None
    target = (out or config.source.parent / "contracts" / f"{config.name}.yaml").resolve()
    if target.exists() and not overwrite:
        raise ConfigError(
            f"{target} exists; a committed contract is edited by hand, not generated again",
            fix="edit it, write elsewhere with --out, or pass --overwrite (its edits are lost)",
        )
    if not 0.0 <= margin <= 10.0:
        raise ConfigError(f"--margin {margin:g} is outside [0, 10]", fix="pass a fraction of the span, e.g. 0.1")
    margins = Margins(range_fraction=margin)
    snapshot = read_snapshot(config, site.id)
    profile = profile_frame(snapshot, site, config.features, source=str(site.data_path))
    contract, notes = contract_from_profile(profile, margins)
    profile_path = _write_json(site.reports_dir / "profile.json", profile.to_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(contract_document(contract, profile, margins), encoding="utf-8")
    check = validate_contract(snapshot, config.features, contract, site, report_dir=site.reports_dir / "contract-init")
    relative = os.path.relpath(target, config.source.parent)
    print(f"wrote {target} from {profile.rows} rows of site {site.id}")
    print(f"  profile (stays at the site): {profile_path}")
    print(f"  on the snapshot itself: {check.describe() if check.passed else 'FAILED: ' + check.describe()}")
    for note in notes:
        print(f"  check: {note}")
    print(
        f"  REVIEW it before committing or sharing: its ranges and categories come from site {site.id}'s data.\n"
        f"  use it: put `contract_file: {relative}` in {config.source} instead of `contract:`"
    )
    return 0


def _write_json(path: Path, payload: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    temp.replace(path)
    return path


def data_push(config_path: Path, site_id: str) -> int:
    """Push one site's committed processed data to that site's own DVC remote."""
    from quorum.lineage import dvc

    config = load_federation(config_path)
    site = config.site(site_id)
    repo = dvc.find_repo(site.root)
    if repo is None:
        raise ConfigError(
            f"site {site.id}'s folder {site.root} is not inside a DVC project with a dvc.yaml",
            fix="run the site's preprocessing inside the project checkout (`dvc repro preprocess@<site>`)",
        )
    summary = dvc.push_site(repo, site.id, site.remote_url, site.dvc_endpoint_url, site.aws_credentials_file)
    locked = dvc.locked_hashes(repo).get(site.id, "not in dvc.lock")
    print(
        f"{site.id}: preprocess@{site.id} (data {locked}) -> remote {dvc.remote_name(site.id)} at {site.remote_url}: "
        f"{summary}\n  the remote is set in {repo / '.dvc' / 'config.local'}, which git never sees"
    )
    return 0


def data_example(name: str, out: Path) -> int:
    from quorum.tasks.examples import write_example

    for path in write_example(name, out):
        print(f"wrote {path}")
    return 0


def lineage(config_path: Path, model: str, version: str, governance_path: Path | None = None) -> int:
    """Print what one registered version was made from, read from its signed provenance."""
    if not re.fullmatch(r"[1-9][0-9]{0,8}", version):
        raise UnknownModelVersion(f"{version!r} is not a model version number", fix="pass --version N, e.g. 1")
    config = load_federation(config_path)
    state = StateLayout(config.state_dir)
    use_tracking_server(state, config.deployment.mlflow_tracking_uri)
    if not os.environ.get("MLFLOW_TRACKING_URI") and not state.mlflow_db.exists():
        raise UnknownModelVersion(
            f"{config.name} has no tracking store yet ({state.mlflow_db})",
            fix="run the lifecycle first (`quorum run`), or pass the --config of the federation that trained it",
        )
    configure_environment(state)
    from quorum.configs.schema import load_governance
    from quorum.lineage.artifacts import federation_store
    from quorum.lineage.tracking import open_tracker
    from quorum.lineage.version_lineage import read_lineage

    governance = load_governance(governance_path or Path("configs/governance.yaml"))
    tracker = open_tracker(state, config.name)
    print(read_lineage(tracker, federation_store(config), governance, model, version).render())
    return 0

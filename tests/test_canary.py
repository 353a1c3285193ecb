"""Nothing from a site's raw data leaves the site, checked where a leak would land rather than where it
would start: canaries in every raw column of every site, the whole lifecycle in process, then a search
of every byte written outside the site folders. A leak through a code path or a tool nobody thought to
test (an error message, a metric key, a pickled object) ends up in one of those bytes all the same.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import shutil
import sqlite3
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
import yaml

from quorum.configs.schema import FederationConfig, load_federation
from quorum.lineage.artifacts import LocalArtifactStore
from quorum.lineage.state import StateLayout
from tests.canary import GROUP, NUMBERS, PII, UNDECLARED, Canaries, plant_federation, planted_canaries, scan
from tests.federation import write_federation, write_governance

if TYPE_CHECKING:
    from quorum.flows.lifecycle import LifecycleResult

REJECTED = "gamma"  # its training window also holds undeclared categories and labels: its contract fails


@dataclass(frozen=True)
class CanaryRun:
    root: Path
    config: FederationConfig
    result: LifecycleResult
    captured: Path  # what the run logged, printed and warned
    prefect_db: Path
    prefect_home: Path

    @property
    def state(self) -> StateLayout:
        return StateLayout(self.config.state_dir)

    def scan_roots(self) -> list[Path]:
        return [self.root, self.prefect_db.parent, self.prefect_home]

    def site_roots(self) -> list[Path]:
        return [site.root for site in self.config.sites]


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory: pytest.TempPathFactory, prefect_harness: Path) -> CanaryRun:
    from quorum.flows.lifecycle import lifecycle

    root = tmp_path_factory.mktemp("canary")
    config_path = write_federation(root, rounds=2)
    _hash_pii_at(config_path, "alpha")  # alpha hashes its PII, the others drop it: both paths run
    _allow_one_site_out(config_path)  # the planted undeclared categories fail one site's contract by design
    config = load_federation(config_path)
    plant_federation(config, rejected=(REJECTED,))
    governance_path, keys = write_governance(root)
    captured = root / "captured"

    with _captured_output(captured):
        result = lifecycle(str(config_path), str(governance_path), keys[:2])
    _flush_prefect()

    return CanaryRun(root, config, result, captured, _prefect_database(), prefect_harness)


def _allow_one_site_out(config_path: Path) -> None:
    raw = yaml.safe_load(config_path.read_text())
    raw["gates"] = {**(raw.get("gates") or {}), "min_site_fraction": 0.5}
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _hash_pii_at(config_path: Path, site_id: str) -> None:
    raw = yaml.safe_load(config_path.read_text())
    raw["sites"][site_id]["pii_mode"] = "hash"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))


@contextlib.contextmanager
def _captured_output(folder: Path) -> Iterator[None]:
    """What a terminal or a log collector would get from the run: log records, stdout, stderr, warnings."""
    folder.mkdir()
    handler = logging.FileHandler(folder / "records.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        with (
            open(folder / "stdout.txt", "w", encoding="utf-8") as out,
            open(folder / "stderr.txt", "w", encoding="utf-8") as err,
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            try:
                yield
            finally:
                (folder / "warnings.txt").write_text("\n".join(str(w.message) for w in caught), encoding="utf-8")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _flush_prefect() -> None:
    """Logs and state events reach Prefect's database in background batches: send them before looking."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    EventsWorker.drain_all(timeout=30)


def _prefect_database() -> Path:
    """The test server's SQLite file: ``prefect_test_harness`` puts it in a temp folder of its own,
    not under PREFECT_HOME, so it is found through the setting the harness changed."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    url = str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value())
    assert url.startswith("sqlite"), url
    return Path(url.split(":///", 1)[1])


def test_canaries_reached_every_place_they_could_leak_from(canary_run: CanaryRun) -> None:
    prep, promotion, monitor = canary_run.result.preprocess, canary_run.result.promotion, canary_run.result.monitor
    assert prep is not None and promotion is not None and monitor is not None  # every stage ran
    usable = [s for s in canary_run.config.site_ids if s != REJECTED]
    processed = {s: canary_run.config.site(s).processed_dir for s in usable}
    train = {s: pd.read_parquet(processed[s] / "train.parquet") for s in usable}
    test = {s: pd.read_parquet(processed[s] / "test.parquet") for s in usable}

    rejected = prep.fingerprints[REJECTED].contract
    assert sorted(prep.usable_sites) == usable
    assert {item.column for item in rejected.failed} >= set(UNDECLARED)  # the failure path ran
    for site_id in usable:  # numeric canaries were trained on, the rare group was evaluated
        assert all((train[site_id][column] == value).sum() > 0 for column, value in NUMBERS.items())
        assert (test[site_id]["group"] == GROUP).sum() > 0
    assert promotion.champion  # the model and its files were written
    assert sorted(monitor.summaries) == usable  # drift ran on both windows


def test_a_group_too_small_to_judge_is_not_named_by_its_site(canary_run: CanaryRun) -> None:
    evaluation = canary_run.result.evaluation
    assert evaluation is not None

    named = {name for site in evaluation.candidate.sites for name in site.groups}

    assert named == {"female", "male"}  # the rare group's rows still count in each site's overall counts


def test_no_canary_appears_outside_the_sites(canary_run: CanaryRun) -> None:
    state = canary_run.state
    stores = {
        "MLflow database": state.mlflow_db,
        "MLflow artifacts": state.mlflow_artifacts,
        "artifact store": state.artifacts,
        "audit log": state.audit_log,
        "Prefect database": canary_run.prefect_db,
        "Prefect home": canary_run.prefect_home,
        "captured logs": canary_run.captured / "records.log",
    }

    found = scan(canary_run.scan_roots(), planted_canaries(canary_run.config), skip=canary_run.site_roots())

    assert [name for name, place in stores.items() if not found.covers(place)] == []
    assert not any(site in f.parents for f in found.files for site in canary_run.site_roots())
    assert found.hits == (), found.report()


def test_the_scan_sees_what_the_run_logged(canary_run: CanaryRun) -> None:
    logged = Canaries({"the evaluate flow's log line": "verdict: "})

    found = scan([canary_run.prefect_db.parent, canary_run.captured], logged)

    places = {hit.path.parent for hit in found.hits}
    assert {canary_run.prefect_db.parent, canary_run.captured} <= places


def test_the_scanner_finds_canaries_written_into_a_copy_of_the_stores(canary_run: CanaryRun, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    state = StateLayout(tmp_path / "state")
    shutil.copytree(canary_run.state.root, state.root)
    client = MlflowClient(tracking_uri=state.tracking_uri)
    run_id = canary_run.result.run_id
    client.log_metric(run_id, "leaked", NUMBERS["balance"])  # a REAL: stored big-endian inside SQLite
    client.set_tag(run_id, "leaked", PII["email"])
    LocalArtifactStore(state.artifacts).put_weights("leaked.npz", [np.array([NUMBERS["age"]], dtype=np.float32)])
    with gzip.open(state.root / "leaked.log.gz", "wt", encoding="utf-8") as stream:
        stream.write(f"customer {PII['name']}\n")

    found = scan([state.root], planted_canaries(canary_run.config))

    hits = {(hit.path.name, hit.where.split(".")[0], hit.label) for hit in found.hits}
    assert ("mlflow.db", "metrics", "balance as REAL") in hits
    assert ("mlflow.db", "tags", "PII email") in hits
    assert ("leaked.npz", "arr_0", "age as float32") in hits
    assert ("leaked.log.gz", "gunzipped", "PII name") in hits


def _sqlite(value: object) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("CREATE TABLE runs (payload)")
            db.execute("INSERT INTO runs VALUES (?)", (value,))
            db.commit()

    return write


def _parquet(column: str, value: object) -> Callable[[Path], None]:
    return lambda path: pd.DataFrame({column: [value, value, None]}).to_parquet(path)


def _npz(value: float) -> Callable[[Path], None]:
    return lambda path: np.savez_compressed(path, np.array([value], dtype=np.float32))


@pytest.mark.parametrize(
    ("write", "where", "label"),
    [
        # long text is split over overflow pages, with a page pointer that can fall inside the value
        (_sqlite("x" * 4090 + PII["name"] + "y" * 9000), "runs.payload", "name"),
        (_sqlite(NUMBERS["balance"]), "runs.payload", "balance as REAL"),  # SQLite stores a REAL big-endian
        (_parquet("notes", f"call {PII['email']}"), "column notes", "email"),  # pages are snappy-compressed
        (_parquet("balance", NUMBERS["balance"]), "column balance", "balance as a value"),
        (_npz(NUMBERS["age"]), "arr_0.npy", "age as float32"),  # deflated: the bytes show only once unzipped
        (lambda p: p.write_bytes(gzip.compress(PII["phone"].encode())), "gunzipped", "phone"),
        (lambda p: p.write_text(PII["name"], encoding="utf-16-le"), "", "name as UTF-16"),  # a Windows export
        (lambda p: p.write_text(json.dumps({"mean": NUMBERS["balance"]})), "", "balance as text"),
        (lambda p: p.write_text(PII["email"].upper()), "", "email"),  # a re-cased copy
    ],
    ids=["sqlite-overflow", "sqlite-real", "parquet-text", "parquet-float", "npz", "gzip", "utf16", "json", "upper"],
)
def test_the_scanner_finds_a_canary_however_it_is_stored(
    tmp_path: Path, write: Callable[[Path], None], where: str, label: str
) -> None:
    write(tmp_path / "store")

    found = scan([tmp_path], Canaries(PII, NUMBERS))

    assert (where, label) in {(hit.where, hit.label) for hit in found.hits}

"""The work a site does on its own data, as plain functions any runner can call.

Each function reads only the site's own folder and returns only what may leave the site: a data
fingerprint, a model update with its example count, evaluation counts, or a drift summary.
"""

from __future__ import annotations

import functools
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from quorum.configs.errors import SiteDataError
from quorum.configs.schema import FeatureConfig, FederationConfig, SiteConfig
from quorum.evaluation.report import SiteEvaluation
from quorum.tasks.contract import ContractSummary, validate_contract
from quorum.tasks.data import read_table, require_columns
from quorum.tasks.features import GROUP, LABEL, Moments, clean, schema_hash, split_train_test, to_matrix
from quorum.tasks.hashing import directory_md5
from quorum.tasks.pii import protect_pii

if TYPE_CHECKING:
    import pandas as pd

    from quorum.evaluation.drift import DriftSummary
    from quorum.tasks.weights import Weights

TRAIN_FILE = "train.parquet"
TEST_FILE = "test.parquet"
SPLIT_CACHE_SIZE = 32  # splits kept in memory per process: both splits of 16 sites


@dataclass(frozen=True)
class DataFingerprint:
    """What a site proves about the data it will train on, without sharing any of it."""

    site_id: str
    data_hash: str
    raw_rows: int
    train_rows: int
    test_rows: int
    schema_hash: str
    contract: ContractSummary
    moments: Moments | None

    @property
    def usable(self) -> bool:
        return self.contract.passed and self.moments is not None


@dataclass(frozen=True)
class SiteUpdate:
    site_id: str
    server_round: int
    weights: list[NDArray[np.float32]]
    num_examples: int
    train_loss: float
    train_s: float = 0.0  # local training time, to tell coordination overhead from work


def preprocess_site(config: FederationConfig, site_id: str) -> DataFingerprint:
    """Raw file -> PII gone -> contract -> clean features -> train/test split, written atomically.

    A site whose contract fails keeps its previous processed data untouched and reports the
    failure in its fingerprint; the coordinator decides whether the job can go on without it.
    """
    site = config.site(site_id)
    raw = read_table(site.data_path, site.id)
    require_columns(raw, [site.target], site.data_path, site.id)
    raw = protect_pii(raw, site)
    contract = validate_contract(raw, config.features, config.contract, site, report_dir=site.reports_dir)
    if not contract.passed:
        return DataFingerprint(site.id, "", len(raw), 0, 0, schema_hash(config.features), contract, None)
    frame = clean(raw, site, config.features)
    train, test = split_train_test(frame, config.training.test_fraction, seed=config.seed)
    moments = Moments.of(to_matrix(train, config.features))  # before writing: a failure here keeps the old data
    _write_processed(site.processed_dir, {TRAIN_FILE: train, TEST_FILE: test})
    return DataFingerprint(
        site_id=site.id,
        data_hash=directory_md5(site.processed_dir),
        raw_rows=len(raw),
        train_rows=len(train),
        test_rows=len(test),
        schema_hash=schema_hash(config.features),
        contract=contract,
        moments=moments,
    )


def _write_processed(target: Path, parts: dict[str, pd.DataFrame]) -> None:
    """Write into a sibling folder, then swap, so readers see the old or the new data, never half."""
    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, frame in parts.items():
        frame.to_parquet(staging / name, index=False)
    retired = target.with_name(f".{target.name}.retired")
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)


def load_split(
    config: FederationConfig, site: SiteConfig, split: str
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.str_]]:
    """The model matrix, labels and protected groups of a processed split (read-only arrays, cached).

    Every round asks for the same split again; reading the parquet file and building the matrix costs
    ~10 ms per site per round, so the result is cached on what it is a function of: the file's identity
    (path, mtime, size) and the feature schema. A rewritten split has a new mtime or size, so it is read anew.
    """
    path = site.processed_dir / (TRAIN_FILE if split == "train" else TEST_FILE)
    if not path.is_file():
        raise SiteDataError(
            f"site {site.id} has no processed {split} data at {path}",
            fix=f"run `quorum preprocess --site {site.id}` (or the whole lifecycle) first",
        )
    stat = path.stat()
    return _read_split(path, stat.st_mtime_ns, stat.st_size, config.features.model_dump_json())


@functools.lru_cache(maxsize=SPLIT_CACHE_SIZE)
def _read_split(
    path: Path, mtime_ns: int, size: int, features_json: str
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.str_]]:
    """A pure function of its arguments (``mtime_ns`` and ``size`` only key the cache), so caching it is safe."""
    import pandas as pd

    frame = pd.read_parquet(path)
    arrays = (
        to_matrix(frame, FeatureConfig.model_validate_json(features_json)),
        frame[LABEL].to_numpy(dtype=np.float32),
        frame[GROUP].to_numpy(dtype=str),
    )
    for array in arrays:
        array.flags.writeable = False  # shared by every later round: nobody may change it in place
    return arrays


def train_site(config: FederationConfig, site_id: str, weights: Weights, server_round: int) -> SiteUpdate:
    from quorum.tasks.training import LocalTrainingConfig, train_local

    site = config.site(site_id)
    features, labels, _ = load_split(config, site, "train")
    index = config.site_ids.index(site_id)
    local = LocalTrainingConfig(
        hidden_sizes=config.model.hidden_sizes,
        dropout=config.model.dropout,
        local_epochs=config.training.local_epochs,
        batch_size=config.training.batch_size,
        learning_rate=config.training.learning_rate,
        balanced=config.training.positive_weight == "balanced",
        seed=config.seed * 100_003 + server_round * 1_009 + index,
        proximal_mu=config.training.proximal_mu,  # 0 unless strategy is fedprox (the schema enforces it)
        freeze_layers=config.training.freeze_layers,
    )
    started = time.perf_counter()
    result = train_local(weights, features, labels, local)
    elapsed = time.perf_counter() - started
    return SiteUpdate(site_id, server_round, result.weights, result.num_examples, result.train_loss, elapsed)


def evaluate_site(config: FederationConfig, site_id: str, weights: Weights) -> SiteEvaluation:
    from quorum.tasks.training import evaluate_local, predict_scores

    site = config.site(site_id)
    features, labels, groups = load_split(config, site, "test")
    scores = predict_scores(weights, features, config.model.hidden_sizes)
    return _without_small_groups(evaluate_local(site_id, scores, labels, groups), config.gates.min_group_size)


def _without_small_groups(evaluation: SiteEvaluation, min_group_size: int) -> SiteEvaluation:
    """Name only the protected groups with at least ``min_group_size`` test examples at this site.

    A group's name is a raw value of the protected column, and no config declares those values: a rare
    or mistyped one (one person's free text) would leave the site as a key, with that person's
    confusion counts under it. A smaller group is too small for the fairness gate to judge here; its
    examples still count in ``overall``, and a group is judged pooled over the sites that do name it.
    """
    kept = {name: counts for name, counts in evaluation.groups.items() if counts.n >= min_group_size}
    return replace(evaluation, groups=kept)


def monitor_site(config: FederationConfig, site_id: str, champion: Weights | None) -> DriftSummary:
    """Compare the training snapshot with the site's current window; the full report stays here."""
    from quorum.evaluation.drift import check_drift
    from quorum.tasks.training import predict_scores

    site = config.site(site_id)
    if site.current_path is None:
        raise SiteDataError(f"site {site.id} has no current window configured", fix="set `current:` for the site")
    import pandas as pd

    reference = pd.read_parquet(_processed_file(site, TRAIN_FILE))
    raw = protect_pii(read_table(site.current_path, site.id), site)
    missing = [c for c in config.features.columns if c not in raw.columns]
    # Labels arrive later than features and drift compares only features and scores: a current
    # window without (or with partial) labels is normal, so the target is not read from it.
    unlabelled = raw.assign(**{site.target: 0})
    current = clean(
        unlabelled.reindex(columns=[*config.features.columns, site.target, *_protected(site)]), site, config.features
    )
    current = current.drop(columns=missing)
    scores: tuple[NDArray[np.float64] | None, NDArray[np.float64] | None] = (None, None)
    skipped: tuple[str, ...] = ()
    if champion is not None and missing:
        skipped = (f"prediction drift not checked: the champion needs the missing column(s) {', '.join(missing)}",)
    elif champion is not None:
        hidden = config.model.hidden_sizes
        scores = (
            predict_scores(champion, to_matrix(reference, config.features), hidden),
            predict_scores(champion, to_matrix(current, config.features), hidden),
        )
    summary = check_drift(
        reference,
        current,
        site_id=site.id,
        numeric=list(config.features.numeric),
        categorical=list(config.features.categorical),
        config=config.drift,
        reference_scores=scores[0],
        current_scores=scores[1],
        report_dir=site.reports_dir,
    )
    return replace(summary, problems=summary.problems + skipped)


def _protected(site: SiteConfig) -> list[str]:
    return [site.protected_attribute] if site.protected_attribute else []


def _processed_file(site: SiteConfig, name: str) -> Path:
    path = site.processed_dir / name
    if not path.is_file():
        raise SiteDataError(f"site {site.id} has no processed data at {path}", fix="run the lifecycle first")
    return path

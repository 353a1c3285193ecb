"""Site-side cleaning and feature building over the federation's shared schema.

The processed table keeps the feature columns in their own types (drift checks need them), plus
``label`` and ``group``; PII and ids are gone. The model matrix is derived from it on demand, so the
one-hot layout depends only on the configured categorical domains and is identical at every site.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from quorum.configs.errors import SiteDataError
from quorum.configs.schema import FeatureConfig, SiteConfig

if TYPE_CHECKING:
    import pandas as pd

LABEL = "label"
GROUP = "group"


def feature_names(features: FeatureConfig) -> list[str]:
    names = list(features.numeric)
    for column, domain in features.categorical.items():
        names += [f"{column}={value}" for value in domain]
    return names


def schema_hash(features: FeatureConfig) -> str:
    """Digest of the model-input layout: two sites with the same hash produce compatible matrices."""
    return hashlib.sha256(json.dumps(feature_names(features)).encode()).hexdigest()[:16]


def clean(raw: pd.DataFrame, site: SiteConfig, features: FeatureConfig) -> pd.DataFrame:
    """Keep the shared feature columns, a 0/1 ``label`` and the protected ``group``; drop all else."""
    import pandas as pd

    frame = pd.DataFrame(index=raw.index)
    for column in features.numeric:
        frame[column] = pd.to_numeric(raw[column], errors="coerce").astype("float64")
    for column in features.categorical:
        frame[column] = raw[column].astype("string")
    labels = pd.to_numeric(raw[site.target], errors="coerce")
    bad = int((~labels.isin([0, 1])).sum())
    if bad:
        raise SiteDataError(
            f"site {site.id}: target column {site.target!r} has {bad} value(s) that are not 0/1",
            fix="encode the target as 0/1 and drop rows without a label",
        )
    frame[LABEL] = labels.astype("int8")
    group = raw[site.protected_attribute] if site.protected_attribute else pd.Series("all", index=raw.index)
    frame[GROUP] = group.astype("string").fillna("unknown")
    return frame.reset_index(drop=True)


def to_matrix(frame: pd.DataFrame, features: FeatureConfig) -> NDArray[np.float32]:
    """Numeric columns (nulls imputed by the column median) then one-hot blocks in domain order."""
    blocks = []
    for column in features.numeric:
        values = frame[column].to_numpy(dtype=np.float64, na_value=np.nan)
        median = np.nanmedian(values) if np.isfinite(values).any() else 0.0
        blocks.append(np.where(np.isnan(values), median, values)[:, None])
    for column, domain in features.categorical.items():
        values = frame[column].astype("string").fillna("").to_numpy(dtype=object)  # a null matches no value
        blocks.append(np.stack([values == value for value in domain], axis=1).astype(np.float64))
    return np.hstack(blocks).astype(np.float32)


def split_train_test(frame: pd.DataFrame, test_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded split stratified on the label, so small imbalanced sites keep positives in both parts."""
    rng = np.random.default_rng(seed)
    test_index: list[int] = []
    for _, part in frame.groupby(LABEL, sort=True):
        index = part.index.to_numpy()
        take = round(len(index) * test_fraction)
        test_index += rng.permutation(index)[:take].tolist()
    is_test = frame.index.isin(test_index)
    return frame[~is_test].reset_index(drop=True), frame[is_test].reset_index(drop=True)


@dataclass(frozen=True)
class Moments:
    """Per-feature count, sum and sum of squares: enough to standardise, too little to rebuild rows."""

    count: int
    total: tuple[float, ...]
    total_sq: tuple[float, ...]

    @classmethod
    def of(cls, matrix: NDArray[np.float32]) -> Moments:
        data = matrix.astype(np.float64)
        return cls(len(data), tuple(data.sum(axis=0).tolist()), tuple((data**2).sum(axis=0).tolist()))


def merge_moments(parts: list[Moments]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    count = sum(p.count for p in parts)
    total = np.sum([p.total for p in parts], axis=0)
    total_sq = np.sum([p.total_sq for p in parts], axis=0)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean, np.where(std < 1e-6, 1.0, std)

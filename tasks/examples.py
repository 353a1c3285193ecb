"""Real public data for trying Quorum: datasets that ship inside installed packages, so nothing is downloaded.

``breast-cancer`` is the Wisconsin Diagnostic Breast Cancer set (569 tumours, 30 numeric features
computed from images of fine-needle aspirates; Street, Wolberg & Mangasarian 1993) as bundled with
scikit-learn (``sklearn/datasets/data/breast_cancer.csv``). It is split across three sites by one
documented rule that makes the sites differ the way real clinics do (non-IID):

* rows are ranked by ``mean_texture`` and cut at its tertiles: ``clinic-a`` gets the lowest third,
  ``clinic-b`` the middle, ``clinic-c`` the highest (malignant rate about 11%, 37% and 63%);
* within a site, a seeded shuffle puts 75% of its rows in ``raw/train.csv`` (the training window) and
  the rest in ``raw/current.csv`` (the later window drift monitoring compares against).

Columns are renamed to snake_case, the target is ``malignant`` (1 = malignant; scikit-learn's own
``target`` is 1 for benign) and ``sample_id`` is the row's position in the bundled file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quorum.configs.errors import ConfigError, ToolError

if TYPE_CHECKING:
    import pandas as pd

BREAST_CANCER = "breast-cancer"
SITES = ("clinic-a", "clinic-b", "clinic-c")
SPLIT_COLUMN = "mean_texture"
TRAIN_SHARE = 0.75
SEED = 20240601


@dataclass(frozen=True)
class ExampleSite:
    site_id: str
    train: pd.DataFrame
    current: pd.DataFrame


def breast_cancer_frame() -> pd.DataFrame:
    """The bundled table with snake_case columns, ``sample_id`` first and ``malignant`` last."""
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError as exc:
        raise ToolError(f"scikit-learn cannot be imported: {exc}", fix="pip install scikit-learn") from exc
    bunch = load_breast_cancer(as_frame=True)
    features = bunch.data.rename(columns=lambda name: str(name).replace(" ", "_"))
    frame = features.assign(malignant=(1 - bunch.target).astype(int))
    frame.insert(0, "sample_id", np.arange(len(frame)))
    return frame


def split_sites(frame: pd.DataFrame, seed: int = SEED) -> tuple[ExampleSite, ...]:
    """The documented rule: tertiles of ``mean_texture``, then a seeded 75/25 train/current split per site."""
    import pandas as pd

    third = pd.qcut(frame[SPLIT_COLUMN], len(SITES), labels=False)
    rng = np.random.default_rng(seed)
    sites = []
    for index, site_id in enumerate(SITES):
        rows = frame[third == index]
        order = rng.permutation(len(rows))
        cut = round(len(rows) * TRAIN_SHARE)
        train = rows.iloc[np.sort(order[:cut])].reset_index(drop=True)
        current = rows.iloc[np.sort(order[cut:])].reset_index(drop=True)
        sites.append(ExampleSite(site_id, train, current))
    return tuple(sites)


def write_example(name: str, out: Path) -> list[Path]:
    """Write each site's ``raw/train.csv`` and ``raw/current.csv`` below ``out/<site>``; nothing else."""
    if name != BREAST_CANCER:
        raise ConfigError(f"no example named {name!r}", fix=f"use one of: {BREAST_CANCER}")
    written = []
    for site in split_sites(breast_cancer_frame()):
        raw = out / site.site_id / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for file_name, part in (("train.csv", site.train), ("current.csv", site.current)):
            path = raw / file_name
            part.to_csv(path, index=False)
            written.append(path)
    return written

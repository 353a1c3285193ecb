"""A deterministic demo federation: four customer-churn sites that differ the way real ones do.

Each site gets its own size, feature distributions and churn rate (non-IID), raw PII columns that
must never leave it, a protected attribute, and a later "current" window in which some sites drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quorum.configs.schema import FederationConfig, SiteConfig

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class SiteProfile:
    rows: int
    age_mean: float
    income_mean: float
    urban_share: float
    online_share: float
    churn_shift: float
    drift: bool


PROFILES = (
    SiteProfile(
        rows=2400, age_mean=44, income_mean=58_000, urban_share=0.7, online_share=0.5, churn_shift=0.0, drift=False
    ),
    SiteProfile(
        rows=1500, age_mean=51, income_mean=47_000, urban_share=0.3, online_share=0.3, churn_shift=0.3, drift=True
    ),
    SiteProfile(
        rows=900, age_mean=38, income_mean=64_000, urban_share=0.8, online_share=0.7, churn_shift=-0.2, drift=False
    ),
    SiteProfile(
        rows=1800, age_mean=47, income_mean=52_000, urban_share=0.5, online_share=0.4, churn_shift=0.1, drift=True
    ),
)
FIRST = ("Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kofi", "Lena")
LAST = ("Smith", "Okafor", "Novak", "Garcia", "Kim", "Muller", "Rossi", "Silva", "Tanaka", "Ivanova")


def synth_site(site: SiteConfig, profile: SiteProfile, seed: int, *, drifted: bool = False) -> pd.DataFrame:
    """One window of one site's raw table, PII included."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    n = profile.rows if not drifted else max(profile.rows // 2, 200)
    shift = 1.0 if drifted and profile.drift else 0.0
    age = np.clip(rng.normal(profile.age_mean + 9 * shift, 12, n), 18, 95).round()
    income = np.clip(rng.lognormal(np.log(profile.income_mean * (1 - 0.3 * shift)), 0.45, n), 8_000, 400_000).round(-2)
    income[rng.random(n) < 0.01] = np.nan
    tenure = rng.integers(1, 120, n)
    products = rng.integers(1, 5, n)
    balance = np.maximum(rng.normal(12_000, 9_000, n), 0).round(2)
    credit = np.clip(rng.normal(650 - 40 * shift, 80, n), 300, 850).round()
    region = rng.choice(["urban", "suburban", "rural"], n, p=_three(profile.urban_share))
    online = min(profile.online_share + 0.35 * shift, 0.95)
    channel = rng.choice(["online", "branch", "phone"], n, p=_three(online))
    gender = rng.choice(["female", "male"], n, p=[0.52, 0.48])
    logit = (
        -1.6
        + profile.churn_shift
        - 0.025 * (tenure - 60)
        + 0.6 * (products == 1)
        - 0.4 * (products >= 3)
        - 0.006 * (credit - 650)
        + 0.5 * (channel == "online")
        + 0.02 * (age - 45)
        - 0.4 * np.log(np.nan_to_num(income, nan=50_000) / 50_000)
    )
    churned = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    first, last = rng.choice(FIRST, n), rng.choice(LAST, n)
    ids = np.arange(n) + (1_000_000 if drifted else 0)
    return pd.DataFrame(
        {
            "customer_id": [f"{site.id}-{i:07d}" for i in ids],
            "name": [f"{a} {b}" for a, b in zip(first, last, strict=True)],
            "email": [f"{a.lower()}.{b.lower()}{i}@example.org" for a, b, i in zip(first, last, ids, strict=True)],
            "phone": [f"+1-555-{rng.integers(100, 999)}-{rng.integers(1000, 9999)}" for _ in range(n)],
            "age": age,
            "income": income,
            "tenure_months": tenure,
            "num_products": products,
            "balance": balance,
            "credit_score": credit,
            "region_type": region,
            "channel": channel,
            "gender": gender,
            "churned": churned,
        }
    )


def _three(first_share: float) -> list[float]:
    rest = 1.0 - first_share
    return [first_share, rest * 0.6, rest * 0.4]


def synth_federation(config: FederationConfig, *, overwrite: bool = False) -> list[Path]:
    """Write each site's training window and current window into that site's own folder."""
    written = []
    for index, site in enumerate(config.sites):
        profile = PROFILES[index % len(PROFILES)]
        targets = [(site.data_path, False)]
        if site.current_path is not None:
            targets.append((site.current_path, True))
        for path, drifted in targets:
            if path.exists() and not overwrite:
                continue
            frame = synth_site(site, profile, seed=config.seed * 1000 + index * 10 + int(drifted), drifted=drifted)
            _write_atomic(frame, path)
            written.append(path)
    return written


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix.lower() == ".csv":
        frame.to_csv(tmp, index=False)
    else:
        frame.to_parquet(tmp, index=False)
    tmp.replace(path)

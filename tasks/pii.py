"""Removing personal data before anything else at a site touches the table."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from configs.schema import SiteConfig


def drop_pii(raw: pd.DataFrame, site: SiteConfig) -> pd.DataFrame:
    """Drop the configured PII columns: nothing downstream may ever see them.

    The record id stays for the contract's uniqueness check; ``features.clean`` drops it next.
    """
    doomed = [c for c in site.pii_columns if c in raw.columns]
    return raw.drop(columns=doomed)

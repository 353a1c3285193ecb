"""A first data contract, generated from a profile of one site's reference snapshot.

Writing a contract by hand for dozens of columns is where ranges get guessed; profiling a snapshot the
site trusts gives a starting point that a person then reviews, commits and edits. Both outputs hold
observed facts about the site's data (ranges, category values, null rates), so the profile stays in
the site's report folder, and the contract must be reviewed before it is committed or shared.

Only the columns the federation config names are profiled (features, target, id): free-text columns
the config does not know about may hold personal data and are never read into the profile.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import yaml

from quorum.configs.schema import ContractConfig, FeatureConfig, FederationConfig, SiteConfig
from quorum.tasks.data import read_table, require_columns
from quorum.tasks.pii import protect_pii

if TYPE_CHECKING:
    import pandas as pd

PROFILE_NAME = "profile.json"


@dataclass(frozen=True)
class ColumnProfile:
    """What one column of the snapshot looks like; ``values`` only for categorical features."""

    name: str
    kind: str  # "numeric" or "categorical": the role the shared schema gives it
    dtype: str
    null_fraction: float
    minimum: float | None = None
    maximum: float | None = None
    non_numeric: int = 0
    values: tuple[str, ...] = ()
    unknown_rows: int = 0  # rows whose category is not in features.categorical


@dataclass(frozen=True)
class DataProfile:
    site_id: str
    source: str
    rows: int
    label_rate: float
    non_binary_labels: int
    columns: tuple[ColumnProfile, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Margins:
    """How far a generated contract reaches beyond what the snapshot showed."""

    range_fraction: float = 0.1  # of the observed span, added below the minimum and above the maximum
    null_fraction: float = 0.02  # added to each column's observed null rate
    label_rate: float = 0.1  # added either side of the observed label rate
    rows_factor: float = 10.0  # row bounds: rows / factor to rows * factor


def read_snapshot(config: FederationConfig, site_id: str) -> pd.DataFrame:
    """The site's training file with PII dropped or hashed first, exactly as preprocessing sees it."""
    site = config.site(site_id)
    raw = read_table(site.data_path, site.id)
    require_columns(raw, [site.target, *config.features.columns], site.data_path, site.id)
    return protect_pii(raw, site)


def profile_site(config: FederationConfig, site_id: str) -> DataProfile:
    site = config.site(site_id)
    return profile_frame(read_snapshot(config, site_id), site, config.features, source=str(site.data_path))


def profile_frame(frame: pd.DataFrame, site: SiteConfig, features: FeatureConfig, source: str = "") -> DataProfile:
    import pandas as pd

    columns = []
    for name in features.numeric:
        values = pd.to_numeric(frame[name], errors="coerce")
        present = values.dropna()
        columns.append(
            ColumnProfile(
                name=name,
                kind="numeric",
                dtype=str(frame[name].dtype),
                null_fraction=float(frame[name].isna().mean()),
                minimum=float(present.min()) if len(present) else None,
                maximum=float(present.max()) if len(present) else None,
                non_numeric=int(values.isna().sum() - frame[name].isna().sum()),
            )
        )
    for name, domain in features.categorical.items():
        text = frame[name].dropna().astype(str)
        seen = set(text.unique())
        columns.append(
            ColumnProfile(
                name=name,
                kind="categorical",
                dtype=str(frame[name].dtype),
                null_fraction=float(frame[name].isna().mean()),
                values=tuple(value for value in domain if value in seen),
                unknown_rows=int((~text.isin(domain)).sum()),
            )
        )
    labels = pd.to_numeric(frame[site.target], errors="coerce")
    binary = labels[labels.isin([0, 1])]
    return DataProfile(
        site_id=site.id,
        source=source,
        rows=len(frame),
        label_rate=float(binary.mean()) if len(binary) else 0.0,
        non_binary_labels=int(len(labels) - len(binary)),
        columns=tuple(columns),
    )


def contract_from_profile(profile: DataProfile, margins: Margins = Margins()) -> tuple[ContractConfig, list[str]]:
    """The contract the profile suggests, and notes on what a reviewer must look at first."""
    notes = []
    ranges: dict[str, tuple[float, float]] = {}
    nulls: dict[str, float] = {}
    domains: dict[str, tuple[str, ...]] = {}
    for column in profile.columns:
        nulls[column.name] = _round_up(min(1.0, column.null_fraction + margins.null_fraction), 4)
        if column.kind == "numeric":
            if column.minimum is None or column.maximum is None:
                notes.append(f"column {column.name!r} has no numeric values: no range was written")
            else:
                ranges[column.name] = widen(column.minimum, column.maximum, margins.range_fraction)
            if column.non_numeric:
                notes.append(f"column {column.name!r}: {column.non_numeric} values are not numbers")
        elif column.values:
            domains[column.name] = column.values
        if column.unknown_rows:
            notes.append(
                f"column {column.name!r}: {column.unknown_rows} rows hold categories outside features.categorical; "
                "they are left out of the contract, which will fail this data until it or the schema is fixed"
            )
    if profile.non_binary_labels:
        notes.append(f"the target has {profile.non_binary_labels} values that are not 0/1 labels")
    low_rate = max(0.0, _round_down(profile.label_rate - margins.label_rate, 3))
    high_rate = min(1.0, _round_up(profile.label_rate + margins.label_rate, 3))
    contract = ContractConfig(
        min_rows=max(1, math.floor(profile.rows / margins.rows_factor)),
        max_rows=max(1, math.ceil(profile.rows * margins.rows_factor)),
        max_null_fraction=max(nulls.values(), default=0.05),
        numeric_ranges=ranges,
        label_rate=(low_rate, high_rate),
        null_fractions=nulls,
        categorical_domains=domains,
    )
    return contract, notes


def widen(minimum: float, maximum: float, fraction: float) -> tuple[float, float]:
    """``[minimum, maximum]`` padded by ``fraction`` of its span and rounded outward to the pad's scale.

    A column never seen negative keeps a lower bound of 0: an age or an amount below zero is an
    error the contract should catch, not a value the margin should admit.
    """
    span = maximum - minimum
    pad = fraction * span if span > 0 else fraction * max(abs(maximum), 1.0)
    step = 10.0 ** math.floor(math.log10(pad)) if pad > 0 else 1.0
    digits = max(0, -math.floor(math.log10(step)))
    low = round(math.floor((minimum - pad) / step) * step, digits)
    high = round(math.ceil((maximum + pad) / step) * step, digits)
    if minimum >= 0 > low:
        low = 0.0
    return float(low), float(high)


def _round_up(value: float, digits: int) -> float:
    scale = 10.0**digits
    return math.ceil(value * scale - 1e-9) / scale


def _round_down(value: float, digits: int) -> float:
    scale = 10.0**digits
    return math.floor(value * scale + 1e-9) / scale


def contract_document(contract: ContractConfig, profile: DataProfile, margins: Margins) -> str:
    """The contract as commented YAML: what it was made from, and that a person must review it."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    lines = (
        f"Data contract generated by `quorum contract init` on {stamp} from site {profile.site_id}'s snapshot",
        f"of {profile.rows} rows. REVIEW BEFORE COMMITTING OR SHARING: the bounds below come from that site's",
        f"observed data (numeric ranges widened by {margins.range_fraction:g} of the observed span, row bounds",
        f"by a factor of {margins.rows_factor:g}, the label rate by +-{margins.label_rate:g}, null rates by "
        f"+{margins.null_fraction:g}).",
        "Edit them to the bounds every site's data should meet, then name this file in the federation",
        "config as `contract_file: <path relative to the config>` (instead of an inline `contract:`).",
    )
    header = "".join(f"# {line}\n" for line in lines)
    body = yaml.dump(contract.model_dump(mode="json"), Dumper=_ContractDumper, sort_keys=False, width=100)
    return header + body


class _ContractDumper(yaml.SafeDumper):
    """Block mappings with one line per column, and ``[low, high]`` pairs and domains on one line."""


def _flow_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_ContractDumper.add_representer(list, _flow_list)

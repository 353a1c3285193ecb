"""PII hashing: a salted HMAC per site, the salt kept at the site, no raw value in processed data."""

from __future__ import annotations

import stat
from pathlib import Path

import pandas as pd
import pytest
import yaml

from quorum.configs.errors import ConfigError, SiteDataError
from quorum.configs.schema import SiteConfig, load_federation
from quorum.tasks.pii import SALT_BYTES, SALT_FILE, hash_pii, protect_pii, site_salt
from tests.canary import PII, Canaries, scan
from tests.federation import write_federation


def site(root: Path, mode: str = "hash") -> SiteConfig:
    return SiteConfig(id="north", root=root, pii_columns=("name", "email"), pii_mode=mode)  # type: ignore[arg-type]


def people() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "name": ["Ada Smith", "Ben Kim", "Ada Smith", None],
            "email": ["ada@example.org", "ben@example.org", "ada@example.org", "dee@example.org"],
            "age": [30, 40, 30, 50],
        }
    )


def test_salt_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    first = site_salt(tmp_path)
    second = site_salt(tmp_path)

    path = tmp_path / SALT_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first == second and len(first) == SALT_BYTES
    assert [p.name for p in tmp_path.iterdir()] == [SALT_FILE]  # no temp file left behind


def test_hashing_is_deterministic_within_a_site_and_keeps_joins(tmp_path: Path) -> None:
    hashed = protect_pii(people(), site(tmp_path))
    again = protect_pii(people(), site(tmp_path))

    pd.testing.assert_frame_equal(hashed, again)
    assert hashed.loc[0, "name"] == hashed.loc[2, "name"] != hashed.loc[1, "name"]  # equal values stay equal
    assert pd.isna(hashed.loc[3, "name"])  # a null is not turned into the hash of "None"
    assert all(len(value) == 64 for value in hashed["email"])
    assert hashed["age"].tolist() == [30, 40, 30, 50]


def test_two_sites_hash_the_same_value_differently(tmp_path: Path) -> None:
    north = protect_pii(people(), site(tmp_path / "north"))
    south = protect_pii(people(), site(tmp_path / "south"))

    assert site_salt(tmp_path / "north") != site_salt(tmp_path / "south")
    assert set(north["email"]).isdisjoint(south["email"])


def test_no_raw_value_survives_hashing(tmp_path: Path) -> None:
    raw = people()

    hashed = hash_pii(raw, site(tmp_path), b"s" * SALT_BYTES)

    text = hashed.to_csv(index=False)
    assert not any(value in text for value in ("Ada Smith", "Ben Kim", "ada@example.org", "dee@example.org"))
    assert raw.loc[0, "name"] == "Ada Smith"  # the caller's frame is not changed


def test_drop_mode_removes_the_columns(tmp_path: Path) -> None:
    dropped = protect_pii(people(), site(tmp_path, mode="drop"))

    assert list(dropped.columns) == ["age"]
    assert not (tmp_path / SALT_FILE).exists()  # no salt needed, none created


@pytest.mark.parametrize(
    ("mode", "content", "fragment"),
    [
        (0o644, b"x" * SALT_BYTES, "may be read by other users (mode 0644)"),  # copied without its mode
        (0o600, b"short", "holds 5 bytes"),  # truncated by a bad restore
    ],
    ids=["readable-by-others", "truncated"],
)
def test_unsafe_salt_is_refused(tmp_path: Path, mode: int, content: bytes, fragment: str) -> None:
    path = tmp_path / SALT_FILE
    path.write_bytes(content)
    path.chmod(mode)

    with pytest.raises(SiteDataError) as caught:
        site_salt(tmp_path)

    assert fragment in caught.value.message and caught.value.fix


def test_unknown_pii_mode_is_a_config_error(tmp_path: Path) -> None:
    config_path = write_federation(tmp_path, site_ids=("alpha", "beta"))
    config = yaml.safe_load(config_path.read_text())
    config["sites"]["alpha"]["pii_mode"] = "mask"
    config_path.write_text(yaml.safe_dump(config))

    with pytest.raises(ConfigError, match=r"sites\.0\.pii_mode"):
        load_federation(config_path)


def test_canaries_never_reach_the_processed_data(tmp_path: Path) -> None:
    from quorum.tasks.site import preprocess_site

    config_path = write_federation(tmp_path, site_ids=("alpha", "beta"))
    config = yaml.safe_load(config_path.read_text())
    config["sites"]["alpha"]["pii_mode"] = "hash"
    config_path.write_text(yaml.safe_dump(config))
    federation = load_federation(config_path)
    alpha = federation.site("alpha")
    raw = pd.read_csv(alpha.data_path)
    raw = raw.assign(**PII)
    raw.to_csv(alpha.data_path, index=False)

    fingerprint = preprocess_site(federation, "alpha")

    assert fingerprint.usable, fingerprint.contract.describe()
    found = scan([alpha.processed_dir, alpha.reports_dir], Canaries(PII))  # parquet is decoded, not just grepped
    assert found.covers(alpha.processed_dir / "train.parquet") and found.covers(alpha.reports_dir)
    assert found.hits == (), found.report()
    processed = pd.read_parquet(alpha.processed_dir / "train.parquet")
    assert set(PII).isdisjoint(processed.columns)  # hashed columns are never features
    assert stat.S_IMODE((alpha.root / SALT_FILE).stat().st_mode) == 0o600

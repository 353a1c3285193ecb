"""The `quorum` command on bad input: a non-zero exit, `error:` and `fix:` lines, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from quorum.cli.main import main
from quorum.configs.schema import FederationConfig, load_federation
from quorum.tasks.synth import SiteProfile, synth_site
from tests.federation import FEATURES, site_entry

FEDERATION = {
    "name": "tiny",
    "model_name": "tiny-model",
    "seed": 3,
    "state_dir": "state",
    "features": FEATURES,
    "contract": {"min_rows": 50, "numeric_ranges": {"age": [18, 110]}, "label_rate": [0.02, 0.8]},
    "sites": {site_id: site_entry(site_id) for site_id in ("a", "b")},
}
PROFILE = SiteProfile(
    rows=300, age_mean=45, income_mean=50_000, urban_share=0.5, online_share=0.4, churn_shift=0.0, drift=False
)


def write_config(folder: Path, data: dict[str, object]) -> Path:
    path = folder / "federation.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def federation(tmp_path: Path) -> FederationConfig:
    """Two small sites with synthetic raw CSVs under tmp_path."""
    config = load_federation(write_config(tmp_path, FEDERATION))
    for index, site in enumerate(config.sites):
        site.data_path.parent.mkdir(parents=True)
        synth_site(site, PROFILE, seed=index).to_csv(site.data_path, index=False)
    return config


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def preprocess(capsys: pytest.CaptureFixture[str], config: FederationConfig, site: str) -> tuple[int, str, str]:
    return run(capsys, "preprocess", "--config", str(config.source), "--site", site)


def assert_reported(code: int, err: str, expected_code: int, *fragments: str) -> None:
    """A clean failure: the exit code, an `error:` headline, the problem, a `fix:` line, no traceback."""
    lines = err.splitlines()
    headline = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert code == expected_code, err
    assert any(line.strip().startswith("fix: ") for line in lines[headline + 1 :]), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# --- config problems ---------------------------------------------------------------------------


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"

    code, out, err = run(capsys, "preprocess", "--config", str(missing), "--site", "a")

    assert_reported(code, err, 2, "error: Invalid configuration", f"{missing} does not exist", "--config")
    assert err.startswith("error:")
    assert out == ""


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"training": {"rounds": "five"}}, "training.rounds = 'five'"),  # a word where a number belongs
        ({"contract": {"min_rows": [50]}}, "contract.min_rows = list"),  # a list where a number belongs
        ({"seed": "x", "colour": "blue"}, "colour: unknown key"),  # two problems: both reported
    ],
    ids=["rounds-word", "min-rows-list", "two-problems"],
)
def test_config_key_of_the_wrong_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, object], fragment: str
) -> None:
    path = write_config(tmp_path, {**FEDERATION, **change})

    code, _, err = run(capsys, "preprocess", "--config", str(path), "--site", "a")

    assert_reported(code, err, 2, "error: Invalid configuration", str(path), fragment)
    assert err.startswith("error:")


def test_unknown_site(federation: FederationConfig, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = preprocess(capsys, federation, "nope")

    assert_reported(code, err, 2, "error: Unknown site", "no site 'nope'", "fix: use one of: a, b")
    assert err.startswith("error:")
    assert not federation.site("a").processed_dir.exists()


# --- site data problems ------------------------------------------------------------------------


def test_site_csv_without_the_target_column(federation: FederationConfig, capsys: pytest.CaptureFixture[str]) -> None:
    site = federation.site("a")
    pd.read_csv(site.data_path).drop(columns=["churned"]).to_csv(site.data_path, index=False)

    code, _, err = preprocess(capsys, federation, "a")

    assert_reported(code, err, 3, "error: Site data cannot be used", str(site.data_path), "lacks column(s) churned")
    assert err.startswith("error:")
    assert not site.processed_dir.exists()


def test_site_csv_that_is_truncated_mid_row(federation: FederationConfig, capsys: pytest.CaptureFixture[str]) -> None:
    site = federation.site("b")
    site.data_path.write_bytes(site.data_path.read_bytes() + b'b-9999999,"Ada Smith,ada@example.org\n')

    code, _, err = preprocess(capsys, federation, "b")

    assert_reported(code, err, 3, "is malformed or truncated", str(site.data_path))


def test_failed_contract_leaves_the_previous_processed_data_untouched(
    federation: FederationConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    site = federation.site("a")
    code, out, _ = preprocess(capsys, federation, "a")
    assert code == 0 and "train /" in out
    before = snapshot(site.processed_dir)
    assert set(before) == {"train.parquet", "test.parquet"}
    raw = pd.read_csv(site.data_path)
    raw.loc[:4, "age"] = 250  # five customers aged 250: outside the contract's [18, 110]
    raw.to_csv(site.data_path, index=False)

    code, _, err = preprocess(capsys, federation, "a")

    assert_reported(code, err, 3, "error: Data contract failed", "age", "5 values fall outside [18, 110]")
    assert snapshot(site.processed_dir) == before
    assert sorted(p.name for p in site.root.iterdir()) == ["processed", "raw", "reports"]  # no staging left behind


# --- keys --------------------------------------------------------------------------------------


def test_generating_a_key_twice_refuses_and_keeps_the_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "keys"
    code, out, _ = run(capsys, "keys", "generate", "--name", "x", "--out", str(out_dir))
    assert code == 0 and "x.key" in out
    first = snapshot(out_dir)

    code, _, err = run(capsys, "keys", "generate", "--name", "x", "--out", str(out_dir))

    assert_reported(code, err, 2, f"private key {out_dir / 'x.key'} already exists", "refusing to overwrite")
    assert err.startswith("error:")
    assert snapshot(out_dir) == first
    assert set(first) == {"x.key", "x.pub"}


def test_failed_contract_is_reported_once_under_the_error_headline(
    federation: FederationConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    site = federation.site("b")
    raw = pd.read_csv(site.data_path)
    raw.loc[:2, "age"] = 250
    raw.to_csv(site.data_path, index=False)

    code, _, err = preprocess(capsys, federation, "b")

    assert code == 3
    assert err.startswith("error: Data contract failed")
    assert err.count("3 values fall outside") == 1


def test_missing_categories_within_the_null_allowance_preprocess(
    federation: FederationConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    # 4 of 300 values missing (1.3%) is inside the contract's default max_null_fraction of 5%
    site = federation.site("a")
    raw = pd.read_csv(site.data_path)
    raw.loc[:3, "region_type"] = None
    raw.to_csv(site.data_path, index=False)

    code, _, err = preprocess(capsys, federation, "a")

    assert code == 0, err


def test_key_folder_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a typo that points --out at an existing file
    not_a_folder = tmp_path / "keys"
    not_a_folder.write_text("not a folder\n")

    code, _, err = run(capsys, "keys", "generate", "--name", "x", "--out", str(not_a_folder))

    assert_reported(code, err, 2, str(not_a_folder))

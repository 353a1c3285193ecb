"""A contract generated from a profile of one site's snapshot, committed, then referenced by `contract_file:`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from quorum.cli.main import main
from quorum.configs.errors import ConfigError
from quorum.configs.schema import ContractConfig, FeatureConfig, SiteConfig, load_federation
from quorum.tasks.contract import build_suite_spec
from quorum.tasks.profile import Margins, contract_from_profile, profile_frame, widen
from tests.federation import write_federation

FEATURES = FeatureConfig(numeric=("age", "income"), categorical={"region": ("north", "south", "east")})
SITE = SiteConfig(id="alpha", root=Path("/nonexistent/alpha"), target="label")


def snapshot() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [20, 30, 40, 50, 60, 70, 80, 25, 35, np.nan],
            "income": [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0],
            "region": ["north", "south"] * 4 + ["west", None],
            "label": [0, 1, 0, 0, 1, 0, 0, 1, 0, 0],
        }
    )


@pytest.mark.parametrize(
    ("low", "high", "widened"),
    [
        (10.0, 20.0, (9.0, 21.0)),  # 10% of the span each side
        (0.5, 100.0, (0.0, 110.0)),  # never seen negative: the bound stays at 0
        (-10.0, 10.0, (-12.0, 12.0)),  # negative values observed: widened below 0 as well
        (5.0, 5.0, (4.5, 5.5)),  # a constant column: 10% of its value
        (0.0, 0.0, (0.0, 0.1)),  # an all-zero column: a unit-scale pad
        (0.0123, 0.0456, (0.008, 0.049)),  # pad 0.00333: rounded outward to steps of 0.001
    ],
)
def test_widen_pads_outward_and_rounds_outward(low: float, high: float, widened: tuple[float, float]) -> None:
    assert widen(low, high, 0.1) == pytest.approx(widened)


def test_profile_records_types_nulls_ranges_domains_rows_and_label_rate() -> None:
    profile = profile_frame(snapshot(), SITE, FEATURES)

    columns = {c.name: c for c in profile.columns}
    assert (profile.rows, profile.label_rate) == (10, 0.3)
    assert columns["age"].kind == "numeric" and columns["age"].dtype == "float64"
    assert (columns["age"].minimum, columns["age"].maximum, columns["age"].null_fraction) == (20.0, 80.0, 0.1)
    assert columns["region"].values == ("north", "south")  # in the schema's order; "east" never seen
    assert columns["region"].unknown_rows == 1  # "west"
    assert json.loads(json.dumps(profile.to_dict()))["columns"][0]["name"] == "age"


def test_contract_from_profile_widens_every_bound() -> None:
    contract, notes = contract_from_profile(profile_frame(snapshot(), SITE, FEATURES), Margins())

    assert contract.numeric_ranges == {"age": (14.0, 86.0), "income": (1.0, 109.0)}
    assert contract.categorical_domains == {"region": ("north", "south")}
    assert contract.null_fractions == {"age": 0.12, "income": 0.02, "region": 0.12}
    assert contract.label_rate == (0.2, 0.4)
    assert (contract.min_rows, contract.max_rows) == (1, 100)
    assert notes == [
        "column 'region': 1 rows hold categories outside features.categorical; they are left out of the "
        "contract, which will fail this data until it or the schema is fixed"
    ]


def test_suite_uses_per_column_null_bounds_and_narrowed_domains() -> None:
    contract = ContractConfig(null_fractions={"age": 0.25}, categorical_domains={"region": ("north",)})

    spec = build_suite_spec(FEATURES, contract, SITE)

    mostly = {i["kwargs"]["column"]: i["kwargs"]["mostly"] for i in spec if i["type"].endswith("not_be_null")}
    sets = {i["kwargs"]["column"]: i["kwargs"]["value_set"] for i in spec if i["type"].endswith("be_in_set")}
    assert mostly == {"age": 0.75, "income": 0.95, "region": 0.95, "label": 1.0}
    assert sets["region"] == ["north"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_federation(tmp_path_factory.mktemp("contract-init"), site_ids=("alpha", "beta"))


def test_contract_file_is_resolved_against_the_config(tmp_path: Path, federation: Path) -> None:
    config_path = tmp_path / "configs" / "federation.yaml"
    config_path.parent.mkdir()
    config = yaml.safe_load(federation.read_text())
    config.pop("contract")
    config_path.write_text(yaml.safe_dump({**config, "contract_file": "contracts/ds.yaml"}))
    (tmp_path / "configs" / "contracts").mkdir()
    (tmp_path / "configs" / "contracts" / "ds.yaml").write_text("min_rows: 7\nlabel_rate: [0.1, 0.5]\n")

    loaded = load_federation(config_path)

    assert loaded.contract.min_rows == 7 and loaded.contract.label_rate == (0.1, 0.5)
    assert loaded.contract_file == tmp_path / "configs" / "contracts" / "ds.yaml"


CONTRACT_FILE_ERRORS = {
    # both an inline contract and a file: which one wins would be a guess
    "both": ({"contract": {"min_rows": 5}}, "min_rows: 5\n", "sets both contract and contract_file"),
    # the file was never generated or was moved
    "missing": ({}, None, "does not exist"),
    # a typo inside the contract file is reported against that file
    "bad-key": ({}, "min_rowz: 5\n", "ds.yaml has 1 problem(s)"),
    # a domain the shared schema does not allow
    "contradicts-features": (
        {},
        "categorical_domains:\n  channel: [online, fax]\n",
        "contract.categorical_domains.channel: 'fax' not in features.categorical.channel",
    ),
}


@pytest.mark.parametrize(
    ("extra", "content", "fragment"), list(CONTRACT_FILE_ERRORS.values()), ids=list(CONTRACT_FILE_ERRORS)
)
def test_contract_file_errors_are_clear(
    tmp_path: Path, federation: Path, extra: dict[str, object], content: str | None, fragment: str
) -> None:
    config = yaml.safe_load(federation.read_text())
    config.pop("contract")
    config_path = tmp_path / "federation.yaml"
    config_path.write_text(yaml.safe_dump({**config, **extra, "contract_file": "ds.yaml"}))
    if content is not None:
        (tmp_path / "ds.yaml").write_text(content)

    with pytest.raises(ConfigError) as caught:
        load_federation(config_path)

    assert fragment in caught.value.message
    assert caught.value.fix


def test_contract_init_writes_a_contract_the_federation_can_use(
    federation: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from quorum.tasks.site import preprocess_site

    code = main(["contract", "init", "--site", "alpha", "--config", str(federation)])

    out = capsys.readouterr().out
    written = federation.parent / "contracts" / "test-federation.yaml"
    assert code == 0, out
    assert "REVIEW" in out and "contract_file: contracts/test-federation.yaml" in out
    assert "contract expectations passed" in out
    assert written.read_text().startswith("# Data contract generated by `quorum contract init`")
    config = load_federation(federation)
    profile = json.loads((config.site("alpha").reports_dir / "profile.json").read_text())
    assert profile["site_id"] == "alpha" and profile["rows"] > 0
    assert {c["name"] for c in profile["columns"]} == set(config.features.columns)  # no PII, no unknown columns

    raw = yaml.safe_load(federation.read_text())
    raw.pop("contract")
    config_path = federation.parent / "uses-file.yaml"
    config_path.write_text(yaml.safe_dump({**raw, "contract_file": "contracts/test-federation.yaml"}))
    uses_file = load_federation(config_path)
    assert uses_file.contract.categorical_domains["channel"]
    assert preprocess_site(uses_file, "alpha").contract.passed


def test_contract_init_never_overwrites_a_committed_contract(
    federation: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = federation.parent / "kept.yaml"
    out.write_text("min_rows: 3\n")

    code = main(["contract", "init", "--site", "alpha", "--config", str(federation), "--out", str(out)])

    assert code == 2
    assert "exists" in capsys.readouterr().err
    assert out.read_text() == "min_rows: 3\n"


def test_great_expectations_sees_only_the_checked_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    import quorum.tasks.contract as contract

    seen: list[list[str]] = []

    def capture(frame: pd.DataFrame, spec: object, site: SiteConfig) -> object:
        seen.append(list(frame.columns))
        raise RuntimeError("stop after capturing")

    monkeypatch.setattr(contract, "_run_suite", capture)
    frame = snapshot().assign(email_hash=["0" * 64] * 10, notes=["free text"] * 10)  # unchecked columns

    with pytest.raises(RuntimeError):
        contract.validate_contract(frame, FEATURES, ContractConfig(), SITE)

    assert seen == [["age", "income", "region", "label"]]  # GE copies its frame per rule: no passengers

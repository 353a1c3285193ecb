"""The real-data example: scikit-learn's bundled breast-cancer table, split across three clinics."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from quorum.cli.main import main
from quorum.configs.schema import load_federation
from quorum.tasks.contract import validate_contract
from quorum.tasks.examples import SITES, SPLIT_COLUMN, breast_cancer_frame, split_sites

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "configs" / "examples" / "breast_cancer.yaml"


def test_the_data_ships_with_scikit_learn() -> None:
    import sklearn

    bundled = Path(sklearn.__file__).parent / "datasets" / "data" / "breast_cancer.csv"

    frame = breast_cancer_frame()

    assert bundled.is_file()  # read from the installed package: no download
    assert frame.shape == (569, 32)
    assert frame["malignant"].sum() == 212  # sklearn's target 0 (malignant) becomes 1


def test_the_split_rule_gives_disjoint_non_iid_sites() -> None:
    frame = breast_cancer_frame()

    sites = split_sites(frame)

    ids = [site.site_id for site in sites]
    rows = [set(site.train["sample_id"]) | set(site.current["sample_id"]) for site in sites]
    rates = [site.train["malignant"].mean() for site in sites]
    assert ids == list(SITES)
    assert set().union(*rows) == set(frame["sample_id"]) and sum(map(len, rows)) == len(frame)
    assert max(s.train[SPLIT_COLUMN].max() for s in sites[:1]) <= min(s.train[SPLIT_COLUMN].min() for s in sites[2:])
    assert rates == sorted(rates) and rates[2] - rates[0] > 0.3  # non-IID by design
    assert all(abs(len(s.train) / (len(s.train) + len(s.current)) - 0.75) < 0.01 for s in sites)


def test_every_site_meets_the_committed_example_contract() -> None:
    config = load_federation(EXAMPLE)

    summaries = {
        site.site_id: validate_contract(site.train, config.features, config.contract, config.site(site.site_id))
        for site in split_sites(breast_cancer_frame())
    }

    assert config.contract_file == EXAMPLE.parent / "contracts" / "breast_cancer.yaml"
    assert {s: summary.describe() for s, summary in summaries.items() if not summary.passed} == {}


@pytest.mark.integration
def test_example_runs_end_to_end_and_registers_a_champion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    from quorum.lineage.state import StateLayout
    from tests.federation import write_governance

    examples = tmp_path / "configs" / "examples"
    shutil.copytree(EXAMPLE.parent, examples)
    config = yaml.safe_load((examples / "breast_cancer.yaml").read_text())
    config["training"]["rounds"] = 3  # keep the test short; the example itself trains 10 rounds
    config["gates"].update(min_accuracy=0.8, min_auc=0.85, min_site_accuracy=0.6)
    (examples / "breast_cancer.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    governance, keys = write_governance(tmp_path)
    monkeypatch.chdir(tmp_path)

    written = main(["data", "example", "breast-cancer"])
    out_dir = tmp_path / "data" / "examples" / "breast-cancer"
    site_files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    code = main(
        [
            "run",
            *("--config", "configs/examples/breast_cancer.yaml", "--governance", str(governance)),
            *("--approve-with", keys[0], "--approve-with", keys[1]),
        ]
    )

    out = capsys.readouterr().out
    assert (written, code) == (0, 0), out
    assert site_files == [f"{site}/raw/{name}" for site in SITES for name in ("current.csv", "train.csv")]
    loaded = load_federation(examples / "breast_cancer.yaml")
    uri = StateLayout(loaded.state_dir).tracking_uri
    champion = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
        "breast-cancer-model", "champion"
    )
    assert champion.tags["verdict"] == "passed"
    assert {f"data.{site}" for site in SITES} <= set(champion.tags)
    assert loaded.state_dir.is_relative_to(tmp_path)

"""Loading federation.yaml and governance.yaml: resolved paths, and every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from quorum.configs.errors import ConfigError, UnknownSite
from quorum.configs.schema import load_federation, load_governance
from quorum.lineage.keys import public_key_fingerprint

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MINIMAL = """\
name: tiny
model_name: tiny-model
state_dir: state
features:
  numeric: [age, income]
  categorical:
    region: [north, south]
sites:
  a:
    root: ../sites/a
    target: churned
    pii_columns: [email]
  b:
    root: /absolute/sites/b
"""

FP_A, FP_B = "aaaaaaaa" * 8, "bbbbbbbb" * 8
GOVERNANCE = f"""\
quorum: 2
approvers:
  - name: alice
    public_key: keys/alice.pub
    fingerprint: {FP_A}
  - name: bob
    role: risk-officer
    public_key: /keys/bob.pub
    fingerprint: {FP_B}
"""


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def edited(text: str, change: dict[str, object], drop: tuple[str, ...] = ()) -> str:
    data = yaml.safe_load(text)
    for dotted, value in change.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    for key in drop:
        data.pop(key)
    return yaml.safe_dump(data)


def config_error(call: object, path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        call(path)  # type: ignore[operator]
    return caught.value


# --- the shipped configs -----------------------------------------------------------------------


def test_repo_federation_config_loads_with_paths_resolved_to_the_repo() -> None:
    config = load_federation(REPO_CONFIGS / "federation.yaml")

    assert config.name == "demo-federation"
    assert config.site_ids == ("north", "south", "east", "west")
    assert config.source == (REPO_CONFIGS / "federation.yaml").resolve()
    assert config.state_dir == (REPO_CONFIGS.parent / ".quorum").resolve()
    assert config.site("north").root == (REPO_CONFIGS.parent / "data" / "sites" / "north").resolve()
    assert config.site("north").data_path.name == "train.csv"
    assert config.training.min_sites <= len(config.sites)
    assert not set(config.features.columns) & set(config.site("east").pii_columns)


def test_repo_governance_config_loads() -> None:
    governance = load_governance(REPO_CONFIGS / "governance.yaml")

    assert governance.quorum <= len(governance.approvers)
    assert [a.name for a in governance.approvers] == ["alice", "bob", "carol"]
    bob = governance.approver("bob")
    assert bob.public_key == (REPO_CONFIGS / "demo-keys" / "bob.pub").resolve()
    assert public_key_fingerprint(bob.public_key) == bob.fingerprint  # the demo keys are the pinned ones
    assert governance.checkpoints is not None
    assert public_key_fingerprint(governance.checkpoints.public_key) == governance.checkpoints.fingerprint


# --- path resolution ---------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "conf", "federation.yaml", MINIMAL)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_federation("../conf/federation.yaml")  # relative to the current directory

    assert config.source == path
    assert config.state_dir == tmp_path / "conf" / "state"
    assert config.site("a").root == tmp_path / "sites" / "a"
    assert config.site("a").data_path == tmp_path / "sites" / "a" / "raw" / "train.csv"
    assert config.site("b").root == Path("/absolute/sites/b")


def test_governance_key_paths_resolve_against_its_folder(tmp_path: Path) -> None:
    path = write(tmp_path / "gov", "governance.yaml", GOVERNANCE)

    governance = load_governance(path)

    assert governance.approver("alice").public_key == tmp_path / "gov" / "keys" / "alice.pub"
    assert governance.approver("bob").public_key == Path("/keys/bob.pub")
    assert governance.source == path


# --- every problem at once ---------------------------------------------------------------------


def test_every_bad_key_is_reported_in_one_error(tmp_path: Path) -> None:
    text = edited(
        MINIMAL,
        {"training.rounds": "five", "training.learning_rate": -1, "colour": "blue", "gates.min_auc": 1.5},
        drop=("features",),
    )
    path = write(tmp_path, "broken-federation.yaml", text)

    error = config_error(load_federation, path)

    message = error.message
    assert "broken-federation.yaml" in message
    assert "5 problem(s)" in message
    assert "training.rounds = 'five'" in message
    assert "training.learning_rate = -1" in message
    assert "gates.min_auc = 1.5" in message
    assert "colour: unknown key" in message
    assert "features: required key is missing" in message
    assert error.fix
    assert error.exit_code == 2


BAD_FIELDS = {
    # a site id with characters DVC stage names cannot hold
    "bad-site-id": ({"sites": {"Bad Id": {"root": "x"}}}, "sites.0.id"),
    # an unknown training strategy
    "strategy": ({"training.strategy": "scaffold"}, "training.strategy = 'scaffold'"),
    # an unknown aggregation rule
    "aggregation": ({"training.aggregation": "mode"}, "training.aggregation = 'mode'"),
    # FedProx without its proximal term is plain FedAvg under another name
    "fedprox-without-mu": ({"training.strategy": "fedprox"}, "strategy fedprox needs proximal_mu > 0"),
    # a proximal term the chosen strategy would silently ignore
    "mu-without-fedprox": ({"training.proximal_mu": 0.1}, "proximal_mu applies only to strategy fedprox"),
    # a server learning rate for a strategy without a server optimizer
    "server-lr-fedavg": ({"training.server_lr": 0.5}, "server_lr applies only to strategies fedavgm"),
    # fine-tuning from a checkpoint that is not named
    "checkpoint-missing": ({"training.start_from": "checkpoint"}, "start_from checkpoint needs checkpoint"),
    # a checkpoint that would be ignored
    "checkpoint-unused": ({"training.checkpoint": "seed.npz"}, "checkpoint is set but start_from is scratch"),
    # frozen random layers
    "freeze-from-scratch": ({"training.freeze_layers": 1}, "freeze_layers keeps layers at their start values"),
    # every layer frozen: nothing left to train
    "freeze-all": (
        {"training.start_from": "checkpoint", "training.checkpoint": "seed.npz", "training.freeze_layers": 3},
        "freeze_layers 3 leaves nothing to train: the model has 3 Linear layers",
    ),
    # Krum cannot pick a reply among 2 sites
    "krum-too-few": ({"training.aggregation": "krum"}, "needs more than 2*num_byzantine+2 = 2 sites per round"),
    # multi-Krum averaging more replies than the honest ones
    "multi-krum-m": (
        {"sites.c": {"root": "c"}, "training.aggregation": "multi_krum", "training.multi_krum_m": 4},
        "training.multi_krum_m 4 exceeds sites per round minus num_byzantine",
    ),
    # a robust rule needs each update, which secure aggregation hides
    "secagg-robust": (
        {"training.secure_aggregation": True, "training.aggregation": "median", "training.min_sites": 2},
        "aggregation must be mean (not median)",
    ),
    # DP clipping at the coordinator needs each update, which secure aggregation hides
    "secagg-dp": (
        {"training.secure_aggregation": True, "training.privacy.enabled": True, "training.min_sites": 2},
        "secure_aggregation cannot be combined with privacy",
    ),
    # a norm bound needs each update's norm, which secure aggregation hides
    "secagg-norm": (
        {"training.secure_aggregation": True, "training.max_norm_ratio": 5, "training.min_sites": 2},
        "secure_aggregation hides each update's norm",
    ),
    # a secure sum over one site is that site's update
    "secagg-one-site": ({"training.secure_aggregation": True}, "secure_aggregation needs min_sites >= 2"),
    # DP's sensitivity bound holds for the mean only
    "dp-robust": (
        {"training.privacy.enabled": True, "training.aggregation": "median"},
        "privacy bounds one site's effect on the mean",
    ),
    # no site at all in a round
    "sample-fraction": ({"training.sample_fraction": 0}, "training.sample_fraction = 0"),
    # a norm bound that rejects the median update itself
    "norm-ratio": ({"training.max_norm_ratio": 1}, "training.max_norm_ratio = 1"),
    # DP without noise promises nothing
    "dp-no-noise": ({"training.privacy.noise_multiplier": 0}, "training.privacy.noise_multiplier = 0"),
    # a test fraction that leaves nothing to train on
    "test-fraction": ({"training.test_fraction": 1.0}, "training.test_fraction = 1.0"),
    # a categorical column without any allowed value
    "empty-domain": ({"features.categorical": {"region": []}}, "features.categorical"),
    # a contract range given high-to-low
    "reversed-range": ({"contract.numeric_ranges": {"age": [90, 18]}}, "numeric_ranges need [low, high]"),
    # min_rows above max_rows
    "row-bounds": ({"contract.min_rows": 10, "contract.max_rows": 5}, "min_rows (10) must not exceed max_rows (5)"),
    # a model without hidden layers
    "no-hidden-layers": ({"model.hidden_sizes": []}, "model.hidden_sizes"),
    # a count of worker processes below zero, or YAML's `yes` read as one
    "site-processes-negative": ({"deployment.site_processes": -1}, "deployment.site_processes"),
    "site-processes-bool": ({"deployment.site_processes": True}, "deployment.site_processes"),
    "site-processes-word": ({"deployment.site_processes": "many"}, "deployment.site_processes"),
}


@pytest.mark.parametrize(("change", "fragment"), list(BAD_FIELDS.values()), ids=list(BAD_FIELDS))
def test_bad_field_is_named(tmp_path: Path, change: dict[str, object], fragment: str) -> None:
    path = write(tmp_path, "federation.yaml", edited(MINIMAL, change))

    error = config_error(load_federation, path)

    assert fragment in error.message
    assert str(path) in error.message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("- a\n- b\n", "must hold a mapping of keys, got list"),  # a YAML list instead of a mapping
        ("just a string\n", "must hold a mapping of keys, got str"),  # a bare scalar
        ("", "must hold a mapping of keys, got NoneType"),  # an empty file
        ("name: [unclosed\n", "is not valid YAML"),  # broken flow sequence
        ("name: a\n\tbad: tab\n", "is not valid YAML"),  # a tab used for indentation
    ],
    ids=["list", "scalar", "empty", "unclosed", "tab"],
)
def test_unreadable_yaml_is_a_config_error(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, "federation.yaml", text)

    error = config_error(load_federation, path)

    assert fragment in error.message
    assert str(path) in error.message
    assert error.fix


def test_non_utf8_config_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "federation.yaml"
    path.write_bytes(b"name: caf\xe9\n")

    assert "is not valid YAML" in config_error(load_federation, path).message


@pytest.mark.parametrize("loader", [load_federation, load_governance], ids=["federation", "governance"])
def test_missing_file_is_a_config_error(tmp_path: Path, loader: object) -> None:
    error = config_error(loader, tmp_path / "nowhere.yaml")

    assert "nowhere.yaml does not exist" in error.message
    assert ("--config" if loader is load_federation else "--governance") in error.fix


@pytest.mark.parametrize("loader", [load_federation, load_governance], ids=["federation", "governance"])
def test_directory_instead_of_file_is_a_config_error(tmp_path: Path, loader: object) -> None:
    assert f"{tmp_path} is a directory, not a file" in config_error(loader, tmp_path).message


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    import os

    path = write(tmp_path, "governance.yaml", GOVERNANCE)
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as a user who can read any file")

    assert "is not readable (permission denied)" in config_error(load_governance, path).message


@pytest.mark.parametrize("loader", [load_federation, load_governance], ids=["federation", "governance"])
def test_a_duplicated_key_is_refused_not_overwritten(tmp_path: Path, loader: object) -> None:
    text = MINIMAL if loader is load_federation else GOVERNANCE
    path = write(tmp_path, "config.yaml", text.replace("quorum: 2", "quorum: 2\nquorum: 1") + "seed: 1\nseed: 2\n")

    message = config_error(loader, path).message

    assert "found duplicate key" in message


# --- federated training options ---------------------------------------------------------------


def test_training_defaults_are_plain_fedavg_with_every_site(tmp_path: Path) -> None:
    training = load_federation(write(tmp_path, "federation.yaml", MINIMAL)).training

    assert (training.strategy, training.server_optimizer, training.aggregation) == ("fedavg", "fedavg", "mean")
    assert training.sample_fraction == 1.0 and training.proximal_mu == 0.0 and training.max_norm_ratio is None
    assert training.start_from == "scratch" and training.freeze_layers == 0
    assert not training.secure_aggregation and not training.privacy.enabled


def test_checkpoint_resolves_against_the_config_folder(tmp_path: Path) -> None:
    text = edited(MINIMAL, {"training.start_from": "checkpoint", "training.checkpoint": "seeds/round-9.npz"})

    config = load_federation(write(tmp_path / "conf", "federation.yaml", text))

    assert config.training.checkpoint == tmp_path / "conf" / "seeds" / "round-9.npz"


def test_server_momentum_is_another_name_for_beta1(tmp_path: Path) -> None:
    text = edited(MINIMAL, {"training.strategy": "fedavgm", "training.server_momentum": 0.5})

    training = load_federation(write(tmp_path, "federation.yaml", text)).training

    assert training.beta1 == 0.5
    assert training.effective_server_lr == 1.0  # FedAvgM's default server step


def test_adaptive_optimizers_default_to_a_small_server_step(tmp_path: Path) -> None:
    text = edited(MINIMAL, {"training.strategy": "fedadam"})

    assert load_federation(write(tmp_path, "federation.yaml", text)).training.effective_server_lr == 0.01


# --- cross-field rules -------------------------------------------------------------------------


def test_min_sites_above_the_number_of_sites(tmp_path: Path) -> None:
    path = write(tmp_path, "federation.yaml", edited(MINIMAL, {"training.min_sites": 3}))

    assert "training.min_sites is 3 but only 2 sites are configured" in config_error(load_federation, path).message


def test_pii_column_listed_as_a_feature(tmp_path: Path) -> None:
    path = write(tmp_path, "federation.yaml", edited(MINIMAL, {"sites.a.pii_columns": ["email", "income"]}))

    assert "sites.a: PII columns may not be features: income" in config_error(load_federation, path).message


def test_target_listed_as_a_feature(tmp_path: Path) -> None:
    path = write(tmp_path, "federation.yaml", edited(MINIMAL, {"sites.b.target": "age"}))

    assert "sites.b: target 'age' is also listed as a feature" in config_error(load_federation, path).message


def test_cross_field_problems_are_reported_together(tmp_path: Path) -> None:
    text = edited(MINIMAL, {"training.min_sites": 5, "sites.a.pii_columns": ["age"]})
    path = write(tmp_path, "federation.yaml", text)

    message = config_error(load_federation, path).message

    assert "training.min_sites is 5" in message
    assert "PII columns may not be features: age" in message


GOVERNANCE_BAD = {
    # more approvals required than approvers exist
    "quorum-too-high": ({"quorum": 3}, "quorum is 3 but only 2 approvers are listed"),
    # a quorum of zero would promote with no approval at all
    "quorum-zero": ({"quorum": 0}, "quorum = 0"),
    # the same approver twice would count one person's approval twice
    "duplicate-approver": (
        {
            "approvers": [
                {"name": "alice", "public_key": "a.pub", "fingerprint": FP_A},
                {"name": "alice", "public_key": "b.pub", "fingerprint": FP_B},
            ]
        },
        "approver names must be distinct: alice",
    ),
    # two approvers pinning one key would let one key approve twice
    "shared-fingerprint": (
        {
            "approvers": [
                {"name": "alice", "public_key": "a.pub", "fingerprint": FP_A},
                {"name": "bob", "public_key": "b.pub", "fingerprint": FP_A},
            ]
        },
        "approvers share one key fingerprint: alice, bob",
    ),
    # an approver entry without a key
    "missing-key": (
        {"approvers": [{"name": "alice", "fingerprint": FP_A}]},
        "approvers.0.public_key: required key is missing",
    ),
    # a key named only by path: whoever writes the file's folder could swap it
    "missing-fingerprint": (
        {"approvers": [{"name": "alice", "public_key": "a.pub"}]},
        "approvers.0.fingerprint: required key is missing",
    ),
    # not a sha256 hex digest
    "short-fingerprint": (
        {"approvers": [{"name": "alice", "public_key": "a.pub", "fingerprint": "abc"}]},
        "approvers.0.fingerprint = 'abc'",
    ),
    # YAML `yes` is a boolean: never read as a quorum of 1
    "quorum-yes": ({"quorum": True}, "quorum = True: Input should be a valid integer"),
    # a quoted number is a string, not a quorum
    "quorum-string": ({"quorum": "2"}, "quorum = '2': Input should be a valid integer"),
    # a revocation written as a string must not silently mean "not revoked"
    "revoked-string": (
        {"approvers": [{"name": "alice", "public_key": "a.pub", "fingerprint": FP_A, "revoked": "no"}]},
        "approvers.0.revoked = 'no': Input should be a valid boolean",
    ),
    "version-float": ({"version": 2.0}, "version = 2.0: Input should be a valid integer"),
}


@pytest.mark.parametrize(("change", "fragment"), list(GOVERNANCE_BAD.values()), ids=list(GOVERNANCE_BAD))
def test_bad_governance(tmp_path: Path, change: dict[str, object], fragment: str) -> None:
    path = write(tmp_path, "governance.yaml", edited(GOVERNANCE, change))

    error = config_error(load_governance, path)

    assert fragment in error.message
    assert "governance.yaml" in error.message


def test_unknown_approver_lists_the_known_ones(tmp_path: Path) -> None:
    governance = load_governance(write(tmp_path, "governance.yaml", GOVERNANCE))

    with pytest.raises(ConfigError) as caught:
        governance.approver("mallory")

    assert "'mallory'" in caught.value.message
    assert caught.value.fix == "use one of: alice, bob"


# --- lookups and hashing -----------------------------------------------------------------------


def test_unknown_site_lists_the_known_ids(tmp_path: Path) -> None:
    config = load_federation(write(tmp_path, "federation.yaml", MINIMAL))

    with pytest.raises(UnknownSite) as caught:
        config.site("nope")

    assert str(caught.value) == "no site 'nope' in this federation"
    assert caught.value.fix == "use one of: a, b"
    assert isinstance(caught.value, KeyError)


def test_config_hash_is_stable_and_ignores_the_file_name(tmp_path: Path) -> None:
    first = load_federation(write(tmp_path, "federation.yaml", MINIMAL))
    again = load_federation(write(tmp_path, "copy.yaml", MINIMAL))

    assert first.config_hash() == load_federation(tmp_path / "federation.yaml").config_hash()
    assert first.config_hash() == again.config_hash()
    assert len(first.config_hash()) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"training.rounds": 6},  # one more round
        {"seed": 1},  # another seed
        {"gates.min_auc": 0.71},  # a stricter gate
        {"features.categorical.region": ["south", "north"]},  # another one-hot layout
    ],
    ids=["rounds", "seed", "gate", "domain-order"],
)
def test_config_hash_changes_with_a_knob(tmp_path: Path, change: dict[str, object]) -> None:
    base = load_federation(write(tmp_path, "federation.yaml", MINIMAL))
    changed = load_federation(write(tmp_path, "changed.yaml", edited(MINIMAL, change)))

    assert base.config_hash() != changed.config_hash()


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_federation(write(tmp_path, "federation.yaml", MINIMAL))

    seed, rounds = config.seed, config.training.rounds

    with pytest.raises(ValueError, match="frozen"):
        config.seed = seed + 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="frozen"):
        config.training.rounds = rounds + 1  # type: ignore[misc]  # nested sections are frozen too
    assert (config.seed, config.training.rounds) == (seed, rounds)
    assert config.config_hash() == load_federation(tmp_path / "federation.yaml").config_hash()


def test_duplicate_site_ids_are_rejected(tmp_path: Path) -> None:
    # an `id:` inside a site entry overrides its mapping key, so two entries can claim one id
    text = edited(MINIMAL, {"sites.b.id": "a", "sites.b.root": "../sites/b"})
    path = write(tmp_path, "federation.yaml", text)

    assert "a" in config_error(load_federation, path).message


def test_gate_min_sites_above_the_number_of_sites_is_rejected(tmp_path: Path) -> None:
    # with more required sites than configured, every model fails the `sites` gate forever
    path = write(tmp_path, "federation.yaml", edited(MINIMAL, {"gates.min_sites": 3}))

    assert "gates.min_sites" in config_error(load_federation, path).message


# a PII column cannot double as the protected attribute or the record id
@pytest.mark.parametrize("role", ["protected_attribute", "id_column"])
def test_a_pii_column_cannot_take_another_role(tmp_path: Path, role: str) -> None:
    import yaml

    from quorum.configs.errors import ConfigError
    from quorum.configs.schema import load_federation

    raw = yaml.safe_load((REPO_CONFIGS / "federation.yaml").read_text())
    raw["sites"]["north"][role] = "email"
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(raw))

    with pytest.raises(ConfigError, match=f"{role} 'email' is also a PII column"):
        load_federation(path)


def test_quorum_yes_in_yaml_is_refused_not_read_as_one(tmp_path: Path) -> None:
    path = write(tmp_path, "governance.yaml", GOVERNANCE.replace("quorum: 2", "quorum: yes"))

    message = config_error(load_governance, path).message

    assert "quorum = True: Input should be a valid integer" in message

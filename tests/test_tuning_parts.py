"""The pieces the round loop is wired from: freezing, masks, private mean, masked replies, site keys,
the split cache and the wire format (the secure-aggregation rounds are in test_secagg_rounds.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from numpy.typing import NDArray

from quorum.configs.errors import ConfigError, ReplyRejected
from quorum.configs.schema import FederationConfig
from quorum.tasks import site as site_work
from quorum.tasks.model import initial_weights
from quorum.tasks.privacy import private_mean
from quorum.tasks.replies import validate_masked_reply
from quorum.tasks.site_secagg import MaskedUpdate, key_path
from quorum.tasks.strategies import keep_fixed, min_replies, trainable_tensors
from quorum.tasks.training import LocalTrainingConfig, freeze_leading_layers, train_local
from quorum.tasks.wire import Request

HIDDEN = (8, 4)


def site_data() -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    rng = np.random.default_rng(2)
    features = rng.normal(size=(200, 5)).astype(np.float32)
    return features, (features[:, 0] + features[:, 1] > 0).astype(np.float32)


def local(freeze_layers: int = 0) -> LocalTrainingConfig:
    return LocalTrainingConfig(HIDDEN, 0.0, 2, 32, 0.1, False, seed=5, freeze_layers=freeze_layers)


# --- fine-tuning: frozen layers ------------------------------------------------------------------


def test_frozen_layers_keep_their_weights_and_biases_bit_for_bit() -> None:
    features, labels = site_data()
    start = initial_weights(5, HIDDEN, np.zeros(5), np.ones(5), seed=0)

    trained = train_local(start, features, labels, local(freeze_layers=2)).weights

    for index in (0, 1, 2, 3, 4, 5):  # buffers, then the first two Linear layers' weight and bias
        np.testing.assert_array_equal(trained[index], start[index])
    assert not np.array_equal(trained[6], start[6])  # the head still learns


def test_the_local_sgd_step_is_torch_optim_sgd_bit_for_bit() -> None:
    import torch

    from quorum.tasks.model import build_model, get_weights, set_weights
    from quorum.tasks.training import sgd_step

    features, labels = site_data()
    start = initial_weights(5, HIDDEN, np.zeros(5), np.ones(5), seed=0)
    x, y = torch.from_numpy(features), torch.from_numpy(labels)
    models = []
    for use_torch_optim in (True, False):
        model = build_model(5, HIDDEN, 0.0)
        set_weights(model, start)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.1)
        for step in range(5):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[step::5]), y[step::5])
            loss.backward()
            if use_torch_optim:
                optimizer.step()
                optimizer.zero_grad()
            else:
                sgd_step(params, 0.1)
        models.append(get_weights(model))

    assert not np.array_equal(models[1][2], start[2])  # it trained
    for got, want in zip(models[1], models[0], strict=True):
        np.testing.assert_array_equal(got, want)


def test_freezing_nothing_is_the_default_behaviour() -> None:
    features, labels = site_data()
    start = initial_weights(5, HIDDEN, np.zeros(5), np.ones(5), seed=0)

    explicit = train_local(start, features, labels, local(freeze_layers=0))
    implicit = train_local(start, features, labels, LocalTrainingConfig(HIDDEN, 0.0, 2, 32, 0.1, False, seed=5))

    for got, want in zip(explicit.weights, implicit.weights, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "count",
    [
        -1,  # a negative count
        3,  # every Linear layer of a (8, 4) model: nothing left to train
    ],
    ids=["negative", "all"],
)
def test_freezing_must_leave_a_layer_to_train(count: int) -> None:
    with pytest.raises(ConfigError, match="freeze_layers"):
        local(freeze_layers=count)


def test_freeze_leading_layers_returns_only_what_still_trains() -> None:
    from quorum.tasks.model import build_model

    model = build_model(5, HIDDEN)

    trainable = freeze_leading_layers(model, 1)

    assert len(trainable) == 4  # two Linear layers left, a weight and a bias each
    assert all(p.requires_grad for p in trainable)


def test_trainable_tensors_skip_buffers_and_frozen_layers() -> None:
    assert trainable_tensors(8, 0) == [False, False, True, True, True, True, True, True]
    assert trainable_tensors(8, 2) == [False, False, False, False, False, False, True, True]
    with pytest.raises(ConfigError):
        trainable_tensors(8, 3)  # would freeze the output layer too


def test_keep_fixed_takes_untrained_tensors_from_the_reference() -> None:
    reference = [np.zeros(2, dtype=np.float32), np.ones(2, dtype=np.float32)]
    new = [np.full(2, 5, dtype=np.float32), np.full(2, 7, dtype=np.float32)]

    kept = keep_fixed(new, reference, [False, True])

    np.testing.assert_array_equal(kept[0], reference[0])
    np.testing.assert_array_equal(kept[1], new[1])
    assert kept[0] is not reference[0]  # a copy: the caller's list stays untouched


def test_min_replies_per_rule() -> None:
    assert min_replies("mean", 2, 1) == 1
    assert min_replies("krum", 1, 1) == 5  # n > 2f + 2
    assert min_replies("multi_krum", 1, 6) == 7  # m <= n - f


# --- differential privacy: the coordinator's mean ---------------------------------------------------


def test_private_mean_clips_each_site_and_leaves_untrained_tensors_alone() -> None:
    reference = [np.zeros(3, dtype=np.float32), np.zeros(4, dtype=np.float32)]
    far = [np.full(3, 9.0, dtype=np.float32), np.full(4, 100.0, dtype=np.float32)]
    near = [np.full(3, 9.0, dtype=np.float32), np.full(4, 0.1, dtype=np.float32)]
    quiet = np.random.default_rng(0)

    result = private_mean(reference, [far, near], [False, True], 1.0, 1e-9, quiet)

    np.testing.assert_array_equal(result[0], reference[0])  # not trained: not averaged, not noised
    # far is clipped to norm 1 (0.5 per coordinate), near is short enough to pass: mean of 0.5 and 0.1
    np.testing.assert_allclose(result[1], np.full(4, 0.3), atol=1e-6)


# --- secure aggregation: what the coordinator can check ----------------------------------------------


def masked_reply(**change: Any) -> MaskedUpdate:
    fields: dict[str, Any] = {
        "site_id": "alpha",
        "server_round": 2,
        "masked": np.zeros(7, dtype=np.uint64),
        "num_examples": 10,
        "train_loss": 0.5,
    }
    return MaskedUpdate(**{**fields, **change})


REFERENCE = [np.zeros((2, 3), dtype=np.float32)]  # 6 values + the summed weight = 7


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"site_id": "beta"}, "claims site"),  # a reply under another site's name
        ({"server_round": 1}, "for round 1"),  # a stale reply
        ({"num_examples": 0}, "example count 0"),  # trained on nothing
        ({"masked": np.zeros(6, dtype=np.uint64)}, "expected uint64[7]"),  # another model
        ({"masked": np.zeros(7, dtype=np.float64)}, "expected uint64[7]"),  # not a masked vector
    ],
    ids=["site", "round", "examples", "length", "dtype"],
)
def test_masked_reply_checks_what_it_can(change: dict[str, Any], fragment: str) -> None:
    problem = validate_masked_reply(masked_reply(**change), REFERENCE, 2, "alpha")

    assert problem is not None and fragment in problem


def test_a_well_formed_masked_reply_passes() -> None:
    assert validate_masked_reply(masked_reply(), REFERENCE, 2, "alpha") is None


# --- secure aggregation: the site's key ------------------------------------------------------------


def federation(tmp_path: Path, site_ids: Sequence[str] = ("alpha", "beta", "gamma")) -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "parts",
            "model_name": "parts-model",
            "features": {"numeric": ["x0", "x1", "x2", "x3", "x4"]},
            "sites": {s: {"root": str(tmp_path / s)} for s in site_ids},
            "model": {"hidden_sizes": list(HIDDEN)},
            "training": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.1, "min_sites": 2},
        }
    )


@pytest.mark.parametrize("job_id", ["../escape", "a/b", "", ".hidden"], ids=["parent", "slash", "empty", "dot"])
def test_a_job_id_cannot_move_the_key_file(tmp_path: Path, job_id: str) -> None:
    with pytest.raises(ReplyRejected, match="job id"):
        key_path(federation(tmp_path).site("alpha"), job_id)


def test_a_malformed_peer_key_is_rejected() -> None:
    with pytest.raises(ReplyRejected, match="not X25519 public keys"):
        Request("job", 1, "train", ("alpha",), 1, peers={"alpha": "abcd"}).peer_keys()


# --- the split cache -------------------------------------------------------------------------------


def test_split_is_read_once_and_reread_when_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = federation(tmp_path)
    site = config.site("alpha")
    site.processed_dir.mkdir(parents=True)
    path = site.processed_dir / site_work.TRAIN_FILE
    frame = pd.DataFrame({f"x{i}": [float(i), 1.0] for i in range(5)} | {"label": [0, 1], "group": ["a", "b"]})
    frame.to_parquet(path)
    reads: list[Path] = []
    real = pd.read_parquet
    monkeypatch.setattr(pd, "read_parquet", lambda p, *a, **k: reads.append(p) or real(p, *a, **k))

    first = site_work.load_split(config, site, "train")
    second = site_work.load_split(config, site, "train")
    frame.assign(x0=[7.0, 8.0, 9.0][:2]).to_parquet(path)  # preprocess ran again
    third = site_work.load_split(config, site, "train")

    assert len(reads) == 2 and second[0] is first[0]
    assert not first[0].flags.writeable  # shared across rounds, so nobody may change it
    np.testing.assert_array_equal(third[0][:, 0], [7.0, 8.0])

"""FedAvg, the weighted loss mean and the checks a site reply must pass before aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.typing import NDArray

from quorum.configs.errors import ReplyRejected
from quorum.tasks.aggregate import fedavg, weighted_loss_avg
from quorum.tasks.replies import MAX_EXAMPLES, validate_reply
from quorum.tasks.site import SiteUpdate


def f32(values: object) -> NDArray[np.float32]:
    return np.asarray(values, dtype=np.float32)


REFERENCE = [f32([[0.0, 0.0], [0.0, 0.0]]), f32([0.0, 0.0])]


def good_reply(**changes: object) -> SiteUpdate:
    fields: dict[str, object] = {
        "site_id": "north",
        "server_round": 3,
        "weights": [f32([[1.0, 2.0], [3.0, 4.0]]), f32([0.5, -0.5])],
        "num_examples": 120,
        "train_loss": 0.42,
    }
    fields.update(changes)
    return SiteUpdate(**fields)  # type: ignore[arg-type]


# --- fedavg ------------------------------------------------------------------------------------


def test_fedavg_is_the_example_weighted_mean() -> None:
    a = [f32([[1.0, 2.0], [3.0, 4.0]]), f32([10.0, 0.0])]
    b = [f32([[5.0, 6.0], [7.0, 8.0]]), f32([-10.0, 4.0])]

    averaged = fedavg([(a, 1), (b, 3)])

    np.testing.assert_allclose(averaged[0], [[4.0, 5.0], [6.0, 7.0]])
    np.testing.assert_allclose(averaged[1], [-5.0, 3.0])
    assert [layer.dtype for layer in averaged] == [np.float32, np.float32]
    assert [layer.shape for layer in averaged] == [(2, 2), (2,)]


def test_fedavg_with_equal_counts_is_the_plain_mean() -> None:
    replies = [([f32([0.0, 3.0])], 7), ([f32([2.0, 5.0])], 7), ([f32([4.0, 7.0])], 7)]

    (layer,) = fedavg(replies)

    np.testing.assert_allclose(layer, [2.0, 5.0])


def test_fedavg_does_not_mutate_its_inputs() -> None:
    a = [f32([[1.0, 2.0], [3.0, 4.0]]), f32([10.0, 0.0])]
    b = [f32([[5.0, 6.0], [7.0, 8.0]]), f32([-10.0, 4.0])]
    before = [layer.copy() for layer in (*a, *b)]

    averaged = fedavg([(a, 1), (b, 3)])
    averaged[0][0, 0] = 999.0  # writing to the result must not reach the inputs either

    for layer, saved in zip((*a, *b), before, strict=True):
        np.testing.assert_array_equal(layer, saved)


def test_single_reply_returns_an_equal_copy() -> None:
    weights = [f32([[1.5, -2.0]]), f32([0.25])]

    averaged = fedavg([(weights, 42)])

    for got, want in zip(averaged, weights, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got is not want
        assert not np.shares_memory(got, want)


@pytest.mark.parametrize(
    "replies",
    [
        [],  # nobody replied
        [([f32([1.0])], 0)],  # one reply that trained on nothing
        [([f32([1.0])], 0), ([f32([2.0])], 0)],  # every reply trained on nothing
    ],
    ids=["no-replies", "one-zero", "all-zero"],
)
def test_fedavg_rejects_empty_or_exampleless_replies(replies: list[tuple[list[NDArray[np.float32]], int]]) -> None:
    with pytest.raises(ReplyRejected) as caught:
        fedavg(replies)

    assert caught.value.fix
    assert caught.value.render().startswith("error: Site reply rejected")


# --- weighted_loss_avg -------------------------------------------------------------------------


def test_weighted_loss_avg_weights_by_examples() -> None:
    assert weighted_loss_avg([(1.0, 1), (3.0, 3)]) == pytest.approx(2.5)


def test_weighted_loss_avg_of_one_site_is_its_loss() -> None:
    assert weighted_loss_avg([(0.7, 10)]) == pytest.approx(0.7)


@pytest.mark.parametrize(
    "results",
    [
        [],  # no results at all
        [(0.5, 0), (0.9, 0)],  # results that cover no examples
    ],
    ids=["empty", "zero-examples"],
)
def test_weighted_loss_avg_without_examples_is_nan(results: list[tuple[float, int]]) -> None:
    assert math.isnan(weighted_loss_avg(results))


# --- validate_reply ----------------------------------------------------------------------------


def test_good_reply_is_accepted() -> None:
    assert validate_reply(good_reply(), REFERENCE, server_round=3, site_id="north") is None


@pytest.mark.parametrize("num_examples", [1, MAX_EXAMPLES], ids=["one", "max"])
def test_example_count_bounds_are_inclusive(num_examples: int) -> None:
    assert validate_reply(good_reply(num_examples=num_examples), REFERENCE, 3, "north") is None


BAD_REPLIES = {
    # a late reply from an earlier round
    "wrong-round": (good_reply(server_round=2), ["round 2", "expected 3"]),
    # a site answering in another site's name
    "wrong-site": (good_reply(site_id="south"), ["'south'"]),
    # a site that trained on nothing
    "zero-examples": (good_reply(num_examples=0), ["example count 0"]),
    # a negative count would subtract its weights from the average
    "negative-examples": (good_reply(num_examples=-5), ["example count -5"]),
    # an inflated count to dominate the average
    "huge-examples": (good_reply(num_examples=MAX_EXAMPLES + 1), [f"example count {MAX_EXAMPLES + 1}"]),
    # a layer of another architecture
    "wrong-shape": (
        good_reply(weights=[f32([[1.0, 2.0, 3.0]]), f32([0.5, -0.5])]),
        ["tensor 0", "[1, 3]", "[2, 2]"],
    ),
    # float64 weights from a site running other code
    "wrong-dtype": (
        good_reply(weights=[np.ones((2, 2), dtype=np.float64), f32([0.5, -0.5])]),
        ["tensor 0", "float64", "float32"],
    ),
    # diverged training
    "nan": (good_reply(weights=[f32([[1.0, 2.0], [3.0, 4.0]]), f32([np.nan, 0.0])]), ["tensor 1", "NaN or Inf"]),
    # overflowed training
    "inf": (good_reply(weights=[f32([[1.0, -np.inf], [3.0, 4.0]]), f32([0.5, 0.5])]), ["tensor 0", "NaN or Inf"]),
    # a layer missing
    "too-few-tensors": (good_reply(weights=[f32([[1.0, 2.0], [3.0, 4.0]])]), ["1 tensors", "expected 2"]),
    # an extra layer
    "too-many-tensors": (
        good_reply(weights=[f32([[1.0, 2.0], [3.0, 4.0]]), f32([0.5, -0.5]), f32([1.0])]),
        ["3 tensors", "expected 2"],
    ),
}


@pytest.mark.parametrize(("reply", "fragments"), list(BAD_REPLIES.values()), ids=list(BAD_REPLIES))
def test_bad_reply_gets_a_reason(reply: SiteUpdate, fragments: list[str]) -> None:
    reason = validate_reply(reply, REFERENCE, server_round=3, site_id="north")

    assert isinstance(reason, str)
    for fragment in fragments:
        assert fragment in reason


def test_validate_reply_does_not_touch_the_reply() -> None:
    reply = good_reply(weights=[f32([[1.0, 2.0], [3.0, 4.0]]), f32([np.nan, 0.0])])
    before = [layer.copy() for layer in reply.weights]

    validate_reply(reply, REFERENCE, 3, "north")

    for layer, saved in zip(reply.weights, before, strict=True):
        np.testing.assert_array_equal(layer, saved)

"""Shamir secret sharing: any threshold of shares rebuilds the secret, fewer say nothing about it."""

from __future__ import annotations

import itertools

import pytest

from quorum.configs.errors import ReplyRejected
from quorum.tasks.shamir import PRIME, SHARE_BYTES, Share, _interpolate_at, combine, consistent, split

SECRET = bytes(range(32))


@pytest.mark.parametrize(("threshold", "count"), [(2, 3), (3, 5), (4, 7), (5, 5)])
def test_every_threshold_sized_subset_rebuilds_the_secret(threshold: int, count: int) -> None:
    shares = split(SECRET, threshold, list(range(1, count + 1)))

    for subset in itertools.combinations(shares, threshold):
        assert combine(list(subset), threshold) == SECRET


def test_a_secret_with_leading_zero_bytes_comes_back_whole() -> None:
    secret = bytes(5) + b"\x01" + bytes(26)

    assert combine(split(secret, 3, [4, 9, 11]), 3) == secret


def test_fewer_shares_than_the_threshold_are_refused() -> None:
    shares = split(SECRET, 3, [1, 2, 3, 4])

    with pytest.raises(ReplyRejected, match="2 distinct shares, 3 needed"):
        combine(shares[:2], 3)


@pytest.mark.parametrize("candidate", [bytes(32), b"\xff" * 32, b"another secret"], ids=["zeros", "ones", "text"])
def test_below_the_threshold_the_shares_fit_every_secret(candidate: bytes) -> None:
    """Two shares of a threshold-3 split lie on a polynomial with *any* secret as its constant term."""
    held = split(SECRET, 3, [1, 2, 3])[:2]
    encoded = int.from_bytes(bytes([len(candidate)]) + candidate, "big")
    through = [Share(0, encoded), *held]

    completed = [*held, Share(3, _interpolate_at(through, 3))]

    assert combine(completed, 3) == candidate


def test_a_wrong_share_shows_as_inconsistent_and_breaks_the_secret() -> None:
    shares = split(SECRET, 3, [1, 2, 3, 4, 5])
    forged = [shares[0], shares[1], Share(3, (shares[2].y + 1) % PRIME), shares[3], shares[4]]

    assert consistent(shares, 3)
    assert not consistent(forged, 3)
    assert combine(forged[:3], 3) != SECRET


def test_shares_round_trip_as_bytes() -> None:
    share = split(SECRET, 2, [7, 8])[0]

    data = share.to_bytes()

    assert len(data) == SHARE_BYTES and Share.from_bytes(data) == share


@pytest.mark.parametrize(
    "data",
    [b"\x00" * 10, bytes(2) + (1).to_bytes(66, "big"), (1).to_bytes(2, "big") + PRIME.to_bytes(66, "big")],
    ids=["short", "x-zero", "y-outside-field"],
)
def test_malformed_shares_are_refused(data: bytes) -> None:
    with pytest.raises(ReplyRejected):
        Share.from_bytes(data)


@pytest.mark.parametrize(
    ("secret", "threshold", "xs"),
    [
        (b"", 2, [1, 2]),  # nothing to share
        (bytes(65), 2, [1, 2]),  # larger than the field holds with its length byte
        (SECRET, 3, [1, 2]),  # threshold above the number of shares
        (SECRET, 2, [1, 1, 2]),  # two shares at one point
        (SECRET, 2, [0, 1]),  # the point 0 is the secret itself
    ],
    ids=["empty", "too-long", "threshold", "duplicate-x", "zero-x"],
)
def test_bad_split_requests_are_refused(secret: bytes, threshold: int, xs: list[int]) -> None:
    with pytest.raises(ValueError):
        split(secret, threshold, xs)


def test_splitting_twice_gives_different_shares() -> None:
    assert split(SECRET, 2, [1, 2]) != split(SECRET, 2, [1, 2])  # fresh random coefficients each time

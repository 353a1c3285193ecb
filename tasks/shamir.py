"""Shamir secret sharing over the prime field GF(2**521 - 1): any ``threshold`` shares rebuild the secret.

A secret of up to 64 bytes is the constant term of a random polynomial of degree ``threshold - 1``;
share ``x`` is the polynomial at ``x``. Fewer than ``threshold`` shares are consistent with every
secret, so they say nothing about it. The coefficients come from the operating system's entropy.
The field is the Mersenne prime 2**521 - 1 (larger than any 64-byte secret), so no secret is reduced.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from quorum.configs.errors import ReplyRejected

PRIME = (1 << 521) - 1
MAX_SECRET_BYTES = 64
_X_BYTES = 2
_Y_BYTES = 66  # 521 bits
SHARE_BYTES = _X_BYTES + _Y_BYTES


@dataclass(frozen=True)
class Share:
    """One point of the polynomial: ``x`` in 1..65535, ``y`` in the field."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(_X_BYTES, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != SHARE_BYTES:
            raise ReplyRejected(f"a share of {len(data)} bytes, expected {SHARE_BYTES}", fix="check the site's version")
        x, y = int.from_bytes(data[:_X_BYTES], "big"), int.from_bytes(data[_X_BYTES:], "big")
        if not x > 0 or not y < PRIME:
            raise ReplyRejected(f"share ({x}, ...) is not a point of the field", fix="check the site's version")
        return cls(x, y)


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> list[Share]:
    """One share per ``x`` (distinct, 1..65535); any ``threshold`` of them rebuild ``secret``."""
    if not 0 < len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(f"secret of {len(secret)} bytes; 1..{MAX_SECRET_BYTES} can be shared")
    if len(set(xs)) != len(xs) or not all(0 < x < 1 << 16 for x in xs):
        raise ValueError(f"share points must be distinct and in 1..65535, got {list(xs)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in 1..{len(xs)} (the number of shares)")
    # a leading length byte keeps leading zero bytes of the secret through the round trip
    coefficients = [int.from_bytes(bytes([len(secret)]) + secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in xs]


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """The secret from ``threshold`` shares with distinct points (the first ``threshold`` given are used)."""
    points = {share.x: share for share in shares}
    if len(points) < threshold:
        raise ReplyRejected(
            f"{len(points)} distinct shares, {threshold} needed to rebuild the secret",
            fix="more of the round's surviving sites must answer the unmasking request",
        )
    used = list(points.values())[:threshold]
    value = _interpolate_at_zero(used)
    size = value.bit_length() // 8  # the leading length byte sits in the top byte
    length = value >> (8 * size) if size else 0
    if not 0 < length <= MAX_SECRET_BYTES or length != size:
        raise ReplyRejected("the shares do not rebuild a secret (one of them is wrong)", fix="the round is void")
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "big")


def consistent(shares: Sequence[Share], threshold: int) -> bool:
    """Whether every share lies on the polynomial the first ``threshold`` define (a wrong share shows here)."""
    if len(shares) <= threshold:
        return True
    base = shares[:threshold]
    return all(_interpolate_at(base, extra.x) == extra.y for extra in shares[threshold:])


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value


def _interpolate_at_zero(shares: Sequence[Share]) -> int:
    return _interpolate_at(shares, 0)


def _interpolate_at(shares: Sequence[Share], at: int) -> int:
    """Lagrange interpolation of the polynomial through ``shares``, evaluated at ``at``."""
    total = 0
    for i, share in enumerate(shares):
        numerator, denominator = 1, 1
        for j, other in enumerate(shares):
            if i != j:
                numerator = numerator * (at - other.x) % PRIME
                denominator = denominator * (share.x - other.x) % PRIME
        total = (total + share.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total

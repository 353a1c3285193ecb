"""Secure aggregation after SecAgg+ (Bell et al. 2020, on Bonawitz et al. 2017): the maths, no I/O.

Per round, each site ``u`` of the round:
1. advertises two fresh X25519 public keys, one to encrypt shares (``c``), one to agree masks (``s``);
2. splits its mask key ``s_sk`` and a fresh self-mask seed ``b`` into Shamir shares (threshold ``t``)
   for its neighbourhood (itself and ``num_shares - 1`` neighbours on a ring graph shuffled per
   round, Bell et al.'s k-regular graph, so cost grows as n log n) and sends each neighbour its two
   shares encrypted under their ``c`` agreement, through the coordinator;
3. sends ``encode([w * clip(delta), w]) + PRG(b) + sum over neighbours v of +-PRG(s_uv)`` in the
   field GF(2**61 - 1), where ``w`` is its train rows and ``s_uv`` the ``s`` agreement with ``v``;
4. when asked to unmask, reveals for each neighbour exactly one share: of ``b`` if the coordinator
   says it survived, of ``s_sk`` if it says it dropped, and never the other kind later in the round.

The coordinator sums the survivors' vectors, removes each survivor's self-mask (rebuilt from ``t``
shares) and each dropped site's pair masks with the survivors (from its rebuilt ``s_sk``). A live
site's vector is covered by its self-mask, which the coordinator can only rebuild by calling the site
a survivor, and then it never gets the pair key: lying about dropouts reveals nothing about one site.
The masks come from AES-256-CTR keyed by seeds derived with HKDF and bound to the job, round and pair.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from quorum.configs.errors import ReplyRejected

Weights = list[NDArray[np.float32]]
Masked = NDArray[np.uint64]

FIELD = (1 << 61) - 1  # a Mersenne prime: two field elements add without overflowing uint64
SCALE_BITS = 24
SCALE = float(1 << SCALE_BITS)
MAX_ABS_VALUE = float(1 << 28)  # a site's |value| < 2**52 encoded: 256 sites' sum stays inside +-FIELD/2
KEY_BYTES = 32
BUNDLE_BYTES = 2 * KEY_BYTES  # the round's public keys: c (shares) then s (masks)
_INFO = b"quorum-secagg-plus-v1"


# --- fixed point in the field ---------------------------------------------------------------------


def flatten(weights: Sequence[NDArray[np.float32]]) -> NDArray[np.float64]:
    """One vector for the whole model, so masking and summing treat it as a single message."""
    if not weights:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(w, dtype=np.float64).reshape(-1) for w in weights])


def unflatten(vector: NDArray[np.floating], shapes: Sequence[tuple[int, ...]]) -> Weights:
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    if sum(sizes) != vector.size:
        raise ReplyRejected(f"vector of {vector.size} values for shapes totalling {sum(sizes)}", fix="check shapes")
    out: Weights = []
    start = 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(np.asarray(vector[start : start + size], dtype=np.float32).reshape(shape))
        start += size
    return out


def add_mean_delta(global_weights: Sequence[NDArray[np.float32]], mean_delta: NDArray[np.float64]) -> Weights:
    """The FedAvg model: the global weights plus the sites' weighted mean delta, in the layers' shapes."""
    delta = unflatten(mean_delta, [np.shape(w) for w in global_weights])
    return [
        (np.asarray(w, dtype=np.float64) + d).astype(np.float32) for w, d in zip(global_weights, delta, strict=True)
    ]


def encode(vector: NDArray[np.floating]) -> Masked:
    """Fixed point with 24 fractional bits, negatives as ``FIELD - |x|``, so sums in the field are exact."""
    values = np.asarray(vector, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ReplyRejected("the update holds NaN or Inf and cannot be encoded", fix="check the site's training")
    peak = float(np.abs(values).max(initial=0.0))
    if peak >= MAX_ABS_VALUE:
        raise ReplyRejected(
            f"value {peak:.3g} is too large for fixed-point encoding (limit {MAX_ABS_VALUE:.3g})",
            fix="lower training.secagg.clip_norm or the example counts it multiplies",
        )
    signed = np.rint(values * SCALE).astype(np.int64)
    signed += (signed >> 63) & FIELD  # + FIELD where negative: the shift is -1 there, 0 elsewhere
    return signed.view(np.uint64)


def decode(encoded: Masked) -> NDArray[np.float64]:
    """Field elements above FIELD / 2 are negative; a masked vector decodes to noise of about +-2**36."""
    signed = np.array(encoded, dtype=np.uint64).view(np.int64)  # field elements fit in int64
    signed -= ((FIELD // 2 - signed) >> 63) & FIELD  # - FIELD above FIELD / 2
    return signed / SCALE


def add(a: Masked, b: Masked) -> Masked:
    total = FieldSum(a)
    total.add(b)
    return total.result()


def subtract(a: Masked, b: Masked) -> Masked:
    total = FieldSum(a)
    total.subtract(b)
    return total.result()


class FieldSum:
    """A running sum in the field, in place and reduced lazily: values below 2**61 may be added six
    times before a fold (``x = (x & FIELD) + (x >> 61)``, since 2**61 = 1 in the field) is needed."""

    _FOLD_EVERY = 6

    def __init__(self, start: Masked) -> None:
        self._total = np.array(start, dtype=np.uint64)
        self._pending = 0

    def add(self, values: Masked) -> None:
        self._total += values
        self._step()

    def subtract(self, values: Masked) -> None:
        self._total += np.uint64(FIELD)  # values <= FIELD, so total + FIELD - values never goes below 0
        self._total -= values
        self._step()

    def _step(self) -> None:
        self._pending += 1
        if self._pending >= self._FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        high = self._total >> np.uint64(61)
        self._total &= np.uint64(FIELD)
        self._total += high
        self._pending = 0

    def result(self) -> Masked:
        self._fold()
        self._total[self._total >= FIELD] -= np.uint64(FIELD)
        return self._total


def in_field(vector: Masked) -> bool:
    """The one check of a masked value: it is an element of the field."""
    return bool((np.asarray(vector, dtype=np.uint64) < FIELD).all())


def clip(vector: NDArray[np.floating], max_norm: float) -> NDArray[np.float64]:
    """``vector`` scaled down to L2 norm ``max_norm`` if longer; never scaled up."""
    values = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(values))
    return values * (max_norm / norm) if norm > max_norm else values


def prg(seed: bytes, length: int) -> Masked:
    """``length`` field elements from AES-256-CTR keyed by ``seed`` (a seed is used for one mask only).

    Each is the keystream's 64-bit word cut to its low 61 bits: uniform over 0..FIELD, where FIELD
    itself is a second name for 0 (bias 2**-61); ``FieldSum`` reduces it like any other value.
    """
    words = np.empty(length + 2, dtype=np.uint64)  # update_into wants room for a block more
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    encryptor.update_into(bytes(8 * length), words.data.cast("B"))
    words = words[:length]
    words &= np.uint64(FIELD)
    return words


def derive(secret: bytes, label: str, *context: object) -> bytes:
    info = b"|".join([_INFO, label.encode(), *(str(c).encode() for c in context)])
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


# --- the round's graph and threshold --------------------------------------------------------------


@dataclass(frozen=True)
class RoundPlan:
    """Who shares with whom this round: every site's neighbourhood (itself included) and the threshold."""

    members: tuple[str, ...]
    neighbourhoods: Mapping[str, tuple[str, ...]]
    threshold: int

    @property
    def num_shares(self) -> int:
        return len(next(iter(self.neighbourhoods.values())))

    def x_of(self, site_id: str) -> int:
        """The site's Shamir point: its place in the sorted member list, from 1."""
        return self.members.index(site_id) + 1


def default_num_shares(num_sites: int) -> int:
    """Bell et al.'s O(log n) neighbourhood: the odd number 2 * ceil(log2 n) + 1, at most every site."""
    return min(num_sites, 2 * math.ceil(math.log2(max(num_sites, 2))) + 1)


def threshold_for(num_shares: int, threshold: int | float | None) -> int:
    """Shares needed to rebuild a secret: always more than half the neighbourhood, so no two disjoint
    sets of sites can each hold enough of a site's shares (one kind each) to rebuild both its secrets."""
    majority = num_shares // 2 + 1
    if threshold is None:
        return majority
    wanted = threshold if isinstance(threshold, int) else math.ceil(threshold * num_shares)
    if not majority <= wanted <= num_shares:
        raise ReplyRejected(
            f"threshold {threshold} gives {wanted} of {num_shares} shares; it must be a strict majority "
            f"({majority}..{num_shares})",
            fix="set training.secagg.threshold to a fraction above 0.5, or to an int within that range",
        )
    return wanted


def plan_round(
    members: Collection[str], job_id: str, server_round: int, num_shares: int | None, threshold: int | float | None
) -> RoundPlan:
    """Each site's neighbourhood on a ring of the members shuffled per round (public: both sides compute it)."""
    ordered = tuple(sorted(members))
    n = len(ordered)
    shares = min(n, default_num_shares(n) if num_shares is None else num_shares)
    half = (shares - 1) // 2
    digest = hashlib.sha256(b"|".join([_INFO, b"graph", job_id.encode(), str(server_round).encode()])).digest()
    ring = [ordered[i] for i in np.random.default_rng(int.from_bytes(digest, "big")).permutation(n)]
    neighbourhoods: dict[str, tuple[str, ...]] = {}
    for position, site_id in enumerate(ring):
        near = ordered if shares >= n else {ring[(position + step) % n] for step in range(-half, half + 1)}
        neighbourhoods[site_id] = tuple(sorted(near))
    size = len(next(iter(neighbourhoods.values()))) if neighbourhoods else 0
    return RoundPlan(ordered, neighbourhoods, threshold_for(size, threshold) if size else 0)


def pair_sign(owner: str, peer: str) -> int:
    """The lower site id adds the pair's mask, the higher subtracts it."""
    return 1 if owner < peer else -1


def pair_seed(secret: bytes, site_a: str, site_b: str, server_round: int, job_id: str) -> bytes:
    low, high = sorted((site_a, site_b))
    return derive(secret, "pair", job_id, server_round, low, high)


def agree(private: X25519PrivateKey, public: bytes) -> bytes:
    return private.exchange(X25519PublicKey.from_public_bytes(public))


def split_bundle(bundle: bytes) -> tuple[bytes, bytes]:
    """A site's round keys as ``(c, s)`` public keys; a bundle of the wrong size is refused."""
    if len(bundle) != BUNDLE_BYTES:
        raise ReplyRejected(f"round keys of {len(bundle)} bytes, expected {BUNDLE_BYTES}", fix="check the site")
    return bundle[:KEY_BYTES], bundle[KEY_BYTES:]

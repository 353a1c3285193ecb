"""Secure aggregation with pairwise additive masks (the pairwise-mask core of Bonawitz et al. 2017).

Every pair of sites agrees on a secret by X25519, stretches it with HKDF into a seed bound to the
job, the round and the pair, and draws a mask from it; the lower site id adds the mask, the higher
subtracts it. The coordinator sees only masked vectors, and their sum, where every mask cancels.
Values are fixed-point encoded into uint64 first, so the wraparound sum is exact and masks cancel
bit for bit. Each site masks ``[weight * update, weight]``, so the sum yields the FedAvg result.

If a site masks but never sends, its pairs' masks stay in the sum; the survivors then reveal the
seeds they shared with it (seeds for this job and round only, never the key) and the coordinator
removes them. Trust model: an honest-but-curious coordinator. Not implemented from the paper: the
self-mask and secret sharing that stop a coordinator from unmasking a late reply it declared dropped,
and recovery when a survivor also drops during the reveal.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from quorum.configs.errors import ReplyRejected

Weights = list[NDArray[np.float32]]
Masked = NDArray[np.uint64]

SCALE_BITS = 16
SCALE = float(1 << SCALE_BITS)
MAX_ABS_VALUE = float(1 << 30)  # encoded |x| < 2**46: the sum of up to 2**16 sites stays inside int64
_INFO = b"quorum-secagg-v1"


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


def encode(vector: NDArray[np.floating]) -> Masked:
    """Fixed point with 16 fractional bits, as two's complement in uint64 so additions wrap exactly."""
    values = np.asarray(vector, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ReplyRejected("the update holds NaN or Inf and cannot be encoded", fix="check the site's training")
    peak = float(np.abs(values).max(initial=0.0))
    if peak >= MAX_ABS_VALUE:
        raise ReplyRejected(
            f"value {peak:.3g} is too large for fixed-point encoding (limit {MAX_ABS_VALUE:.3g})",
            fix="mask a smaller weight (e.g. examples / 1000) or clip the update",
        )
    return np.rint(values * SCALE).astype(np.int64).view(np.uint64)


def decode(encoded: Masked) -> NDArray[np.float64]:
    return np.asarray(encoded, dtype=np.uint64).view(np.int64).astype(np.float64) / SCALE


def _pair_seed(secret: bytes, site_a: str, site_b: str, server_round: int, job_id: str) -> bytes:
    low, high = sorted((site_a, site_b))
    context = b"|".join([_INFO, job_id.encode(), str(server_round).encode(), low.encode(), high.encode()])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(secret)


def _mask(seed: bytes, length: int) -> Masked:
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))
    return rng.integers(0, np.iinfo(np.uint64).max, size=length, dtype=np.uint64, endpoint=True)


def _signed_mask(seed: bytes, owner: str, peer: str, length: int) -> Masked:
    """The mask ``owner`` put into its vector for the pair (owner, peer): + for the lower id, - for the higher."""
    mask = _mask(seed, length)
    return mask if owner < peer else np.zeros(length, dtype=np.uint64) - mask


@dataclass(frozen=True)
class SecAggSite:
    """One site's side of the protocol; the private key never leaves this object."""

    site_id: str
    private_key: X25519PrivateKey

    @classmethod
    def generate(cls, site_id: str) -> SecAggSite:
        return cls(site_id, X25519PrivateKey.generate())

    def public_key_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes_raw()

    def _seed_with(self, peer_id: str, peer_public: bytes, server_round: int, job_id: str) -> bytes:
        secret = self.private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        return _pair_seed(secret, self.site_id, peer_id, server_round, job_id)

    def mask(
        self,
        vector: NDArray[np.floating],
        weight: float,
        peers: Mapping[str, bytes],
        server_round: int,
        job_id: str,
    ) -> Masked:
        """``encode([weight * vector, weight])`` plus this site's pairwise masks with every peer."""
        if not weight > 0:
            raise ReplyRejected(f"site {self.site_id} masks with weight {weight}", fix="weight by examples (> 0)")
        payload = np.append(np.asarray(vector, dtype=np.float64) * weight, weight)
        masked = encode(payload)
        for peer_id, peer_public in sorted(peers.items()):
            if peer_id == self.site_id:
                continue
            seed = self._seed_with(peer_id, peer_public, server_round, job_id)
            masked = masked + _signed_mask(seed, self.site_id, peer_id, masked.size)
        return masked

    def reveal_pair_seeds(
        self, dropped_ids: Collection[str], peers: Mapping[str, bytes], server_round: int, job_id: str
    ) -> dict[str, bytes]:
        """The seeds this site shared with the dropped sites, for this round and job only."""
        missing = sorted(d for d in dropped_ids if d not in peers)
        if missing:
            raise ReplyRejected(f"no public key for dropped sites {missing}", fix="pass the round's key list")
        return {
            dropped: self._seed_with(dropped, peers[dropped], server_round, job_id)
            for dropped in sorted(dropped_ids)
            if dropped != self.site_id
        }


def unmask_dropouts(
    total: Masked,
    survivors: Collection[str],
    dropped: Collection[str],
    revealed: Mapping[str, Mapping[str, bytes]],
) -> Masked:
    """Remove from ``total`` the masks each survivor shared with each dropped site."""
    missing = [(s, d) for s in sorted(survivors) for d in sorted(dropped) if d not in revealed.get(s, {})]
    if missing:
        raise ReplyRejected(
            f"seeds not revealed for {', '.join(f'{s}<->{d}' for s, d in missing)}",
            fix="every surviving site must reveal its seed with every dropped site, or the round is void",
        )
    cleaned = np.array(total, dtype=np.uint64)
    for survivor in sorted(survivors):
        for gone in sorted(dropped):
            cleaned -= _signed_mask(revealed[survivor][gone], survivor, gone, cleaned.size)
    return cleaned


def secure_sum(
    masked_vectors: Mapping[str, Masked],
    participants: Collection[str],
    revealed: Mapping[str, Mapping[str, bytes]],
) -> NDArray[np.float64]:
    """The decoded sum of the survivors' payloads (``[sum of weight * update, sum of weights]``).

    ``participants`` are the sites that were given the round's key list and so may have masked;
    those missing from ``masked_vectors`` are treated as dropped.
    """
    if not masked_vectors:
        raise ReplyRejected("no masked vectors to sum", fix="check that at least min_sites sites replied")
    strangers = sorted(set(masked_vectors) - set(participants))
    if strangers:
        raise ReplyRejected(f"masked vectors from non-participants {strangers}", fix="drop those replies")
    lengths = {v.size for v in masked_vectors.values()}
    if len(lengths) != 1:
        raise ReplyRejected(f"masked vectors differ in length: {sorted(lengths)}", fix="check the sites' models")
    total = np.zeros(lengths.pop(), dtype=np.uint64)
    for vector in masked_vectors.values():
        total += np.asarray(vector, dtype=np.uint64)
    dropped = sorted(set(participants) - set(masked_vectors))
    if dropped:
        total = unmask_dropouts(total, masked_vectors.keys(), dropped, revealed)
    return decode(total)


def fedavg_from_sum(total: NDArray[np.float64], shapes: Sequence[tuple[int, ...]]) -> Weights:
    """Divide the weighted sum by the summed weight (the last coordinate) and restore the layer shapes."""
    weight = float(total[-1])
    if not weight > 0:
        raise ReplyRejected(f"summed weight is {weight}", fix="check that the sites masked positive weights")
    return unflatten(total[:-1] / weight, shapes)


def add_mean_delta(global_weights: Sequence[NDArray[np.float32]], total: NDArray[np.float64]) -> Weights:
    """The FedAvg model from the decoded sum of the sites' masked ``[n * delta, n]`` vectors."""
    delta = fedavg_from_sum(total, [np.shape(w) for w in global_weights])
    return [
        (np.asarray(w, dtype=np.float64) + d).astype(np.float32) for w, d in zip(global_weights, delta, strict=True)
    ]

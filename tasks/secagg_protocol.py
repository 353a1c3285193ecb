"""The SecAgg+ steps of one round: a site's four (:class:`SecAggSite`) and the coordinator's unmasking.

Pure: no files, no network. A site's keys and self-mask seed for a round all derive from one 32-byte
secret (drawn afresh for each attempt at a round by :mod:`quorum.tasks.site_secagg`), so a restarted
site answers a repeated request of the attempt exactly as before; what it revealed is passed in and
returned (``decided``), and the caller keeps it, so it never reveals the other kind of share.
See :mod:`quorum.tasks.secagg` for the protocol and the field.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from numpy.typing import NDArray

from quorum.configs.errors import ReplyRejected
from quorum.tasks.secagg import (
    KEY_BYTES,
    SCALE,
    FieldSum,
    Masked,
    RoundPlan,
    agree,
    decode,
    derive,
    encode,
    in_field,
    pair_seed,
    pair_sign,
    prg,
    split_bundle,
)
from quorum.tasks.shamir import SHARE_BYTES, Share, combine, consistent, split

SELF, PAIR = "self", "pair"  # the two kinds of share a site may reveal for a neighbour
_NONCE = bytes(12)  # every share key encrypts one message only


def _share_aad(job_id: str, server_round: int, sender: str, recipient: str) -> bytes:
    return f"{job_id}|{server_round}|{sender}|{recipient}".encode()


@dataclass(frozen=True)
class SecAggSite:
    """One site's side of the protocol for one job; its secret never leaves this object."""

    site_id: str
    job_id: str
    master: bytes

    @classmethod
    def generate(cls, site_id: str, job_id: str) -> SecAggSite:
        return cls(site_id, job_id, secrets.token_bytes(KEY_BYTES))

    def _private(self, label: str, server_round: int) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(derive(self.master, label, self.job_id, server_round))

    def _self_seed(self, server_round: int) -> bytes:
        return derive(self.master, "self-mask", self.job_id, server_round)

    def round_keys(self, server_round: int) -> bytes:
        """Step 1: the round's two public keys (shares, masks); fresh each round, so a key rebuilt
        after a dropout unmasks nothing in any other round."""
        channel, mask = self._private("channel", server_round), self._private("mask", server_round)
        return channel.public_key().public_bytes_raw() + mask.public_key().public_bytes_raw()

    def check_round(self, server_round: int, peers: Mapping[str, bytes], plan: RoundPlan) -> None:
        """The key list holds this site's own keys for the round, and the plan covers exactly its sites."""
        if peers.get(self.site_id) != self.round_keys(server_round):
            raise ReplyRejected(
                f"the round's key list does not hold site {self.site_id}'s keys for round {server_round}",
                fix="the coordinator must send the keys the sites advertised for this round",
            )
        if set(plan.members) != set(peers) or len(peers) < 2:
            raise ReplyRejected(
                f"site {self.site_id} was sent a plan for {sorted(plan.members)} and keys for {sorted(peers)}",
                fix="secure aggregation needs at least 2 sites per round, all with advertised keys",
            )

    def share_keys(self, server_round: int, peers: Mapping[str, bytes], plan: RoundPlan) -> dict[str, bytes]:
        """Step 2: for each site of the neighbourhood (itself too) its shares of ``b`` and ``s_sk``, encrypted."""
        self.check_round(server_round, peers, plan)
        neighbourhood = plan.neighbourhoods[self.site_id]
        xs = [plan.x_of(v) for v in neighbourhood]
        mask_key = self._private("mask", server_round).private_bytes_raw()
        seed_shares = split(self._self_seed(server_round), plan.threshold, xs)
        key_shares = split(mask_key, plan.threshold, xs)
        channel = self._private("channel", server_round)
        out: dict[str, bytes] = {}
        for recipient, seed_share, key_share in zip(neighbourhood, seed_shares, key_shares, strict=True):
            key = derive(agree(channel, split_bundle(peers[recipient])[0]), "share", self.job_id, server_round)
            aad = _share_aad(self.job_id, server_round, self.site_id, recipient)
            out[recipient] = AESGCM(key).encrypt(_NONCE, seed_share.to_bytes() + key_share.to_bytes(), aad)
        return out

    def mask(
        self,
        vector: NDArray[np.floating],
        weight: float,
        server_round: int,
        peers: Mapping[str, bytes],
        plan: RoundPlan,
        unshared: Collection[str] = (),
    ) -> Masked:
        """Step 3: ``encode([weight * vector, weight])`` plus the self-mask and the pair masks with every
        neighbour that shared its keys (``unshared`` are the sites that did not, so masked with nobody)."""
        self.check_round(server_round, peers, plan)
        if not weight > 0:
            raise ReplyRejected(f"site {self.site_id} masks with weight {weight}", fix="weight by examples (> 0)")
        if self.site_id in unshared:
            raise ReplyRejected(f"site {self.site_id} is told it did not share its keys", fix="the round is void")
        masked = FieldSum(encode(np.append(np.asarray(vector, dtype=np.float64) * weight, weight)))
        size = np.size(vector) + 1
        masked.add(prg(self._self_seed(server_round), size))
        private = self._private("mask", server_round)
        for peer in plan.neighbourhoods[self.site_id]:
            if peer == self.site_id or peer in unshared:
                continue
            secret = agree(private, split_bundle(peers[peer])[1])
            seed = pair_seed(secret, self.site_id, peer, server_round, self.job_id)
            (masked.add if pair_sign(self.site_id, peer) > 0 else masked.subtract)(prg(seed, size))
        return masked.result()

    def reveal(
        self,
        server_round: int,
        peers: Mapping[str, bytes],
        plan: RoundPlan,
        dropped: Collection[str],
        ciphertexts: Mapping[str, bytes],
        decided: Mapping[str, str],
    ) -> tuple[dict[str, bytes], dict[str, str]]:
        """Step 4: for each neighbour that sent this site shares, its self-mask share if it survived or its
        mask-key share if it dropped, never both; returns the shares and every decision of the round so far.

        Refused when fewer than ``threshold`` sites survive (the sum would be too small to hide in), when
        this site is called dropped, when a ciphertext is not one its sender encrypted for it, or when a
        neighbour's kind of share differs from what this site already revealed for it (``decided``).
        """
        self.check_round(server_round, peers, plan)
        survivors = set(peers) - set(dropped)
        if self.site_id not in survivors:
            raise ReplyRejected(f"site {self.site_id} is asked to unmask as a dropped site", fix="the round is void")
        if len(survivors) < max(2, plan.threshold):
            raise ReplyRejected(
                f"only {len(survivors)} sites survive round {server_round}, {max(2, plan.threshold)} needed to unmask",
                fix="the round is void: too few sites sent their masked update",
            )
        strangers = sorted(set(ciphertexts) - set(plan.neighbourhoods[self.site_id]))
        if strangers:
            raise ReplyRejected(f"shares from {strangers}, who are not neighbours of {self.site_id}", fix="void")
        channel = self._private("channel", server_round)
        decisions = dict(decided)
        revealed: dict[str, bytes] = {}
        for sender, ciphertext in sorted(ciphertexts.items()):
            kind = PAIR if sender in dropped else SELF
            if decisions.get(sender, kind) != kind:
                raise ReplyRejected(
                    f"site {self.site_id} already revealed site {sender}'s {decisions[sender]} share in round "
                    f"{server_round}; it never reveals both kinds",
                    fix="the coordinator changed its list of dropped sites within a round; the round is void",
                )
            key = derive(agree(channel, split_bundle(peers[sender])[0]), "share", self.job_id, server_round)
            try:
                plain = AESGCM(key).decrypt(
                    _NONCE, ciphertext, _share_aad(self.job_id, server_round, sender, self.site_id)
                )
            except InvalidTag:
                raise ReplyRejected(
                    f"the shares site {sender} sent to {self.site_id} do not decrypt", fix="the round is void"
                ) from None
            decisions[sender] = kind
            revealed[sender] = plain[:SHARE_BYTES] if kind == SELF else plain[SHARE_BYTES:]
        return revealed, decisions


# --- the coordinator --------------------------------------------------------------------------------


def unmask_sum(
    masked: Mapping[str, Masked],
    peers: Mapping[str, bytes],
    plan: RoundPlan,
    shared: Collection[str],
    revealed: Mapping[str, Mapping[str, bytes]],
    server_round: int,
    job_id: str,
) -> NDArray[np.float64]:
    """The decoded sum of the survivors' payloads ``[sum of w * delta, sum of w]``.

    ``masked`` holds the survivors' vectors; ``shared`` the sites that shared their keys (and so were
    masked with); ``revealed[v][u]`` the share site ``v`` revealed for ``u``: of ``u``'s self-mask seed if
    ``u`` survived, of its mask key if it is in ``shared`` but sent no vector.
    """
    if not masked:
        raise ReplyRejected("no masked vectors to sum", fix="check that at least min_sites sites replied")
    strangers = sorted(set(masked) - set(shared))
    if strangers:
        raise ReplyRejected(f"masked vectors from sites that shared no keys: {strangers}", fix="drop those replies")
    lengths = {v.size for v in masked.values()}
    if len(lengths) != 1:
        raise ReplyRejected(f"masked vectors differ in length: {sorted(lengths)}", fix="check the sites' models")
    size = lengths.pop()
    if not all(in_field(v) for v in masked.values()):
        raise ReplyRejected("a masked vector holds values outside the field", fix="validate replies first")
    total = FieldSum(np.zeros(size, dtype=np.uint64))
    for vector in masked.values():
        total.add(np.asarray(vector, dtype=np.uint64))
    for survivor in sorted(masked):
        total.subtract(prg(_rebuild(survivor, plan, revealed, "self-mask seed"), size))
    for gone in sorted(set(shared) - set(masked)):
        private = X25519PrivateKey.from_private_bytes(_rebuild(gone, plan, revealed, "mask key"))
        if private.public_key().public_bytes_raw() != split_bundle(peers[gone])[1]:
            raise ReplyRejected(f"site {gone}'s rebuilt mask key does not match its key", fix="a share was wrong")
        for peer in plan.neighbourhoods[gone]:
            if peer in masked:  # the mask ``peer`` added for the pair (peer, gone) stays in the sum
                seed = pair_seed(agree(private, split_bundle(peers[peer])[1]), peer, gone, server_round, job_id)
                (total.subtract if pair_sign(peer, gone) > 0 else total.add)(prg(seed, size))
    return decode(total.result())


def _rebuild(owner: str, plan: RoundPlan, revealed: Mapping[str, Mapping[str, bytes]], what: str) -> bytes:
    """``owner``'s secret from the shares its neighbours revealed; a share at another site's point is ignored."""
    shares = [
        share
        for holder, answer in sorted(revealed.items())
        if owner in answer and holder in plan.neighbourhoods[owner]
        for share in [Share.from_bytes(answer[owner])]
        if share.x == plan.x_of(holder)
    ]
    if len(shares) < plan.threshold:
        raise ReplyRejected(
            f"{len(shares)} shares of site {owner}'s {what} were revealed, {plan.threshold} needed",
            fix="too many of its neighbours dropped during unmasking; the round is void",
        )
    if not consistent(shares, plan.threshold):
        raise ReplyRejected(
            f"the shares of site {owner}'s {what} disagree: a site revealed a wrong share",
            fix="the round is void; check the sites' versions and logs",
        )
    return combine(shares, plan.threshold)


def checked_mean_delta(
    total: NDArray[np.float64], expected_weight: float, clip_norm: float, num_sites: int
) -> NDArray[np.float64]:
    """The weighted mean delta from the unmasked sum, once the sum passed the checks every honest site keeps.

    The summed weight must equal ``expected_weight`` (the survivors' train rows from their data
    fingerprints), and the sum's norm stay within ``clip_norm`` times it (each honest site clips its
    delta to ``clip_norm`` before weighting). Otherwise some site masked an inflated weight or an
    unclipped or random vector: the round is refused, since the sum cannot tell which site did it.
    """
    summed, weight = total[:-1], float(total[-1])
    rounding = num_sites / SCALE  # each site's encoding is off by at most half a unit per value
    if abs(weight - expected_weight) > rounding:
        raise ReplyRejected(
            f"the masked updates sum to weight {weight:.6g}, but the survivors' fingerprints hold "
            f"{expected_weight:g} train rows: a site masked another example count",
            fix="find the site whose weight differs (its own logs); secure aggregation hides which one",
        )
    norm, bound = float(np.linalg.norm(summed)), clip_norm * expected_weight
    if norm > bound + rounding * np.sqrt(summed.size):
        raise ReplyRejected(
            f"the sum of the masked updates has norm {norm:.6g}, above {bound:.6g} (clip_norm {clip_norm:g} x "
            f"{expected_weight:g} train rows): a site did not clip its update, or sent a random vector",
            fix="find the site that did not clip (its own logs); secure aggregation hides which one",
        )
    return summed / expected_weight

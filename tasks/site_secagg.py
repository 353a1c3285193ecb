"""A site's side of secure aggregation (SecAgg+): the four steps of a round, on the site's own files.

Each ``keys`` request starts an *attempt* at a round: the site draws a fresh 32-byte secret for it
(``<root>/.secagg/<job>.rNNNN.key``, mode 0600, in a 0700 folder) from which the round's key pairs and
self-mask seed derive, and forgets the previous attempt's records. So a round that is run again (a
resumed job, or a coordinator that asks twice) is masked with new secrets, never the old masks over
another update. Only the public keys, the encrypted shares and the masked update leave the site.

The masked update is the site's *delta* to the global model, clipped to ``training.secagg.clip_norm``
and weighted by its own train rows (``[n * clip(w_site - w_global), n]``): the coordinator checks the
summed weight against the survivors' data fingerprints. Within an attempt the site sends one masked
vector only (its digest is kept in ``<job>.rNNNN.masked``), and what it revealed is written down
(``<job>.rNNNN.reveal.json``) before it answers, so no later request of the attempt gets another
vector under the same masks, or the other kind of share of the same neighbour, even after a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quorum.configs.errors import ReplyRejected, SiteDataError
from quorum.configs.schema import FederationConfig, SiteConfig
from quorum.tasks.secagg import KEY_BYTES, Masked, RoundPlan, clip, flatten, plan_round
from quorum.tasks.secagg_protocol import SecAggSite

if TYPE_CHECKING:
    from quorum.tasks.weights import Weights

KEY_DIR = ".secagg"
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class MaskedUpdate:
    """What a site sends under secure aggregation: its masked weighted delta, never its weights."""

    site_id: str
    server_round: int
    masked: Masked
    num_examples: int
    train_loss: float
    train_s: float = 0.0


def key_path(site: SiteConfig, job_id: str) -> Path:
    """The stem of the site's secure-aggregation files for ``job_id``; the id comes from the coordinator,
    so it is checked before it names a file."""
    if not _JOB_ID.match(job_id):
        raise ReplyRejected(f"job id {job_id!r} is not a plain name", fix="the coordinator sent a malformed request")
    return site.root / KEY_DIR / f"{job_id}.key"


def round_file(site: SiteConfig, job_id: str, server_round: int, suffix: str) -> Path:
    return key_path(site, job_id).with_name(f"{job_id}.r{server_round:04d}.{suffix}")


def site_key(config: FederationConfig, site_id: str, job_id: str, server_round: int) -> SecAggSite:
    """The site's secrets for the current attempt at the round, as ``round_keys`` last drew them."""
    path = round_file(config.site(site_id), job_id, server_round, "key")
    if not path.is_file():
        raise ReplyRejected(
            f"site {site_id} advertised no keys for round {server_round} of job {job_id}",
            fix="the coordinator must start each round with a keys request",
        )
    secret = path.read_bytes()
    if len(secret) != KEY_BYTES:
        raise SiteDataError(
            f"site {site_id}'s secure-aggregation secret {path} is damaged: {len(secret)} bytes, not {KEY_BYTES}",
            fix="nothing to repair: the next round draws a new one (this round is void for the site)",
        )
    return SecAggSite(site_id, job_id, secret)


def _write_private(path: Path, data: bytes) -> None:
    """Atomically, readable by the owner only: a reader sees the old or the new content, never half."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    handle = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(handle, data)
        os.fsync(handle)
    finally:
        os.close(handle)
    os.replace(staging, path)


def round_plan(config: FederationConfig, job_id: str, server_round: int, members: Collection[str]) -> RoundPlan:
    """The round's neighbourhoods and threshold from the site's *own* config: a coordinator cannot lower them."""
    secagg = config.training.secagg
    return plan_round(members, job_id, server_round, secagg.num_shares, secagg.threshold)


def round_keys(config: FederationConfig, site_id: str, job_id: str, server_round: int) -> bytes:
    """Step 1, advertise: a new attempt at the round with a fresh secret; its two public keys leave the site."""
    site = config.site(site_id)
    for suffix in ("masked", "reveal.json"):  # the previous attempt's records; its secret goes next
        round_file(site, job_id, server_round, suffix).unlink(missing_ok=True)
    _write_private(round_file(site, job_id, server_round, "key"), secrets.token_bytes(KEY_BYTES))
    return site_key(config, site_id, job_id, server_round).round_keys(server_round)


def share_keys(
    config: FederationConfig, site_id: str, job_id: str, server_round: int, peers: Mapping[str, bytes]
) -> dict[str, bytes]:
    """Step 2, share: this site's encrypted Shamir shares, one ciphertext per site of its neighbourhood."""
    site = site_key(config, site_id, job_id, server_round)
    return site.share_keys(server_round, peers, round_plan(config, job_id, server_round, peers))


def train_site_masked(
    config: FederationConfig,
    site_id: str,
    global_weights: Weights,
    server_round: int,
    job_id: str,
    peers: Mapping[str, bytes],
    unshared: Collection[str] = (),
) -> MaskedUpdate:
    """Step 3, masked input: train, then send ``[n * clip(trained - global), n]`` masked.

    ``unshared`` are the sites of ``peers`` that did not share their keys, so nobody masks with them.
    """
    from quorum.tasks import site as site_work

    site = site_key(config, site_id, job_id, server_round)
    plan = round_plan(config, job_id, server_round, peers)
    site.check_round(server_round, peers, plan)  # before training: a bad key list would waste the work
    update = site_work.train_site(config, site_id, global_weights, server_round)
    delta = clip(flatten(update.weights) - flatten(global_weights), config.training.secagg.clip_norm)
    masked = site.mask(delta, float(update.num_examples), server_round, peers, plan, unshared)
    _send_once(round_file(config.site(site_id), job_id, server_round, "masked"), masked, site_id, server_round)
    return MaskedUpdate(site_id, update.server_round, masked, update.num_examples, update.train_loss, update.train_s)


def reveal_shares(
    config: FederationConfig,
    site_id: str,
    job_id: str,
    server_round: int,
    peers: Mapping[str, bytes],
    dropped: Collection[str],
    ciphertexts: Mapping[str, bytes],
) -> dict[str, bytes]:
    """Step 4, unmask: one share per neighbour that shared with this site (see ``SecAggSite.reveal``).

    The decisions are saved before the shares leave, so a second request in the round that calls a
    neighbour dropped after it was called alive (or the reverse) is refused, also after a restart.
    """
    site = site_key(config, site_id, job_id, server_round)
    plan = round_plan(config, job_id, server_round, peers)
    record = round_file(config.site(site_id), job_id, server_round, "reveal.json")
    decided = _read_decisions(record)
    revealed, decisions = site.reveal(server_round, peers, plan, dropped, ciphertexts, decided)
    if decisions != decided:
        _write_decisions(record, decisions)
    return revealed


def _read_decisions(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {str(k): str(v) for k, v in data.items()}
    except (ValueError, AttributeError) as exc:
        raise SiteDataError(
            f"the record of what this site revealed ({path}) is damaged: {exc}",
            fix="the round cannot be unmasked safely by this site; start a new job",
        ) from exc


def _write_decisions(path: Path, decisions: Mapping[str, str]) -> None:
    _write_private(path, json.dumps(dict(sorted(decisions.items()))).encode())


def _send_once(path: Path, masked: Masked, site_id: str, server_round: int) -> None:
    """Record the digest of the one masked vector of this attempt; refuse a different one under its masks."""
    digest = hashlib.sha256(np.ascontiguousarray(masked).tobytes()).hexdigest()
    if path.is_file() and path.read_text() != digest:
        raise ReplyRejected(
            f"site {site_id} already sent another masked update in this attempt at round {server_round}: a second "
            "one under the same masks would reveal their difference",
            fix="the coordinator must start the round again with a keys request (fresh secrets)",
        )
    _write_private(path, digest.encode())

"""A site's side of secure aggregation: its key pair for a job, its masked update, and its seed reveal.

The private key is created at the site, stays in the site's own folder (``<root>/.secagg/<job>.key``,
mode 0600) and never travels; only the public key does. A masked update is the site's example-weighted
*delta* to the global model (``[n * (w_site - w_global), n]``, see :mod:`quorum.tasks.secagg`): deltas are small,
so the fixed-point encoding has room, and the coordinator adds the decoded mean delta to its global model.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from quorum.configs.errors import ReplyRejected, SiteDataError
from quorum.configs.schema import FederationConfig, SiteConfig
from quorum.tasks.secagg import Masked, SecAggSite, flatten

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
    """Where the site keeps its private key for ``job_id``; the id comes from the coordinator, so it is checked."""
    if not _JOB_ID.match(job_id):
        raise ReplyRejected(f"job id {job_id!r} is not a plain name", fix="the coordinator sent a malformed request")
    return site.root / KEY_DIR / f"{job_id}.key"


def site_key(config: FederationConfig, site_id: str, job_id: str) -> SecAggSite:
    """The site's key pair for the job: created on first use, then read back (a restarted session keeps it)."""
    path = key_path(config.site(site_id), job_id)
    if not path.is_file():
        _create_key(path)
    try:
        return SecAggSite(site_id, X25519PrivateKey.from_private_bytes(path.read_bytes()))
    except ValueError as exc:
        raise SiteDataError(
            f"site {site_id}'s secure-aggregation key {path} is damaged: {exc}",
            fix="delete the file and restart the job (a key is per job)",
        ) from exc


def _create_key(path: Path) -> None:
    """Write a new private key readable by the owner only; a key written concurrently wins, never a mix."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    handle = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(handle, X25519PrivateKey.generate().private_bytes_raw())
    finally:
        os.close(handle)
    try:
        os.link(staging, path)  # atomic and refuses to replace: a key some peer already holds stays
    except FileExistsError:
        pass
    finally:
        staging.unlink()


def public_key(config: FederationConfig, site_id: str, job_id: str) -> bytes:
    """The only part of the key pair that leaves the site."""
    return site_key(config, site_id, job_id).public_key_bytes()


def _checked_peers(site: SecAggSite, peers: Mapping[str, bytes]) -> None:
    if peers.get(site.site_id) != site.public_key_bytes():
        raise ReplyRejected(
            f"the round's key list does not hold site {site.site_id}'s public key",
            fix="the coordinator must send the keys the sites published for this job",
        )
    if len(peers) < 2:
        raise ReplyRejected(
            f"site {site.site_id} would be the only one in the sum, which would reveal its update",
            fix="secure aggregation needs at least 2 sites per round",
        )


def train_site_masked(
    config: FederationConfig,
    site_id: str,
    global_weights: Weights,
    server_round: int,
    job_id: str,
    peers: Mapping[str, bytes],
) -> MaskedUpdate:
    """Train as usual, then send ``[n * (trained - global), n]`` plus this site's pairwise masks with every peer."""
    from quorum.tasks import site as site_work

    site = site_key(config, site_id, job_id)
    _checked_peers(site, peers)  # before training: a bad key list would waste the work
    update = site_work.train_site(config, site_id, global_weights, server_round)
    delta: NDArray[np.float64] = flatten(update.weights) - flatten(global_weights)
    masked = site.mask(delta, float(update.num_examples), peers, server_round, job_id)
    return MaskedUpdate(site_id, update.server_round, masked, update.num_examples, update.train_loss, update.train_s)


def reveal_seeds(
    config: FederationConfig,
    site_id: str,
    job_id: str,
    server_round: int,
    peers: Mapping[str, bytes],
    dropped: Collection[str],
) -> dict[str, bytes]:
    """The seeds this site shared with the dropped sites in this round, so the coordinator can remove them.

    Refused when the survivors' sum would hold this site alone: the seeds would then unmask its update.
    """
    site = site_key(config, site_id, job_id)
    _checked_peers(site, peers)
    if site_id in dropped:
        raise ReplyRejected(f"site {site_id} is asked to reveal as a dropped site", fix="the coordinator is confused")
    survivors = set(peers) - set(dropped)
    if len(survivors) < 2:
        raise ReplyRejected(
            f"revealing would leave site {site_id}'s update alone in the sum of round {server_round}",
            fix="the round needs at least 2 surviving sites; it is void",
        )
    return site.reveal_pair_seeds(dropped, peers, server_round, job_id)

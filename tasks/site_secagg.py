"""A site's side of secure aggregation (SecAgg+): the four steps of a round, on the site's own files.

The job's master secret is created at the site, stays in the site's own folder
(``<root>/.secagg/<job>.key``, mode 0600) and never travels: the round's public keys, encrypted shares
and the masked update do. The masked update is the site's *delta* to the global model, clipped to
``training.secagg.clip_norm`` and weighted by its own train rows (``[n * clip(w_site - w_global), n]``):
the coordinator checks the summed weight against the survivors' data fingerprints. What the site
revealed in a round is written down (``<job>.r<round>.reveal.json``) before it answers, so no later
request of the round gets the other kind of share of the same neighbour, even after a restart.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quorum.configs.errors import ReplyRejected, SiteDataError
from quorum.configs.schema import FederationConfig, SiteConfig
from quorum.tasks.secagg import KEY_BYTES, Masked, RoundPlan, clip, flatten, plan_round
from quorum.tasks.secagg_protocol import SecAggSite

if TYPE_CHECKING:
    from quorum.tasks.model import Weights

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
    """The site's master secret for the job: created on first use, then read back (a restart keeps it)."""
    path = key_path(config.site(site_id), job_id)
    if not path.is_file():
        _create_key(path)
    master = path.read_bytes()
    if len(master) != KEY_BYTES:
        raise SiteDataError(
            f"site {site_id}'s secure-aggregation key {path} is damaged: {len(master)} bytes, not {KEY_BYTES}",
            fix="delete the file and restart the job (a key is per job)",
        )
    return SecAggSite(site_id, job_id, master)


def _create_key(path: Path) -> None:
    """Write a new private key readable by the owner only; a key written concurrently wins, never a mix."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    handle = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(handle, secrets.token_bytes(KEY_BYTES))
    finally:
        os.close(handle)
    try:
        os.link(staging, path)  # atomic and refuses to replace: a key some peer already holds stays
    except FileExistsError:
        pass
    finally:
        staging.unlink()


def round_plan(config: FederationConfig, job_id: str, server_round: int, members: Collection[str]) -> RoundPlan:
    """The round's neighbourhoods and threshold from the site's *own* config: a coordinator cannot lower them."""
    secagg = config.training.secagg
    return plan_round(members, job_id, server_round, secagg.num_shares, secagg.threshold)


def round_keys(config: FederationConfig, site_id: str, job_id: str, server_round: int) -> bytes:
    """Step 1, advertise: the round's two public keys, the only part of the site's keys that leaves it."""
    return site_key(config, site_id, job_id).round_keys(server_round)


def share_keys(
    config: FederationConfig, site_id: str, job_id: str, server_round: int, peers: Mapping[str, bytes]
) -> dict[str, bytes]:
    """Step 2, share: this site's encrypted Shamir shares, one ciphertext per site of its neighbourhood."""
    site = site_key(config, site_id, job_id)
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

    site = site_key(config, site_id, job_id)
    plan = round_plan(config, job_id, server_round, peers)
    site.check_round(server_round, peers, plan)  # before training: a bad key list would waste the work
    update = site_work.train_site(config, site_id, global_weights, server_round)
    delta = clip(flatten(update.weights) - flatten(global_weights), config.training.secagg.clip_norm)
    masked = site.mask(delta, float(update.num_examples), server_round, peers, plan, unshared)
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
    site = site_key(config, site_id, job_id)
    plan = round_plan(config, job_id, server_round, peers)
    record = key_path(config.site(site_id), job_id).with_name(f"{job_id}.r{server_round:04d}.reveal.json")
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
    """Atomically, mode 0600: the next request of the round reads the old or the new record, never half."""
    staging = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    handle = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(handle, json.dumps(dict(sorted(decisions.items()))).encode())
        os.fsync(handle)
    finally:
        os.close(handle)
    os.replace(staging, path)

"""The coordinator's steps of a federated round, each a small function the round loop calls in order.

configure (start model, keys, privacy budget) -> validate replies -> aggregate (plain, private or
secure) -> server optimizer. The maths is in ``tasks``; these functions choose which of it the config
asks for, talk to the runner and explain in their exceptions what went wrong and what happens next.
"""

from __future__ import annotations

import secrets
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from quorum.configs.errors import ChampionError, ConfigError, NotEnoughSites
from quorum.configs.schema import FederationConfig, TrainingConfig
from quorum.flows.context import JobContext
from quorum.flows.runners.local import Reply, SecAggRound, SiteFailure, SiteRunner
from quorum.lineage.registry import load_verified_weights
from quorum.lineage.tracking import CHAMPION, alias_version
from quorum.tasks.privacy import PrivacyAccountant, private_mean
from quorum.tasks.replies import validate_masked_reply, validate_reply
from quorum.tasks.secagg import add_mean_delta, secure_sum
from quorum.tasks.site import SiteUpdate
from quorum.tasks.site_secagg import MaskedUpdate
from quorum.tasks.strategies import (
    ServerOptimizerState,
    aggregate,
    keep_fixed,
    min_replies,
    server_update,
    update_norm_outliers,
)
from quorum.tasks.weights import Weights

Accepted = dict[str, SiteUpdate | MaskedUpdate]
SEED_BYTES = 32


# --- configure ------------------------------------------------------------------------------------


def seed_weights(ctx: JobContext, fresh: Weights) -> tuple[Weights, str]:
    """The model the job starts from and where it came from: ``fresh``, the verified champion, or a checkpoint.

    The champion is loaded only after its signatures and provenance verified; either seed must have the
    configured model's layout, since the sites build that model.
    """
    training, name = ctx.config.training, ctx.config.model_name
    if training.start_from == "scratch":
        return fresh, "scratch"
    if training.start_from == "champion":
        version = alias_version(ctx.tracker, name, CHAMPION)
        if version is None:
            raise ChampionError(
                f"training.start_from is champion, but model {name} has no champion yet",
                fix="run the lifecycle once with start_from: scratch, or promote a model first",
            )
        seed = load_verified_weights(ctx.tracker, ctx.store, ctx.governance, name, version)
        source = f"champion v{version}"
    else:
        assert training.checkpoint is not None  # the schema requires it for start_from checkpoint
        seed, source = read_checkpoint(training.checkpoint), f"checkpoint {training.checkpoint}"
    _require_layout(seed, fresh, source, ctx.config)
    return [np.array(w, dtype=np.float32) for w in seed], source


def read_checkpoint(path: Path) -> Weights:
    """Arrays of an ``.npz`` in file order: what ``np.savez(file, *weights)`` and the round checkpoints write."""
    fix = "point training.checkpoint at an .npz of weights (e.g. a round's global.npz in the artifact store)"
    try:
        with np.load(path, allow_pickle=False) as archive:
            return [np.asarray(archive[key]) for key in archive.files]
    except FileNotFoundError:
        raise ConfigError(f"training.checkpoint {path} does not exist", fix=fix) from None
    except (OSError, ValueError, zipfile.BadZipFile, AttributeError) as exc:
        raise ConfigError(f"training.checkpoint {path} is not an .npz of arrays: {exc}", fix=fix) from exc


def _require_layout(seed: Sequence[np.ndarray], fresh: Weights, source: str, config: FederationConfig) -> None:
    got, want = [list(np.shape(w)) for w in seed], [list(w.shape) for w in fresh]
    if got != want:
        raise ConfigError(
            f"{source} has tensor shapes {got}, but the configured model needs {want}",
            fix=f"seed with a model of the same features and model.hidden_sizes {list(config.model.hidden_sizes)}, "
            "or set training.start_from: scratch",
        )
    if not all(np.isfinite(np.asarray(w, dtype=np.float64)).all() for w in seed):
        raise ConfigError(f"{source} holds NaN or Inf", fix="seed with a model that trained without diverging")


def privacy_accountant(training: TrainingConfig, num_sites: int, rounds_done: int) -> PrivacyAccountant | None:
    """The privacy spent so far, or ``None`` without DP; each round samples ``sites_per_round / num_sites``."""
    privacy = training.privacy
    if not privacy.enabled:
        return None
    rate = training.sites_per_round(num_sites) / num_sites
    return PrivacyAccountant(privacy.noise_multiplier, rate, privacy.delta, privacy.epsilon_budget, rounds_done)


def collect_keys(runner: SiteRunner, site_ids: Sequence[str], job_id: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """Every site's public key for the job, and why the sites without one sit the job out."""
    answers = runner.keys(site_ids, job_id)
    keys = {s: a for s, a in answers.items() if isinstance(a, bytes)}
    missing = {s: a.describe() for s, a in answers.items() if isinstance(a, SiteFailure)}
    return keys, missing


# --- validate replies -----------------------------------------------------------------------------


def screen_replies(
    config: FederationConfig, server_round: int, replies: Mapping[str, Reply], reference: Weights
) -> tuple[Accepted, dict[str, str]]:
    """Split replies into accepted and rejected-with-reason; raise if too few remain to aggregate."""
    accepted: Accepted = {}
    rejected: dict[str, str] = {}
    for site_id, reply in sorted(replies.items()):
        if isinstance(reply, SiteFailure):
            problem: str | None = reply.describe()
        elif isinstance(reply, MaskedUpdate):
            problem = validate_masked_reply(reply, reference, server_round, site_id)
        else:
            problem = validate_reply(reply, reference, server_round, site_id)
        if problem:
            rejected[site_id] = problem
        else:
            accepted[site_id] = reply  # type: ignore[assignment]  # a failure always has a problem
    ratio = config.training.max_norm_ratio
    plain = {s: u.weights for s, u in accepted.items() if isinstance(u, SiteUpdate)}
    if ratio is not None and len(plain) > 1:
        for site_id, reason in update_norm_outliers(plain, reference, ratio).items():
            rejected[site_id] = reason
            del accepted[site_id]
    require_sites(config.training, server_round, len(accepted), rejected)
    return accepted, rejected


def require_sites(training: TrainingConfig, server_round: int, count: int, rejected: Mapping[str, str]) -> None:
    """``min_sites`` and the aggregation rule's own minimum must hold, or the round (and the job) stops here."""
    needed = max(training.min_sites, min_replies(training.aggregation, training.num_byzantine, training.multi_krum_m))
    if count < needed:
        reasons = "; ".join(f"{s}: {r}" for s, r in sorted(rejected.items())) or "none"
        raise NotEnoughSites(
            f"round {server_round}: {count} valid replies, {needed} needed (training.min_sites "
            f"{training.min_sites}, aggregation {training.aggregation}); rejected: {reasons}",
            fix="fix the failing sites, or lower training.min_sites (or num_byzantine) in the federation config",
        )


# --- aggregate ------------------------------------------------------------------------------------


def aggregate_updates(
    training: TrainingConfig, reference: Weights, accepted: Accepted, trainable: Sequence[bool]
) -> Weights:
    """The configured rule over the sites' weights, or DP-FedAvg's noised mean of clipped deltas."""
    updates = [u for _, u in sorted(accepted.items()) if isinstance(u, SiteUpdate)]
    privacy = training.privacy
    if privacy.enabled:
        noise = np.random.default_rng(secrets.randbits(128))  # never from config.seed: a known seed undoes the noise
        weights = [u.weights for u in updates]
        return private_mean(reference, weights, trainable, privacy.clip_norm, privacy.noise_multiplier, noise)
    return aggregate(
        training.aggregation,
        [(u.weights, u.num_examples) for u in updates],
        trim_fraction=training.trim_fraction,
        num_byzantine=training.num_byzantine,
        multi_krum_m=training.multi_krum_m,
    )


def aggregate_secure(
    runner: SiteRunner,
    secagg: SecAggRound,
    server_round: int,
    reference: Weights,
    accepted: Accepted,
    training: TrainingConfig,
) -> tuple[Weights, dict[str, str]]:
    """FedAvg from the masked replies; sites that masked but are missing are unmasked with the survivors' seeds.

    A survivor that does not reveal joins the dropped sites and the others are asked again, so the sum is
    always over exactly the sites whose vectors it holds. Returns the new model and those extra rejections.
    """
    masked = {s: u.masked for s, u in accepted.items() if isinstance(u, MaskedUpdate)}
    survivors = sorted(masked)
    extra: dict[str, str] = {}
    revealed: dict[str, dict[str, bytes]] = {}
    while dropped := sorted(set(secagg.peers) - set(survivors)):
        require_sites(training, server_round, len(survivors), extra)
        answers = runner.reveal(survivors, secagg, server_round, dropped)
        failed = {s: _reveal_problem(a, dropped) for s, a in answers.items()}
        failed = {s: problem for s, problem in failed.items() if problem}
        if not failed:
            revealed = {s: a for s, a in answers.items() if isinstance(a, dict)}
            break
        extra.update({s: f"did not reveal its pair seeds: {problem}" for s, problem in failed.items()})
        survivors = [s for s in survivors if s not in failed]
    require_sites(training, server_round, len(survivors), extra)
    total = secure_sum({s: masked[s] for s in survivors}, secagg.peers, revealed)
    return add_mean_delta(reference, total), extra


def _reveal_problem(answer: dict[str, bytes] | SiteFailure, dropped: Sequence[str]) -> str:
    if isinstance(answer, SiteFailure):
        return answer.describe()
    missing = [d for d in dropped if len(answer.get(d, b"")) != SEED_BYTES]
    return f"no seed for {', '.join(missing)}" if missing else ""


def server_step(
    training: TrainingConfig,
    reference: Weights,
    aggregated: Weights,
    state: ServerOptimizerState,
    trainable: Sequence[bool],
) -> tuple[Weights, ServerOptimizerState]:
    """The server optimizer's step from the aggregate; tensors nobody trains stay exactly as they were."""
    new_weights, state = server_update(
        training.server_optimizer,
        reference,
        aggregated,
        state,
        trainable=trainable,
        server_lr=training.effective_server_lr,
        beta1=training.beta1,
        beta2=training.beta2,
        tau=training.tau,
    )
    return keep_fixed(new_weights, reference, trainable), state

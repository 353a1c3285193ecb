"""The coordinator's steps of a federated round, each a small function the round loop calls in order.

configure (start model, keys, privacy budget) -> validate replies -> aggregate (plain, private or
secure) -> server optimizer. The maths is in ``tasks``; these functions choose which of it the config
asks for, talk to the runner and explain in their exceptions what went wrong and what happens next.
"""

from __future__ import annotations

import secrets
import zipfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from quorum.configs.errors import ChampionError, ConfigError, NotEnoughSites, ReplyRejected
from quorum.configs.schema import FederationConfig, TrainingConfig
from quorum.flows.context import JobContext
from quorum.flows.runners.local import Reply, SecAggRound, SiteFailure, SiteRunner
from quorum.lineage.registry import load_verified_weights
from quorum.lineage.tracking import CHAMPION, alias_version
from quorum.tasks.privacy import PrivacyAccountant, private_mean
from quorum.tasks.replies import validate_masked_reply, validate_reply
from quorum.tasks.secagg import Masked, RoundPlan, add_mean_delta, plan_round
from quorum.tasks.secagg_protocol import checked_mean_delta, unmask_sum
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


def secure_setup(
    runner: SiteRunner, job_id: str, sampled: Sequence[str], server_round: int, training: TrainingConfig
) -> tuple[SecAggRound, dict[str, str]]:
    """SecAgg+ steps 1-2: the sampled sites advertise the round's keys, then share their secrets with their
    neighbourhoods. Returns the round (keys, sites that did not share, their encrypted shares) and why
    sites were left out; too few left to unmask stops the round."""
    answers = runner.keys(sampled, job_id, server_round)
    keys = {s: a for s, a in answers.items() if isinstance(a, bytes)}
    left_out = {
        s: f"advertised no round keys: {a.describe()}" for s, a in answers.items() if isinstance(a, SiteFailure)
    }
    _require_secure(training, server_round, keys, keys, left_out)
    plan = _plan(training, job_id, server_round, keys)
    sent = runner.share(sorted(keys), SecAggRound(job_id, keys), server_round)
    shares: dict[str, dict[str, bytes]] = {}
    for sender, answer in sorted(sent.items()):
        if isinstance(answer, SiteFailure):
            left_out[sender] = f"did not share its keys: {answer.describe()}"
        elif sorted(answer) != sorted(plan.neighbourhoods[sender]):
            left_out[sender] = (
                f"shared with {sorted(answer)}, not its neighbourhood {list(plan.neighbourhoods[sender])}"
            )
        else:
            for recipient, ciphertext in answer.items():
                shares.setdefault(recipient, {})[sender] = ciphertext
    shared = [s for s in sorted(keys) if s not in left_out]
    _require_secure(training, server_round, keys, shared, left_out)
    unshared = tuple(s for s in sorted(keys) if s not in shared)
    shares = {to: {s: c for s, c in by.items() if s in shared} for to, by in shares.items() if to in shared}
    return SecAggRound(job_id, keys, unshared, shares), left_out


def _plan(training: TrainingConfig, job_id: str, server_round: int, members: Collection[str]) -> RoundPlan:
    secagg = training.secagg
    try:
        return plan_round(members, job_id, server_round, secagg.num_shares, secagg.threshold)
    except ReplyRejected as exc:
        raise ConfigError(f"round {server_round}: {exc.message}", fix=exc.fix) from None


def _require_secure(
    training: TrainingConfig,
    server_round: int,
    members: Collection[str],
    taking_part: Collection[str],
    rejected: Mapping[str, str],
) -> None:
    """``min_sites`` must hold, and enough sites to rebuild a secret (the threshold) must still take part."""
    require_sites(training, server_round, len(taking_part), rejected)
    configured = training.secagg.threshold
    if isinstance(configured, int):  # before any plan: too few sites for it is a dropout, not a config error
        threshold = configured
    else:
        threshold = _plan(training, "", server_round, members).threshold if len(members) > 1 else 2
    if len(taking_part) < threshold:
        reasons = "; ".join(f"{s}: {r}" for s, r in sorted(rejected.items())) or "none"
        raise NotEnoughSites(
            f"round {server_round}: {len(taking_part)} sites left, the secure-aggregation threshold is {threshold} "
            f"of {len(members)}; left out: {reasons}",
            fix="fix the failing sites, or lower training.secagg.threshold in the federation config",
        )


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
    train_rows: Mapping[str, int],
) -> tuple[Weights, dict[str, str], dict[str, str]]:
    """SecAgg+ step 4 and FedAvg: the survivors reveal shares, the sum is unmasked and checked.

    Each update is weighted by its site's train rows from its data fingerprint, never by its reply: a reply
    claiming another count is left out (as dropped). Survivors that fail to reveal stay in the sum as long
    as ``threshold`` shares of every secret arrive. Returns the new model, the replies left out, and the
    survivors that did not reveal.
    """
    extra: dict[str, str] = {}
    masked: dict[str, Masked] = {}
    for site_id, update in sorted(accepted.items()):
        if not isinstance(update, MaskedUpdate):
            continue
        if update.num_examples != train_rows.get(site_id):
            extra[site_id] = f"claims {update.num_examples} examples, its data fingerprint {train_rows.get(site_id)}"
        else:
            masked[site_id] = update.masked
    survivors = sorted(masked)
    _require_secure(training, server_round, secagg.peers, survivors, extra)
    dropped = sorted(set(secagg.peers) - set(survivors))
    answers = runner.reveal(survivors, secagg, server_round, dropped)
    revealed = {s: a for s, a in answers.items() if isinstance(a, dict)}
    silent = {s: a.describe() for s, a in answers.items() if isinstance(a, SiteFailure)}
    plan = _plan(training, secagg.job_id, server_round, secagg.peers)
    shared = set(secagg.peers) - set(secagg.unshared)
    total = unmask_sum(masked, secagg.peers, plan, shared, revealed, server_round, secagg.job_id)
    weight = float(sum(train_rows[s] for s in survivors))
    mean = checked_mean_delta(total, weight, training.secagg.clip_norm, len(survivors))
    return add_mean_delta(reference, mean), extra, silent


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

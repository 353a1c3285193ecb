"""Robust aggregation rules, server optimizers, site sampling and update screening, as pure functions.

Replies are ``(weights, num_examples)`` pairs, as for :func:`quorum.tasks.aggregate.fedavg`; nothing here
mutates them. Statistics that need every site at once (median, trimmed mean, Krum distances) run over
fixed-size slices of one layer at a time, so the extra memory is the result (one model) plus a slice
buffer whose size does not grow with the model, whatever the number of sites.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from quorum.configs.errors import ConfigError, NotEnoughSites, ReplyRejected
from quorum.tasks.aggregate import fedavg

Weights = list[NDArray[np.float32]]
Replies = Sequence[tuple[Sequence[NDArray[np.float32]], int]]
AggregationRule = Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"]
ServerOptimizer = Literal["fedavg", "fedavgm", "fedadam", "fedyogi"]

AGGREGATION_RULES: tuple[AggregationRule, ...] = ("mean", "median", "trimmed_mean", "krum", "multi_krum")
SERVER_OPTIMIZERS: tuple[ServerOptimizer, ...] = ("fedavg", "fedavgm", "fedadam", "fedyogi")
MODEL_BUFFERS = 2  # ScaledMLP's feature_mean and feature_std lead its state dict and are never trained
_SLICE_ELEMENTS = 1 << 22  # elements of the (sites x slice) buffer: 16 MB of float32, 32 MB of float64


def trainable_mask(num_tensors: int, num_buffers: int = MODEL_BUFFERS) -> list[bool]:
    """Which tensors a server optimizer may move: the input-scaling buffers come from the data, not SGD."""
    if not 0 <= num_buffers <= num_tensors:
        raise ConfigError(f"{num_buffers} buffers among {num_tensors} tensors", fix="pass the model's weight list")
    return [index >= num_buffers for index in range(num_tensors)]


def trainable_tensors(num_tensors: int, freeze_layers: int, num_buffers: int = MODEL_BUFFERS) -> list[bool]:
    """Which tensors local training moves: not the scaling buffers, not the first ``freeze_layers`` Linear layers.

    ScaledMLP's tensors are its buffers, then a weight and a bias per Linear layer, in order.
    """
    mask = trainable_mask(num_tensors, num_buffers)
    frozen_end = num_buffers + 2 * freeze_layers
    if freeze_layers < 0 or frozen_end >= num_tensors:
        raise ConfigError(
            f"cannot freeze {freeze_layers} layers of a model with {(num_tensors - num_buffers) // 2} Linear layers",
            fix="leave at least one layer to train",
        )
    return [train and index >= frozen_end for index, train in enumerate(mask)]


def keep_fixed(
    new_weights: Sequence[NDArray[np.float32]], reference: Sequence[NDArray[np.float32]], trainable: Sequence[bool]
) -> Weights:
    """``new_weights`` with every non-trainable tensor taken bit for bit from ``reference``.

    Aggregation, fixed-point decoding and DP noise would otherwise nudge tensors nobody trained.
    """
    if not len(new_weights) == len(reference) == len(trainable):
        raise ReplyRejected(
            f"{len(new_weights)} new tensors, {len(reference)} reference, {len(trainable)} mask entries",
            fix="pass the same model's weights and its trainable_tensors(...)",
        )
    return [
        np.array(new if train else old, dtype=np.float32)
        for new, old, train in zip(new_weights, reference, trainable, strict=True)
    ]


def min_replies(rule: AggregationRule, num_byzantine: int, multi_krum_m: int) -> int:
    """The fewest replies ``rule`` can aggregate: Krum needs n > 2f + 2 and multi-Krum also m <= n - f."""
    if rule == "krum":
        return 2 * num_byzantine + 3
    if rule == "multi_krum":
        return max(2 * num_byzantine + 3, multi_krum_m + num_byzantine)
    return 1


# --- robust aggregation ------------------------------------------------------------------------


def _check_replies(replies: Replies) -> None:
    if not replies:
        raise ReplyRejected("no site replies to aggregate", fix="check that at least min_sites sites replied")
    shapes = [w.shape for w in replies[0][0]]
    for index, (weights, _) in enumerate(replies[1:], start=1):
        if [w.shape for w in weights] != shapes:
            raise ReplyRejected(
                f"reply {index} has tensor shapes {[list(w.shape) for w in weights]}, reply 0 has "
                f"{[list(s) for s in shapes]}",
                fix="validate every reply with quorum.tasks.replies.validate_reply before aggregating",
            )


def _slices(size: int, num_sites: int) -> Iterator[slice]:
    step = max(1, _SLICE_ELEMENTS // max(num_sites, 1))
    for start in range(0, size, step):
        yield slice(start, min(start + step, size))


def _coordinatewise(replies: Replies, statistic: Callable[[NDArray[np.float32]], NDArray[np.floating]]) -> Weights:
    """Apply ``statistic`` over the sites axis of every coordinate, one slice of one layer at a time."""
    _check_replies(replies)
    result: Weights = []
    for layer, reference in enumerate(replies[0][0]):
        flat_out = np.empty(reference.size, dtype=np.float32)
        flats = [np.asarray(weights[layer], dtype=np.float32).reshape(-1) for weights, _ in replies]
        for part in _slices(reference.size, len(replies)):
            stacked = np.stack([flat[part] for flat in flats])
            flat_out[part] = statistic(stacked)
        result.append(flat_out.reshape(reference.shape))
    return result


def coordinate_median(replies: Replies) -> Weights:
    """Per-coordinate median of the sites (Yin et al. 2018); unweighted, so an inflated count buys nothing."""
    return _coordinatewise(replies, lambda stacked: np.median(stacked, axis=0))


def trimmed_mean(replies: Replies, trim_fraction: float) -> Weights:
    """Per coordinate, drop the ``floor(trim_fraction * n)`` largest and smallest values, average the rest.

    Unweighted for the same reason as the median: example counts are the site's own claim. With few
    replies the floor can make the cut 0 (no trimming): size ``trim_fraction`` for the smallest round.
    """
    if not 0.0 <= trim_fraction <= 0.5:
        raise ConfigError(f"trim_fraction {trim_fraction} is outside [0, 0.5]", fix="use e.g. 0.1 or 0.2")
    _check_replies(replies)
    num_sites = len(replies)
    cut = math.floor(trim_fraction * num_sites)
    if num_sites - 2 * cut < 1:
        raise ReplyRejected(
            f"trimming {cut} of {num_sites} replies from each end leaves nothing to average",
            fix="lower trim_fraction or wait for more sites",
        )

    def kept_mean(stacked: NDArray[np.float32]) -> NDArray[np.float64]:
        ordered = np.sort(stacked, axis=0)
        return np.asarray(ordered[cut : num_sites - cut].mean(axis=0, dtype=np.float64), dtype=np.float64)

    return _coordinatewise(replies, kept_mean)


def _pairwise_sq_distances(replies: Replies) -> NDArray[np.float64]:
    """Squared L2 distances between every pair of replies, accumulated slice by slice via Gram matrices.

    Each slice is centred before the Gram product so near-identical updates keep their precision.
    """
    num_sites = len(replies)
    distances = np.zeros((num_sites, num_sites), dtype=np.float64)
    for layer, reference in enumerate(replies[0][0]):
        flats = [np.asarray(weights[layer]).reshape(-1) for weights, _ in replies]
        for part in _slices(reference.size, num_sites):
            stacked = np.stack([flat[part] for flat in flats]).astype(np.float64)
            stacked -= stacked.mean(axis=0)
            gram = stacked @ stacked.T
            norms = np.diag(gram)
            distances += norms[:, None] + norms[None, :] - 2.0 * gram
    np.fill_diagonal(distances, 0.0)
    return np.maximum(distances, 0.0)


def krum(replies: Replies, num_byzantine: int, multi: int = 1) -> Weights:
    """Krum (Blanchard et al. 2017): keep the reply closest to its ``n - f - 2`` nearest neighbours.

    With ``multi > 1`` (multi-Krum) the ``multi`` best-scoring replies are averaged, example-weighted
    like FedAvg, which keeps Krum's robustness while wasting less of the honest sites' work.
    """
    _check_replies(replies)
    num_sites = len(replies)
    if num_byzantine < 0:
        raise ConfigError(f"num_byzantine is {num_byzantine}", fix="use 0 or more")
    if num_sites <= 2 * num_byzantine + 2:
        raise ReplyRejected(
            f"Krum needs more than 2f + 2 = {2 * num_byzantine + 2} replies to tolerate f = {num_byzantine} "
            f"byzantine sites, got {num_sites}",
            fix=(
                f"lower num_byzantine to at most {(num_sites - 3) // 2}, sample more sites, "
                if num_sites >= 3
                else "sample at least 3 sites, "
            )
            + "or use the median or trimmed_mean rule",
        )
    if not 1 <= multi <= num_sites - num_byzantine:
        raise ConfigError(
            f"multi-Krum m = {multi} is outside 1..n - f = {num_sites - num_byzantine}",
            fix="choose m between 1 and the number of honest sites",
        )
    distances = _pairwise_sq_distances(replies)
    neighbours = num_sites - num_byzantine - 2
    scores = np.sort(distances, axis=1)[:, 1 : neighbours + 1].sum(axis=1)  # column 0 is the distance to itself
    chosen = np.argsort(scores, kind="stable")[:multi]
    return fedavg([replies[int(index)] for index in chosen])


def aggregate(
    rule: AggregationRule, replies: Replies, *, trim_fraction: float, num_byzantine: int, multi_krum_m: int
) -> Weights:
    """One entry point for the round loop, so the rule is a config value and not a code path."""
    if rule == "mean":
        return fedavg(replies)
    if rule == "median":
        return coordinate_median(replies)
    if rule == "trimmed_mean":
        return trimmed_mean(replies, trim_fraction)
    if rule == "krum":
        return krum(replies, num_byzantine, 1)
    if rule == "multi_krum":
        return krum(replies, num_byzantine, multi_krum_m)
    raise ConfigError(
        f"aggregation rule {rule!r} is unknown; allowed: {', '.join(AGGREGATION_RULES)}", fix="pick an allowed rule"
    )


# --- server optimizers -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerOptimizerState:
    """Server-side moments across rounds; empty before the first update (``step == 0``)."""

    momentum: list[NDArray[np.float32]] = field(default_factory=list)
    second_moment: list[NDArray[np.float32]] = field(default_factory=list)
    step: int = 0


def _check_optimizer(server_lr: float, beta1: float, beta2: float, tau: float) -> None:
    problems = []
    if not server_lr > 0:
        problems.append(f"server_lr {server_lr} must be > 0")
    if not 0 <= beta1 < 1:
        problems.append(f"beta1 {beta1} must be in [0, 1)")
    if not 0 <= beta2 < 1:
        problems.append(f"beta2 {beta2} must be in [0, 1)")
    if not tau > 0:
        problems.append(f"tau {tau} must be > 0")
    if problems:
        raise ConfigError("; ".join(problems), fix="Reddi et al. suggest beta1 0.9, beta2 0.99, tau 1e-3")


def server_update(
    kind: ServerOptimizer,
    global_weights: Sequence[NDArray[np.float32]],
    aggregated: Sequence[NDArray[np.float32]],
    state: ServerOptimizerState,
    *,
    trainable: Sequence[bool],
    server_lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[Weights, ServerOptimizerState]:
    """Treat ``global - aggregated`` as a gradient and take one server step with it.

    FedAvgM (Hsu et al. 2019): ``m = beta1 m + g; w -= lr m``. FedAdam / FedYogi (Reddi et al. 2021,
    Algorithm 2, no bias correction): ``m = beta1 m + (1 - beta1) g``; Adam ``v = beta2 v + (1 - beta2) g^2``,
    Yogi ``v = v - (1 - beta2) g^2 sign(v - g^2)``; ``w -= lr m / (sqrt(v) + tau)`` with ``v`` starting at
    ``tau^2``. Tensors with ``trainable`` False (the scaling buffers) are taken from ``aggregated`` as they are.
    """
    if kind not in SERVER_OPTIMIZERS:
        raise ConfigError(
            f"server optimizer {kind!r} is unknown; allowed: {', '.join(SERVER_OPTIMIZERS)}", fix="pick an allowed one"
        )
    _check_optimizer(server_lr, beta1, beta2, tau)
    if not len(global_weights) == len(aggregated) == len(trainable):
        raise ReplyRejected(
            f"{len(global_weights)} global tensors, {len(aggregated)} aggregated, {len(trainable)} mask entries",
            fix="pass the same model's weights, aggregate and trainable_mask(...)",
        )
    if kind == "fedavg":
        return [np.array(a, dtype=np.float32) for a in aggregated], ServerOptimizerState(step=state.step + 1)
    fresh = state.step == 0 or not state.momentum
    new_weights: Weights = []
    momentum: list[NDArray[np.float32]] = []
    second: list[NDArray[np.float32]] = []
    for index, (current, target, train) in enumerate(zip(global_weights, aggregated, trainable, strict=True)):
        if current.shape != target.shape:
            raise ReplyRejected(
                f"tensor {index}: global {list(current.shape)}, aggregated {list(target.shape)}",
                fix="aggregate replies of the current global model only",
            )
        if not train:
            new_weights.append(np.array(target, dtype=np.float32))
            momentum.append(np.zeros(current.shape, dtype=np.float32))
            second.append(np.zeros(current.shape, dtype=np.float32))
            continue
        grad = np.asarray(current, dtype=np.float64) - np.asarray(target, dtype=np.float64)
        m_prev = np.zeros_like(grad) if fresh else state.momentum[index].astype(np.float64)
        if kind == "fedavgm":
            m = beta1 * m_prev + grad
            step = server_lr * m
            v = np.zeros_like(grad)
        else:
            m = beta1 * m_prev + (1.0 - beta1) * grad
            v_prev = np.full_like(grad, tau * tau) if fresh else state.second_moment[index].astype(np.float64)
            squared = grad * grad
            if kind == "fedadam":
                v = beta2 * v_prev + (1.0 - beta2) * squared
            else:
                v = v_prev - (1.0 - beta2) * squared * np.sign(v_prev - squared)
            step = server_lr * m / (np.sqrt(v) + tau)
        new_weights.append((current - step).astype(np.float32))
        momentum.append(m.astype(np.float32))
        second.append(v.astype(np.float32))
    return new_weights, ServerOptimizerState(momentum, second, state.step + 1)


# --- who takes part, and whose update looks wrong ------------------------------------------------


def sample_sites(
    site_ids: Sequence[str], fraction: float, min_sites: int, server_round: int, seed: int
) -> tuple[str, ...]:
    """The sites asked to train this round: seeded by (seed, round) so a rerun asks the same sites."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"site fraction {fraction} is outside (0, 1]", fix="use e.g. 0.5 or 1.0")
    if len(set(site_ids)) != len(site_ids):
        raise ConfigError(f"site ids repeat: {sorted(site_ids)}", fix="list each site once")
    pool = sorted(site_ids)
    count = max(min_sites, math.ceil(fraction * len(pool)))
    if count > len(pool):
        raise NotEnoughSites(
            f"round {server_round} needs {count} sites, only {len(pool)} are available",
            fix="lower min_sites or add sites to the federation",
        )
    rng = np.random.default_rng([seed, server_round])
    chosen = rng.choice(len(pool), size=count, replace=False)
    return tuple(sorted(pool[int(index)] for index in chosen))


def _update_norm(weights: Sequence[NDArray[np.float32]], global_weights: Sequence[NDArray[np.float32]]) -> float:
    total = 0.0
    for got, base in zip(weights, global_weights, strict=True):
        flat_got, flat_base = np.asarray(got).reshape(-1), np.asarray(base).reshape(-1)
        for part in _slices(flat_got.size, 1):
            diff = flat_got[part].astype(np.float64) - flat_base[part]
            total += float(diff @ diff)
    return math.sqrt(total)


def update_norm_outliers(
    replies_by_site: Mapping[str, Sequence[NDArray[np.float32]]],
    global_weights: Sequence[NDArray[np.float32]],
    max_norm_ratio: float,
) -> dict[str, str]:
    """Sites whose update is ``max_norm_ratio`` times longer than the median of the other sites' updates.

    Comparing with the others (not with a fixed bound) keeps the check meaningful as learning slows.
    """
    if not max_norm_ratio > 1.0:
        raise ConfigError(f"max_norm_ratio {max_norm_ratio} must be > 1", fix="use e.g. 5 or 10")
    reference = [w.shape for w in global_weights]
    norms: dict[str, float] = {}
    flagged: dict[str, str] = {}
    for site_id, weights in replies_by_site.items():
        if [w.shape for w in weights] != reference:
            flagged[site_id] = "update shapes differ from the global model"
            continue
        norm = _update_norm(weights, global_weights)
        if math.isfinite(norm):
            norms[site_id] = norm
        else:
            flagged[site_id] = "update norm is NaN or Inf"
    for site_id, norm in norms.items():
        others = [other for other_id, other in norms.items() if other_id != site_id]
        if not others:
            continue
        median = float(np.median(others))
        ratio = norm / median if median > 0 else (math.inf if norm > 0 else 1.0)
        if ratio > max_norm_ratio:
            flagged[site_id] = (
                f"update norm {norm:.4g} is {ratio:.3g}x the median of the other sites ({median:.4g}); "
                f"max_norm_ratio is {max_norm_ratio:g}"
            )
    return flagged

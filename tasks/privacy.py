"""Site-level differential privacy for FedAvg (DP-FedAvg, McMahan et al. 2018) and its accounting.

Each site's delta is clipped to ``clip_norm`` so that one site can move the *equal-weight* mean of
``num_sites`` deltas by at most ``clip_norm / num_sites``; Gaussian noise of that scale times the noise
multiplier then hides any one site. Example-weighted averaging would break this bound, so the round
loop must average clipped deltas with equal weights when DP is on. Accounting composes one Poisson-
sampled Gaussian per round with Google's ``dp-accounting`` RDP accountant, imported lazily because
only a DP run needs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from quorum.configs.errors import ConfigError, ReplyRejected

Weights = list[NDArray[np.float32]]


def _l2_norm(tensors: Sequence[NDArray[np.float32]]) -> float:
    return math.sqrt(sum(float(np.vdot(t, t)) for t in (np.asarray(x, dtype=np.float64) for x in tensors)))


def clip_update(update: Sequence[NDArray[np.float32]], clip_norm: float) -> Weights:
    """Scale the whole delta (all tensors together) down to L2 norm ``clip_norm``; shorter ones pass as they are."""
    if not clip_norm > 0:
        raise ConfigError(f"clip_norm {clip_norm} must be > 0", fix="use e.g. the median update norm of a clean run")
    norm = _l2_norm(update)
    if not math.isfinite(norm):
        raise ReplyRejected("the update holds NaN or Inf and cannot be clipped", fix="check the site's training")
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return [(np.asarray(t, dtype=np.float64) * factor).astype(np.float32) for t in update]


def add_gaussian_noise(
    aggregate_delta: Sequence[NDArray[np.float32]],
    noise_multiplier: float,
    clip_norm: float,
    num_sites: int,
    rng: np.random.Generator,
) -> Weights:
    """Noise the mean of ``num_sites`` clipped deltas with std ``noise_multiplier * clip_norm / num_sites``.

    The generator is the caller's, so a seeded run reproduces its noise and tests can check its scale.
    """
    if noise_multiplier < 0 or not clip_norm > 0 or num_sites < 1:
        raise ConfigError(
            f"noise_multiplier {noise_multiplier}, clip_norm {clip_norm}, num_sites {num_sites}",
            fix="noise_multiplier >= 0, clip_norm > 0 and at least one site",
        )
    std = noise_multiplier * clip_norm / num_sites
    return [
        (np.asarray(t, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(t))).astype(np.float32)
        for t in aggregate_delta
    ]


def private_mean(
    global_weights: Sequence[NDArray[np.float32]],
    site_weights: Sequence[Sequence[NDArray[np.float32]]],
    trainable: Sequence[bool],
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> Weights:
    """DP-FedAvg's new model: ``global`` plus the noised, equal-weight mean of each site's clipped delta.

    Only ``trainable`` tensors are clipped, averaged and noised; the others are returned as in ``global_weights``
    (frozen layers and scaling buffers carry no site information, and noise there would only do harm).
    """
    if not site_weights:
        raise ReplyRejected("no site updates to average", fix="check that at least min_sites sites replied")
    if any(len(weights) != len(global_weights) for weights in site_weights) or len(trainable) != len(global_weights):
        raise ReplyRejected("site updates, global model and trainable mask differ in length", fix="validate replies")
    moving = [index for index, train in enumerate(trainable) if train]
    clipped = [
        clip_update([_delta(weights[i], global_weights[i]) for i in moving], clip_norm) for weights in site_weights
    ]
    mean = [
        np.asarray(np.mean([delta[j] for delta in clipped], axis=0, dtype=np.float64), dtype=np.float32)
        for j in range(len(moving))
    ]
    noised = add_gaussian_noise(mean, noise_multiplier, clip_norm, len(site_weights), rng)
    result = [np.array(w, dtype=np.float32) for w in global_weights]
    for j, index in enumerate(moving):
        result[index] = (np.asarray(global_weights[index], dtype=np.float64) + noised[j]).astype(np.float32)
    return result


def _delta(site: NDArray[np.float32], base: NDArray[np.float32]) -> NDArray[np.float32]:
    return (np.asarray(site, dtype=np.float64) - np.asarray(base, dtype=np.float64)).astype(np.float32)


def epsilon_spent(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """The epsilon (at ``delta``) after ``steps`` rounds of a Poisson-sampled Gaussian mechanism (RDP)."""
    problems = []
    if noise_multiplier < 0:
        problems.append(f"noise_multiplier {noise_multiplier} must be >= 0")
    if not 0 < sampling_rate <= 1:
        problems.append(f"sampling_rate {sampling_rate} must be in (0, 1]")
    if steps < 0:
        problems.append(f"steps {steps} must be >= 0")
    if not 0 < delta < 1:
        problems.append(f"delta {delta} must be in (0, 1)")
    if problems:
        raise ConfigError("; ".join(problems), fix="e.g. noise_multiplier 1.0, sampling_rate 0.1, delta 1e-5")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))


def budget_exceeded(epsilon: float, budget: float) -> bool:
    """True once spending more would break the promised budget; a NaN epsilon counts as exceeded."""
    return not epsilon <= budget


@dataclass(frozen=True)
class PrivacyAccountant:
    """The privacy spent so far by a job: a value, advanced by :meth:`after`, never updated in place."""

    noise_multiplier: float
    sampling_rate: float
    delta: float
    budget_epsilon: float
    steps: int = 0

    def after(self, rounds: int = 1) -> PrivacyAccountant:
        if rounds < 0:
            raise ConfigError(f"rounds {rounds} must be >= 0", fix="count the rounds that ran")
        return replace(self, steps=self.steps + rounds)

    @property
    def epsilon(self) -> float:
        return epsilon_spent(self.noise_multiplier, self.sampling_rate, self.steps, self.delta)

    @property
    def exceeded(self) -> bool:
        return budget_exceeded(self.epsilon, self.budget_epsilon)

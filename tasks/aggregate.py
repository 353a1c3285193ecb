"""Aggregation strategies as small pure functions over ``(weights, num_examples)`` replies.

Inputs are never mutated; the result is a fresh list of arrays. Accumulation runs layer by layer
into one buffer, so extra memory stays at about one model whatever the number of sites.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from configs.errors import ReplyRejected

Weights = list[NDArray[np.float32]]


def fedavg(replies: Sequence[tuple[Sequence[NDArray[np.float32]], int]]) -> Weights:
    """FedAvg: the example-weighted mean of the sites' weights."""
    if not replies:
        raise ReplyRejected("no site replies to aggregate", fix="check that at least min_sites sites replied")
    total = sum(num_examples for _, num_examples in replies)
    if total <= 0:
        raise ReplyRejected("site replies hold no training examples", fix="check the sites' training splits")
    layers = len(replies[0][0])
    averaged: Weights = []
    for layer in range(layers):
        acc = np.zeros(replies[0][0][layer].shape, dtype=np.float64)
        for weights, num_examples in replies:
            acc += np.asarray(weights[layer], dtype=np.float64) * (num_examples / total)
        averaged.append(acc.astype(np.float32))
    return averaged


def weighted_loss_avg(results: Sequence[tuple[float, int]]) -> float:
    """Example-weighted mean of per-site losses."""
    total = sum(n for _, n in results)
    return sum(loss * n for loss, n in results) / total if total else float("nan")

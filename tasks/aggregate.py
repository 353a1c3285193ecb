"""Aggregation strategies as small pure functions over ``(weights, num_examples)`` replies.

Inputs are never mutated; the result is a fresh list of arrays. Accumulation runs over fixed-size
slices of one layer at a time, in float64, so extra memory is the result (one model) plus two slice
buffers whatever the number of sites or the size of a layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from quorum.configs.errors import ReplyRejected

Weights = list[NDArray[np.float32]]
_SLICE = 1 << 20  # elements summed at a time: two float64 buffers of 8 MB, whatever the layer size


def fedavg(replies: Sequence[tuple[Sequence[NDArray[np.float32]], int]]) -> Weights:
    """FedAvg: the example-weighted mean of the sites' weights."""
    if not replies:
        raise ReplyRejected("no site replies to aggregate", fix="check that at least min_sites sites replied")
    total = sum(num_examples for _, num_examples in replies)
    if total <= 0:
        raise ReplyRejected("site replies hold no training examples", fix="check the sites' training splits")
    averaged: Weights = []
    for layer, reference in enumerate(replies[0][0]):
        out = np.empty(reference.shape, dtype=np.float32)
        flat_out = out.reshape(-1)
        parts = [(np.asarray(weights[layer]).reshape(-1), num_examples / total) for weights, num_examples in replies]
        acc = np.empty(min(_SLICE, flat_out.size), dtype=np.float64)
        scaled = np.empty_like(acc)
        for start in range(0, flat_out.size, _SLICE):
            stop = min(start + _SLICE, flat_out.size)
            into, term = acc[: stop - start], scaled[: stop - start]
            into.fill(0.0)
            for flat, share in parts:
                np.multiply(flat[start:stop], share, out=term, dtype=np.float64)
                into += term
            flat_out[start:stop] = into
        averaged.append(out)
    return averaged


def weighted_loss_avg(results: Sequence[tuple[float, int]]) -> float:
    """Example-weighted mean of per-site losses."""
    total = sum(n for _, n in results)
    return sum(loss * n for loss, n in results) / total if total else float("nan")

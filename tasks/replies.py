"""Checks every site reply must pass before it is aggregated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from quorum.tasks.secagg import FIELD, in_field

if TYPE_CHECKING:
    from quorum.tasks.site import SiteUpdate
    from quorum.tasks.site_secagg import MaskedUpdate

MAX_EXAMPLES = 1_000_000_000


def validate_reply(
    reply: SiteUpdate, reference: Sequence[NDArray[np.float32]], server_round: int, site_id: str
) -> str | None:
    """The reason to reject ``reply``, or ``None`` when it may be aggregated."""
    problem = _envelope_problem(reply, server_round, site_id)
    if problem:
        return problem
    if len(reply.weights) != len(reference):
        return f"{len(reply.weights)} tensors, expected {len(reference)}"
    for index, (got, want) in enumerate(zip(reply.weights, reference, strict=True)):
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"tensor {index} is {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
        if not np.isfinite(got).all():
            return f"tensor {index} holds NaN or Inf"
    return None


def validate_masked_reply(
    reply: MaskedUpdate, reference: Sequence[NDArray[np.float32]], server_round: int, site_id: str
) -> str | None:
    """The checks a masked reply allows: who, which round, how many examples, the vector's length and type,
    and that every value is an element of the secure-aggregation field.

    Its values are uniformly random in the field by design, so NaN, norm or robust checks cannot be made on
    it: the unmasked sum is checked instead (``quorum.tasks.secagg_protocol.checked_mean_delta``).
    """
    problem = _envelope_problem(reply, server_round, site_id)
    if problem:
        return problem
    expected = sum(int(np.prod(np.shape(w), dtype=np.int64)) for w in reference) + 1  # + the summed weight
    masked = reply.masked
    if masked.dtype != np.uint64 or masked.shape != (expected,):
        return f"masked vector is {masked.dtype}{list(masked.shape)}, expected uint64[{expected}]"
    if not in_field(masked):
        return f"masked vector holds values outside the field (>= 2**61 - 1): {int((masked >= FIELD).sum())} of them"
    return None


def _envelope_problem(reply: SiteUpdate | MaskedUpdate, server_round: int, site_id: str) -> str | None:
    if reply.site_id != site_id:
        return f"reply claims site {reply.site_id!r}"
    if reply.server_round != server_round:
        return f"reply is for round {reply.server_round}, expected {server_round}"
    if not 0 < reply.num_examples <= MAX_EXAMPLES:
        return f"example count {reply.num_examples} outside 1..{MAX_EXAMPLES}"
    return None

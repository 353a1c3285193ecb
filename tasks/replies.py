"""Checks every site reply must pass before it is aggregated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from tasks.site import SiteUpdate

MAX_EXAMPLES = 1_000_000_000


def validate_reply(
    reply: SiteUpdate, reference: Sequence[NDArray[np.float32]], server_round: int, site_id: str
) -> str | None:
    """The reason to reject ``reply``, or ``None`` when it may be aggregated."""
    if reply.site_id != site_id:
        return f"reply claims site {reply.site_id!r}"
    if reply.server_round != server_round:
        return f"reply is for round {reply.server_round}, expected {server_round}"
    if not 0 < reply.num_examples <= MAX_EXAMPLES:
        return f"example count {reply.num_examples} outside 1..{MAX_EXAMPLES}"
    if len(reply.weights) != len(reference):
        return f"{len(reply.weights)} tensors, expected {len(reference)}"
    for index, (got, want) in enumerate(zip(reply.weights, reference, strict=True)):
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"tensor {index} is {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
        if not np.isfinite(got).all():
            return f"tensor {index} holds NaN or Inf"
    return None

"""The secure-aggregation keys of the federation config: each bad value named with what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from quorum.configs.schema import load_federation
from tests.test_config import MINIMAL, config_error, edited, write

SECURE = {"training.secure_aggregation": True, "training.min_sites": 2}

BAD_SECAGG = {
    # an even neighbourhood has no site in the middle
    "even-shares": ({"training.secagg.num_shares": 4}, "num_shares 4 must be odd"),
    # fewer than three shares is no sharing at all
    "two-shares": ({"training.secagg.num_shares": 1}, "training.secagg.num_shares"),
    # half the shares would let two disjoint groups each rebuild one of a site's secrets
    "half-fraction": ({"training.secagg.threshold": 0.5}, "threshold 0.5 as a fraction must be in (0.5, 1]"),
    # a minority threshold, with the neighbourhood size known
    "minority": (
        {"training.secagg.num_shares": 5, "training.secagg.threshold": 2},
        "threshold 2 must be a strict majority of num_shares 5 (3..5)",
    ),
    # more shares needed than sites in a round: no round could ever unmask
    "above-round": ({"training.secagg.threshold": 3}, "training.secagg.threshold 3 exceeds the sites per round"),
    # a clip that is no bound
    "clip": ({"training.secagg.clip_norm": 0}, "training.secagg.clip_norm"),
    # a misspelt key is not silently ignored
    "typo": ({"training.secagg.treshold": 3}, "treshold"),
}


@pytest.mark.parametrize(("change", "fragment"), list(BAD_SECAGG.values()), ids=list(BAD_SECAGG))
def test_bad_secagg_key_is_named(tmp_path: Path, change: dict[str, object], fragment: str) -> None:
    path = write(tmp_path, "federation.yaml", edited(MINIMAL, {**SECURE, **change}))

    error = config_error(load_federation, path)

    assert fragment in error.message


def test_secagg_defaults_and_explicit_values_load(tmp_path: Path) -> None:
    default = load_federation(write(tmp_path, "a.yaml", edited(MINIMAL, SECURE))).training.secagg
    chosen = {"training.secagg.num_shares": 5, "training.secagg.threshold": 0.75, "training.secagg.clip_norm": 2.5}
    explicit = load_federation(write(tmp_path, "b.yaml", edited(MINIMAL, {**SECURE, **chosen}))).training.secagg

    assert (default.num_shares, default.threshold, default.clip_norm) == (None, None, 10.0)
    assert (explicit.num_shares, explicit.threshold, explicit.clip_norm) == (5, 0.75, 2.5)
    assert isinstance(explicit.threshold, float)

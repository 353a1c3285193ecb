"""The candidate pointer as a site reads it: only a well-formed version of this model selects anything.

The pointer is unsigned (anyone who can write the artifact store can rewrite it), so reading it checks
its shape only; what the named version must then pass is in ``verify_for_serving`` (tests/test_serving.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from quorum.lineage.artifacts import LocalArtifactStore
from quorum.lineage.candidate import (
    CandidatePointerError,
    candidate_key,
    publish_candidate,
    read_candidate,
    version_number,
)

MODEL = "churn-model"


def test_a_published_pointer_is_read_back_and_no_pointer_means_no_candidate(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    before = read_candidate(store, MODEL)

    publish_candidate(store, MODEL, "12")

    assert before is None
    assert read_candidate(store, MODEL) == "12"
    assert store.get_json(candidate_key(MODEL)) == {"model": MODEL, "version": "12"}


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        (b"{not json", "is not JSON"),  # truncated or garbage bytes
        (b'["churn-model", "2"]', "does not name model churn-model"),  # not an object
        (b'{"model": "other-model", "version": "2"}', "does not name model churn-model"),  # another model's pointer
        (b'{"model": "churn-model"}', "names no registry version"),  # no version
        (b'{"model": "churn-model", "version": 2}', "names no registry version"),  # a number, not the registry's text
        (b'{"model": "churn-model", "version": "0"}', "names no registry version"),  # versions start at 1
        (b'{"model": "churn-model", "version": "2/../../x"}', "names no registry version"),  # a path, not a version
        (b'{"model": "churn-model", "version": " 2"}', "names no registry version"),  # padded
    ],
)
def test_a_malformed_pointer_is_refused(tmp_path: Path, stored: bytes, message: str) -> None:
    store = LocalArtifactStore(tmp_path)
    store.put_bytes(candidate_key(MODEL), stored)

    with pytest.raises(CandidatePointerError) as refused:
        read_candidate(store, MODEL)

    assert message in refused.value.message and refused.value.fix


def test_promotion_never_writes_a_version_that_is_no_number(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)

    with pytest.raises(ValueError):
        publish_candidate(store, MODEL, "../2")

    assert not store.exists(candidate_key(MODEL))


def test_versions_are_ordered_as_numbers() -> None:
    assert version_number("10") > version_number("9")
    with pytest.raises(CandidatePointerError):
        version_number("v2")

"""The serving variants are compared with torch by the sites, on their own test splits: counts come back.

Each test builds a small synthetic federation in a temp folder and preprocesses it at the sites. The
coordinator side writes the real ONNX graphs (``export_variants``) and ships their bytes; the site
side is the real session handler or the in-process runner.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quorum.configs.schema import FederationConfig, load_federation
from quorum.evaluation.metrics import auc
from quorum.flows.runners.exchange import JobExchange
from quorum.flows.runners.local import LocalRunner, SiteFailure
from quorum.flows.runners.site_session import handle
from quorum.flows.variants import skipped_sites
from quorum.lineage.artifacts import LocalArtifactStore
from quorum.lineage.onnx_export import export_variants
from quorum.tasks import site as site_work
from quorum.tasks import wire
from quorum.tasks.features import feature_names, merge_moments
from quorum.tasks.model import initial_weights
from quorum.tasks.scoring import RUNTIME_FILES
from quorum.tasks.site import TEST_FILE
from quorum.tasks.weights import Weights
from tests.federation import write_federation

SITES = ("alpha", "beta")


def prepared(tmp_path: Path) -> tuple[FederationConfig, Weights, dict[str, bytes]]:
    """Both sites preprocessed; weights from their moments; the ONNX graphs of those weights."""
    config = load_federation(write_federation(tmp_path, SITES))
    fingerprints = [site_work.preprocess_site(config, site_id) for site_id in SITES]
    mean, std = merge_moments([fp.moments for fp in fingerprints if fp.moments is not None])
    names = feature_names(config.features)
    weights = initial_weights(len(names), config.model.hidden_sizes, mean, std, 0)
    folder = export_variants(tmp_path / "model", weights, names).folder
    return config, weights, {runtime: (folder / file).read_bytes() for runtime, file in RUNTIME_FILES.items()}


def test_a_site_session_scores_the_shipped_variants_and_replies_with_counts_only(tmp_path: Path) -> None:
    config, weights, graphs = prepared(tmp_path)
    exchange = JobExchange(LocalArtifactStore(tmp_path / "store"), "job-1")
    request = exchange.post(wire.Request("job-1", 1, "variants", ("alpha",)), weights, graphs)

    handle(config, "alpha", exchange, request)

    reply = exchange.read_reply(1, "alpha")
    assert reply is not None and set(reply) == {"site_id", "runtimes"}  # counts, nothing row-shaped
    counts = wire.decode_variant_counts(reply)
    assert set(counts) == {"torch", "onnx", "onnx-int8"}
    assert counts["torch"] == site_work.evaluate_site(config, "alpha", weights).overall  # the same test split
    assert abs(auc(counts["onnx"]) - auc(counts["torch"])) < 1e-3
    assert counts["onnx-int8"].tp + counts["onnx-int8"].fn == counts["torch"].tp + counts["torch"].fn


def test_a_variant_changed_in_the_store_is_refused_by_the_site(tmp_path: Path) -> None:
    config, weights, graphs = prepared(tmp_path)
    store = LocalArtifactStore(tmp_path / "store")
    exchange = JobExchange(store, "job-1")
    request = exchange.post(wire.Request("job-1", 1, "variants", ("alpha",)), weights, graphs)
    assert request.files is not None
    store.put_bytes(request.files["onnx-int8"]["key"], graphs["onnx"])  # another graph under the same name

    handle(config, "alpha", exchange, request)

    failure = wire.decode_failure(exchange.read_reply(1, "alpha"))
    assert failure is not None and "sha256" in failure.message


@pytest.mark.usefixtures("prefect_harness")
def test_the_in_process_runner_keeps_a_site_without_its_test_split_to_itself(tmp_path: Path) -> None:
    from prefect import flow

    config, weights, graphs = prepared(tmp_path)
    (config.site("beta").processed_dir / TEST_FILE).unlink()

    @flow
    def compare() -> dict[str, object]:
        return dict(LocalRunner(config).compare_variants(SITES, weights, graphs))

    replies = compare()

    assert isinstance(replies["beta"], SiteFailure)
    alpha = replies["alpha"]
    assert isinstance(alpha, dict) and set(alpha) == {"torch", "onnx", "onnx-int8"}
    assert np.isclose(auc(alpha["onnx"]), auc(alpha["torch"]), atol=1e-3)


def test_every_site_without_counts_is_named_with_its_reason() -> None:
    failure = SiteFailure("beta", "Site did not answer", "site beta did not answer: no live worker", "")

    skipped = skipped_sites(
        ("alpha", "beta", "gamma", "delta"),
        ("alpha", "beta", "gamma"),
        {
            "alpha": {},
            "beta": failure,
        },
        no_runner=False,
    )

    assert skipped == {
        "beta": "site beta did not answer: no live worker",
        "gamma": "no reply",
        "delta": "did not evaluate the candidate",
    }
    assert skipped_sites(("alpha",), (), {}, no_runner=True) == {"alpha": "no site runner at this promotion"}

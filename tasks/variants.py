"""How far the ONNX variants drift from the torch model, measured on a site's own test split.

Only confusion counts and score histograms leave the site (``BinaryCounts``), exactly like the
evaluation stage: the coordinator merges them into accuracy and AUC per runtime and records the
differences from torch on the model version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from quorum.configs.schema import FederationConfig
from quorum.evaluation.metrics import BinaryCounts, accuracy, auc, counts_from_scores, merge
from quorum.tasks.scoring import RUNTIME_FILES, onnx_session
from quorum.tasks.site import load_split
from quorum.tasks.training import predict_scores


def compare_site(
    config: FederationConfig, site_id: str, weights: Sequence[NDArray[np.float32]], variants: Path
) -> dict[str, BinaryCounts]:
    """Counts of the torch model and of each ONNX variant in ``variants`` on the site's test split."""
    site = config.site(site_id)
    features, labels, _ = load_split(config, site, "test")
    counts = {"torch": counts_from_scores(labels, predict_scores(weights, features, config.model.hidden_sizes))}
    for runtime, file in RUNTIME_FILES.items():
        scores = onnx_session(variants / file).run(None, {"features": np.ascontiguousarray(features)})[0]
        counts[runtime] = counts_from_scores(labels, np.asarray(scores, dtype=np.float64).reshape(-1))
    return counts


def variant_deltas(per_site: Mapping[str, Mapping[str, BinaryCounts]]) -> dict[str, float]:
    """Accuracy and AUC of each variant minus torch's, pooled over the sites (tags for the model version)."""
    runtimes = sorted({runtime for counts in per_site.values() for runtime in counts} - {"torch"})
    pooled = {runtime: merge(counts[runtime] for counts in per_site.values()) for runtime in ["torch", *runtimes]}
    torch = pooled["torch"]
    deltas: dict[str, float] = {}
    for runtime in runtimes:
        tag = runtime.replace("-", "_")
        deltas[f"{tag}.accuracy"] = accuracy(pooled[runtime])
        deltas[f"{tag}.auc"] = auc(pooled[runtime])
        deltas[f"{tag}.accuracy_delta"] = accuracy(pooled[runtime]) - accuracy(torch)
        deltas[f"{tag}.auc_delta"] = auc(pooled[runtime]) - auc(torch)
    deltas["torch.accuracy"] = accuracy(torch)
    deltas["torch.auc"] = auc(torch)
    return deltas

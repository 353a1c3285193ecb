"""How far the ONNX variants drift from the torch model, measured by each site on its own test split.

The site receives the candidate's weights and the exact ONNX bytes the promotion is about to sign,
scores its test split with torch and with each variant, and sends back only confusion counts and
score histograms (``BinaryCounts``), exactly like the evaluation stage. The coordinator merges them
into accuracy and AUC per runtime and records the differences from torch on the model version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from quorum.configs.errors import ReplyRejected, ToolError
from quorum.configs.schema import FederationConfig
from quorum.evaluation.metrics import BinaryCounts, accuracy, auc, counts_from_scores, merge
from quorum.tasks.scoring import RUNTIME_FILES, onnx_session
from quorum.tasks.site import load_split
from quorum.tasks.training import predict_scores


def compare_site(
    config: FederationConfig,
    site_id: str,
    weights: Sequence[NDArray[np.float32]],
    variants: Mapping[str, bytes],
) -> dict[str, BinaryCounts]:
    """Counts of the torch model and of each ONNX variant (runtime -> graph bytes) on the site's test split."""
    unknown = sorted(set(variants) - set(RUNTIME_FILES))
    if unknown:
        raise ReplyRejected(
            f"asked to compare unknown runtime(s) {', '.join(unknown)} (known: {', '.join(RUNTIME_FILES)})",
            fix="run the same Quorum version at the coordinator and at every site",
        )
    sessions = {runtime: _session(runtime, graph) for runtime, graph in sorted(variants.items())}
    site = config.site(site_id)
    features, labels, _ = load_split(config, site, "test")
    counts = {"torch": counts_from_scores(labels, predict_scores(weights, features, config.model.hidden_sizes))}
    for runtime, session in sessions.items():
        scores = session.run(None, {"features": np.ascontiguousarray(features)})[0]
        counts[runtime] = counts_from_scores(labels, np.asarray(scores, dtype=np.float64).reshape(-1))
    return counts


def _session(runtime: str, graph: bytes) -> Any:
    try:
        return onnx_session(graph)
    except Exception as exc:  # ONNX Runtime's load errors derive from Exception only; the type names the problem
        raise ToolError(
            f"ONNX Runtime could not load the {runtime} variant ({type(exc).__name__})",
            fix="check that the site's onnxruntime matches the coordinator's",
        ) from exc


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

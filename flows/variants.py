"""At promotion: the candidate's compressed variants, and what they cost in accuracy and AUC.

``export_serving_variants`` runs on the version's model folder before its provenance is written,
so the ONNX graph and its int8 copy are covered by the same statement and the same approver
signatures as the torch files. Each site whose processed test split is on this host (the embedded
runner, a demo) then scores it with torch and both variants; only counts come back, and the pooled
differences are tagged on the model version (``variant.onnx.auc_delta`` ...). Sites elsewhere are
named in ``variant.sites_skipped``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from quorum.flows.context import JobContext
from quorum.lineage.onnx_export import export_variants
from quorum.lineage.tracking import set_version_tags
from quorum.tasks.features import feature_names
from quorum.tasks.site import TEST_FILE


def export_serving_variants(
    ctx: JobContext, files: Path, version: str, weights: Sequence[NDArray[np.float32]]
) -> dict[str, float]:
    """Write ``files/onnx`` (fp32 + int8), compare both with torch at the reachable sites, tag the version."""
    from quorum.tasks.variants import compare_site, variant_deltas

    variants = export_variants(files, weights, feature_names(ctx.config.features))
    reachable = [s.id for s in ctx.config.sites if (s.processed_dir / TEST_FILE).is_file()]
    skipped = [s for s in ctx.config.site_ids if s not in reachable]
    tags = {"variant.formats": "onnx,onnx-int8", "variant.sites_skipped": ",".join(skipped) or "none"}
    deltas: dict[str, float] = {}
    if reachable:
        per_site = {site_id: compare_site(ctx.config, site_id, weights, variants.folder) for site_id in reachable}
        deltas = variant_deltas(per_site)
        tags.update({f"variant.{key}": f"{value:.6f}" for key, value in deltas.items()})
        tags["variant.sites"] = ",".join(reachable)
    set_version_tags(ctx.tracker, ctx.config.model_name, version, tags)
    return deltas

"""At promotion: the candidate's compressed variants, and what they cost in accuracy and AUC.

``export_serving_variants`` runs on the version's model folder before its provenance is written,
so the ONNX graph and its int8 copy are covered by the same statement and the same approver
signatures as the torch files. The exact bytes written there then go to the sites through the job's
site runner (``SiteRunner.compare_variants``: in process, or through the artifact store with their
sha256 under the pool runner); each site scores its own test split with torch and with both
variants and replies with counts only. The coordinator never reads a site's data. The pooled
differences are tagged on the model version (``variant.onnx.auc_delta`` ...); a site that was not
asked, failed or did not answer is named with its reason in ``variant.sites_skipped``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger

from quorum.evaluation.metrics import BinaryCounts
from quorum.flows.context import JobContext
from quorum.flows.runners.local import SiteFailure, SiteRunner
from quorum.lineage.onnx_export import export_variants
from quorum.lineage.tracking import set_version_tags
from quorum.tasks.features import feature_names
from quorum.tasks.scoring import RUNTIME_FILES
from quorum.tasks.weights import Weights

TAG_LIMIT = 500  # characters of one reason in ``variant.sites_skipped``


@dataclass(frozen=True)
class VariantCheck:
    """Where a promotion's variants are compared: the job's site runner and the sites that evaluated."""

    runner: SiteRunner
    site_ids: tuple[str, ...]


def export_serving_variants(
    ctx: JobContext, files: Path, version: str, weights: Weights, check: VariantCheck | None
) -> dict[str, float]:
    """Write ``files/onnx`` (fp32 + int8), have the sites compare both with torch, tag the version."""
    from quorum.tasks.variants import variant_deltas

    variants = export_variants(files, weights, feature_names(ctx.config.features))
    graphs = {runtime: (variants.folder / name).read_bytes() for runtime, name in RUNTIME_FILES.items()}
    asked = () if check is None else tuple(s for s in check.site_ids if s in ctx.config.site_ids)
    replies: Mapping[str, dict[str, BinaryCounts] | SiteFailure] = {}
    if check is not None and asked:
        replies = check.runner.compare_variants(asked, weights, graphs)
    per_site = {s: r for s, r in replies.items() if not isinstance(r, SiteFailure)}
    skipped = skipped_sites(ctx.config.site_ids, asked, replies, no_runner=check is None)
    tags = {"variant.formats": "onnx,onnx-int8", "variant.sites_skipped": _describe(skipped)}
    deltas: dict[str, float] = {}
    if per_site:
        deltas = variant_deltas(per_site)
        tags.update({f"variant.{key}": f"{value:.6f}" for key, value in deltas.items()})
        tags["variant.sites"] = ",".join(sorted(per_site))
    for site_id, reason in skipped.items():
        get_run_logger().warning("site %s did not compare the serving variants: %s", site_id, reason)
    set_version_tags(ctx.tracker, ctx.config.model_name, version, tags)
    return deltas


def skipped_sites(
    configured: Sequence[str],
    asked: Sequence[str],
    replies: Mapping[str, object],
    *,
    no_runner: bool,
) -> dict[str, str]:
    """Every configured site without counts, with why."""
    reasons: dict[str, str] = {}
    for site_id in configured:
        reply = replies.get(site_id)
        if isinstance(reply, SiteFailure):
            reasons[site_id] = reply.message
        elif site_id not in asked:
            reasons[site_id] = "no site runner at this promotion" if no_runner else "did not evaluate the candidate"
        elif reply is None:
            reasons[site_id] = "no reply"
    return reasons


def _describe(skipped: Mapping[str, str]) -> str:
    """``none``, or ``site (reason); site (reason)`` within an MLflow tag's length."""
    if not skipped:
        return "none"
    return "; ".join(f"{site} ({reason[:TAG_LIMIT]})" for site, reason in sorted(skipped.items()))[:5000]

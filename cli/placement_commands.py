"""``quorum placement explain JOB``: round by round, who was asked, who answered, and why.

Everything printed is read back from the records the job wrote while it ran (``jobs/JOB/placement.json``
and each round's ``placement.json`` and ``manifest.json`` in the artifact store), never recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def explain(config_path: Path, job_id: str) -> int:
    from quorum.configs.schema import load_federation
    from quorum.flows.placement import read_job, read_rounds
    from quorum.lineage.artifacts import federation_store

    store = federation_store(load_federation(config_path))
    for line in explain_lines(read_job(store, job_id), read_rounds(store, job_id)):
        print(line)
    return 0


def explain_lines(job: dict[str, Any], rounds: list[tuple[dict[str, Any], dict[str, Any] | None]]) -> list[str]:
    """The report, from the job's placement record and each round's (placement record, manifest)."""
    require = ", ".join(f"{tag}={'|'.join(values)}" for tag, values in job.get("require", {}).items())
    lines = [f"job {job['job_id']}: {len(job['sites'])} eligible site(s): {', '.join(job['sites']) or 'none'}"]
    lines.append(f"  policy: placement.require {require or 'none (every site is eligible)'}")
    for site_id, reason in job["left_out"].items():
        lines.append(f"  {site_id:<12} left out of the job: it {reason}")
    if not rounds:
        lines.append("no round was placed (the job stopped before training)")
    for record, manifest in rounds:
        lines.extend(_round_lines(record, manifest))
    return lines


def _round_lines(record: dict[str, Any], manifest: dict[str, Any] | None) -> list[str]:
    server_round = record["server_round"]
    if record.get("stop"):
        return [f"round {server_round}: not run: {record['stop']}"]
    outcomes: dict[str, Any] = record.get("outcomes", {})
    answered = [s for s in record["asked"] if outcomes.get(s, {}).get("answered")]
    budget = record.get("budget")
    spent = record["spent_before"] + record["cost"]
    money = f"cost {record['cost']:g}, spent {spent:g}" + ("" if budget is None else f" of budget {budget:g}")
    head = (
        f"round {server_round} ({record['sampler']}): asked {', '.join(record['asked'])}; "
        f"answered {', '.join(answered) or 'none'}; {money}"
    )
    if record.get("status") != "done":
        head += "; the round did not complete (the job stopped while it ran)"
    lines = [head]
    rejected: dict[str, str] = (manifest or {}).get("rejected", {})
    for site_id in record["pool"]:
        reason = record["reasons"].get(site_id, "")
        lines.append(f"  {site_id:<12} {reason}{_reply(outcomes.get(site_id), rejected.get(site_id))}")
    return lines


def _reply(outcome: dict[str, Any] | None, rejected: str | None) -> str:
    if outcome is None:
        return ""
    if not outcome["answered"]:
        return f"; did not answer: {outcome.get('problem') or 'no reply'}"
    loss = outcome.get("train_loss")
    figures = f"; answered in {outcome['duration_s']:.3f} s" if outcome.get("duration_s") is not None else "; answered"
    if loss is not None:
        figures += f", train loss {loss:.4f} on {outcome['num_examples']} examples"
    if rejected:
        figures += f"; reply rejected: {rejected}"
    return figures

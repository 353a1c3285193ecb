"""The short table a lifecycle run ends with: each stage, its status and its key figures."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from quorum.flows.lifecycle import LifecycleResult
from quorum.flows.promote import describe_pending
from quorum.flows.tuning import RoundDone


def _figures(result: LifecycleResult) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    prep = result.preprocess
    if prep is not None:
        sites = ", ".join(f"{s} {fp.train_rows + fp.test_rows}" for s, fp in prep.fingerprints.items() if fp.usable)
        excluded = f"; excluded {', '.join(prep.excluded)}" if prep.excluded else ""
        rows.append(("preprocess", "done", f"rows per site: {sites}{excluded}; contracts passed"))
    if result.tuning is not None:
        m = result.tuning.final_metrics
        rows.append(
            (
                "tune",
                "done",
                f"{len(result.tuning.rounds)} rounds {result.tuning.method}; accuracy {m.get('accuracy', 0):.3f}, "
                f"AUC {m.get('auc', 0):.3f}",
            )
        )
    rows.extend(_placement_rows(result))
    if result.evaluation is not None:
        verdict = result.evaluation.verdict
        gates = ", ".join(f"{g.name} {'ok' if g.passed else 'FAIL'}" for g in verdict.gates)
        rows.append(("evaluate", "passed" if verdict.passed else "failed", gates))
    if result.promotion is not None:
        p = result.promotion
        signers = ", ".join(p.quorum.valid_approvers)
        status = "champion" if p.champion else "awaiting approval"
        detail = (
            f"v{p.version}; {len(p.quorum.valid_approvers)} valid signatures ({signers}), "
            f"quorum {p.quorum.required} verified"
        )
        rows.append(("promote", status, detail))
    if result.monitor is not None:
        mon = result.monitor
        drift = ", ".join(f"{s} {d.drift_share:.0%}" for s, d in mon.summaries.items())
        rows.append(("monitor", "retrain advised" if mon.retrain else "stable", f"drift share: {drift}"))
    return rows


def timed_rows(result: LifecycleResult, launched_s: float | None = None) -> list[tuple[str, str, str, str]]:
    """The summary rows with each stage's wall seconds; first, with ``launched_s`` (the command's
    ``time.perf_counter()`` at launch), the start-up: launch until the first stage began."""
    rows = []
    if launched_s is not None and result.first_stage_at is not None:
        startup = result.first_stage_at - launched_s
        rows.append(("start-up", "done", "imports, Prefect API, tracking store, job record", f"{startup:.1f} s"))
    for stage, status, detail in _figures(result):
        seconds = result.stage_seconds.get(stage)
        rows.append((stage, status, detail, "" if seconds is None else f"{seconds:.1f} s"))
    return rows


def _placement_rows(result: LifecycleResult) -> list[tuple[str, str, str]]:
    """Which sites the job could use, how the rounds were shared out and what they cost."""
    placement = result.tuning.placement if result.tuning is not None else None
    left_out = result.placement.left_out
    if placement is None and not left_out:
        return []
    parts = []
    if left_out:
        parts.append(f"left out by policy: {', '.join(left_out)}")
    if placement is not None:
        shares = ", ".join(f"{s} {share:.0%}" for s, share in placement.shares.items())
        parts.append(f"{placement.describe()}; rounds asked: {shares}")
    status = "budget spent" if placement is not None and placement.stopped else "done"
    return [("placement", status, "; ".join(parts))]


def print_summary(result: LifecycleResult, console: Console | None = None, launched_s: float | None = None) -> None:
    console = console or Console()
    table = Table(title=f"Quorum lifecycle {result.job_id}", show_lines=False)
    table.add_column("stage")
    table.add_column("status")
    table.add_column("key figures", overflow="fold")
    table.add_column("time", justify="right", no_wrap=True)
    for row in timed_rows(result, launched_s):
        table.add_row(*row)
    console.print(table)
    promotion = result.promotion
    if result.unchanged_since is not None:
        console.print(
            f"nothing changed since champion {result.model_name} v{result.unchanged_since} "
            "(same data hash at every site, same config): training skipped; `quorum run --force` trains anyway"
        )
    elif promotion is not None and promotion.champion:
        console.print(
            f"champion: [bold]{result.model_name}[/bold] version {promotion.version} "
            f"(MLflow alias 'champion', run {result.run_id})"
        )
    elif promotion is not None:
        console.print(describe_pending(promotion, result.model_name))
    console.print("look at it: `quorum ui` (MLflow model browser), `quorum audit show`")


class RoundProgress:
    """A progress bar for the tuning rounds, fed by the tune flow's per-round callback (``on_round``).

    The flow calls it with a typed ``RoundDone`` after each round; it never reads the flow's logs.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("tuning"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            console=console,
        )
        self.task: TaskID | None = None

    def __call__(self, done: RoundDone) -> None:
        figures = (("accuracy", done.accuracy), ("AUC", done.auc))
        detail = ", ".join(f"{name} {value:.3f}" for name, value in figures if value is not None)
        if self.task is None:
            self.task = self.progress.add_task("tune", total=done.total_rounds, detail=detail)
        self.progress.update(self.task, completed=done.server_round, detail=detail)

    def __enter__(self) -> RoundProgress:
        self.progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.progress.stop()

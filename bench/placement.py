"""Placement benchmark: guided (Oort-like) site selection against the uniform draw, in the same run.

The federation: 8 synthetic churn sites (tests/federation.py, the demo's four site profiles twice, 900 to
2,400 rows each), MLP 16-1, 1 local epoch, SGD lr 0.2, 3 of 8 sites asked per round
(``sample_fraction`` 0.375), 20 rounds. Sites differ in speed: the test harness ``tests/slow_sites.py``
adds a per-site delay to each site's training (``DELAY_S``: four sites 0.05-0.2 s, four 1-2 s; the
round waits for its slowest asked site, as sites training side by side do). The delay is a test hook
only: no config key reaches it.

Both samplers run the real round loop (``quorum.flows.tuning.tune_flow`` with the in-process runner,
MLflow and the artifact store in a temp dir, a temporary Prefect API), one after the other, from the
same preprocessed sites. Reported per sampler: wall time of the rounds, final accuracy of the global
model (pooled over every site's held-out split), time to the target accuracy (the uniform run's final
accuracy minus ``--tolerance``), and each site's share of the rounds it was asked in, against the
fairness floor ``floor(min_share x rounds)``. Then the ratios guided / uniform.

    .venv/bin/python bench/placement.py [--rounds 20] [--min-share 0.2] [--tolerance 0.005] [--repeats 1]

Prints figures only; timings are never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test harness (tests/slow_sites.py) is not part of the installed package

SITES = tuple(f"site-{i}" for i in range(8))
DELAY_S = dict(zip(SITES, (0.05, 0.1, 0.15, 0.2, 1.0, 1.25, 1.5, 2.0), strict=True))
SAMPLE_FRACTION = 0.375


@dataclass(frozen=True)
class Outcome:
    sampler: str
    wall_s: float
    round_end_s: tuple[float, ...]  # seconds from the first round's start to each round's end
    accuracy: tuple[float, ...]
    shares: dict[str, float]

    def time_to(self, target: float) -> float | None:
        for end_s, accuracy in zip(self.round_end_s, self.accuracy, strict=True):
            if accuracy >= target:
                return end_s
        return None


def _federation(root: Path, rounds: int, min_share: float) -> dict[str, Path]:
    from tests.federation import site_entry, write_federation

    paths = {}
    for sampler in ("uniform", "guided"):
        paths[sampler] = write_federation(
            root,
            SITES,
            rounds=rounds,
            min_sites=1,
            training={"sample_fraction": SAMPLE_FRACTION, "local_epochs": 1, "learning_rate": 0.2},
            extra={
                "sites": {s: site_entry(s) for s in SITES},
                "model": {"hidden_sizes": [16]},
                "placement": {"sampler": sampler, "min_share": min_share},
            },
            name=f"{sampler}.yaml",
        )
    return paths


def run(sampler: str, config_path: Path, governance: Path, fingerprints: dict[str, Any], job: str) -> Outcome:
    from quorum.flows.context import load_context
    from quorum.flows.tuning import tune_flow
    from tests.slow_sites import SlowSitesRunner

    class TimedRunner(SlowSitesRunner):
        """Notes when each round's evaluation (the round's last step) returns."""

        ends: list[float]

        def evaluate(self, site_ids: Sequence[str], weights: Any) -> dict[str, Any]:
            out = super().evaluate(site_ids, weights)
            self.ends.append(time.perf_counter())
            return out

    ctx = load_context(str(config_path), str(governance), job)
    runner = TimedRunner(ctx.config, DELAY_S, sleep=True)
    runner.ends = []
    run_id = ctx.tracker.start_run("tune", tags={"quorum.job_id": job})
    started = time.perf_counter()
    result = tune_flow(ctx, runner, fingerprints, run_id)
    wall = time.perf_counter() - started
    ctx.tracker.end_run(run_id)
    assert result.placement is not None
    return Outcome(
        sampler,
        wall,
        tuple(end - started for end in runner.ends),
        tuple(r.metrics["accuracy"] for r in result.rounds),
        result.placement.shares,
    )


def report(uniform: Outcome, guided: Outcome, min_share: float, rounds: int, tolerance: float) -> None:
    from quorum.tasks.placement import floor_rounds

    target = uniform.accuracy[-1] - tolerance
    floor = floor_rounds(min_share, rounds) / rounds
    print(f"target accuracy {target:.4f} (uniform's final {uniform.accuracy[-1]:.4f} - {tolerance:g})")
    for outcome in (uniform, guided):
        reached = outcome.time_to(target)
        shown = "never" if reached is None else f"{reached:6.2f} s"
        print(
            f"  {outcome.sampler:<8} rounds wall {outcome.wall_s:6.2f} s, final accuracy {outcome.accuracy[-1]:.4f}, "
            f"best {max(outcome.accuracy):.4f}, time to target {shown}"
        )
        shares = ", ".join(f"{s} {v:.0%}" for s, v in outcome.shares.items())
        low = min(outcome.shares.values())
        print(
            f"           shares: {shares}; lowest {low:.0%} (floor {floor:.0%}: {'met' if low >= floor else 'MISSED'})"
        )
    uniform_t, guided_t = uniform.time_to(target), guided.time_to(target)
    if uniform_t and guided_t:
        print(
            f"  guided / uniform: time to target {guided_t / uniform_t:.2f}x, "
            f"rounds wall {guided.wall_s / uniform.wall_s:.2f}x"
        )
    else:
        print(f"  guided / uniform: rounds wall {guided.wall_s / uniform.wall_s:.2f}x (a run never reached the target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--min-share", type=float, default=0.2, help="the guided sampler's fairness floor")
    parser.add_argument("--tolerance", type=float, default=0.005, help="target = uniform's final accuracy minus this")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs (uniform then guided), new jobs each")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="quorum-bench-placement-"))
    os.environ["PREFECT_HOME"] = str(root / "prefect")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ.pop("PREFECT_API_URL", None)
    import torch
    from prefect.testing.utilities import prefect_test_harness

    from quorum.flows.context import load_context
    from quorum.flows.preprocess import preprocess_flow
    from quorum.flows.runners.local import LocalRunner
    from tests.federation import write_governance

    torch.set_num_threads(1)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            paths = _federation(root, args.rounds, args.min_share)
            governance, _ = write_governance(root)
            ctx = load_context(str(paths["uniform"]), str(governance), "preprocess")
            prep = preprocess_flow(ctx.config, LocalRunner(ctx.config))
            fingerprints = {s: prep.fingerprints[s] for s in prep.usable_sites}
            print(
                f"{len(SITES)} sites, delays {', '.join(f'{s} {d:g} s' for s, d in DELAY_S.items())}; "
                f"{args.rounds} rounds, sample_fraction {SAMPLE_FRACTION}, guided min_share {args.min_share}"
            )
            for repeat in range(args.repeats):
                uniform = run("uniform", paths["uniform"], governance, fingerprints, f"uniform-{repeat}")
                guided = run("guided", paths["guided"], governance, fingerprints, f"guided-{repeat}")
                report(uniform, guided, args.min_share, args.rounds, args.tolerance)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Drift benchmark: one site's drift check on 1,000,000 rows x 20 columns, against scipy directly.

Seeded reference and current windows (14 numeric columns, 4 of them with at most 5 distinct values,
and 6 string categorical columns of 3 to 50 categories; 7 columns shifted in the current window) are
written once to Parquet. Each contender then runs in its own fresh process that loads the windows,
resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and times one call:

- ``check_drift``: ``quorum.evaluation.drift.check_drift`` as a site runs it (no HTML report unless
  ``--html``), i.e. column checks, the statistics, and the per-column notes;
- ``scipy``: the same per-column statistics computed with scipy directly, with the method Evidently
  picks at this size (over 1000 reference rows: Wasserstein distance normed by the reference's
  standard deviation for numeric columns with more than 5 values, Jensen-Shannon distance over value
  frequencies for the others), after dropping missing and infinite values as Evidently does.

Peak memory is the growth of the process's RSS high-water mark during the call (VmHWM minus VmRSS
before it), so the windows themselves are not counted. Both contenders print their per-column
statistics; the benchmark checks they agree, so the ratio compares the same work.

    .venv/bin/python bench/drift.py [--rows 1000000] [--repeats 1] [--html]

Prints figures only; timings are never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NUMERIC = [f"num_{i}" for i in range(10)] + [f"count_{i}" for i in range(4)]
CATEGORICAL = [f"cat_{i}" for i in range(6)]
CATEGORY_SIZES = (3, 5, 8, 12, 20, 50)


# --- data ----------------------------------------------------------------------------------


def make_windows(rows: int, folder: Path) -> None:
    """Write reference.parquet and current.parquet: the site's training snapshot and latest window."""
    import numpy as np
    import pandas as pd

    def window(seed: int, shifted: bool) -> pd.DataFrame:
        rng = np.random.default_rng(seed)
        shift = 1.0 if shifted else 0.0
        data: dict[str, Any] = {}
        for i in range(10):
            move = 0.3 * shift if i < 3 else 0.0  # num_0..num_2 drift
            data[f"num_{i}"] = (
                rng.lognormal(1.0 + move, 0.5, rows) if i % 2 else rng.normal(10.0 * i + move * 10.0, 10.0, rows)
            )
        data["num_1"][rng.random(rows) < 0.01] = np.nan  # a few missing values, as real exports have
        for i in range(4):
            high = 2 if i == 0 else 5  # count_0 is a 0/1 flag
            p = np.full(high, 1.0 / high)
            if shifted and i == 1:
                p = np.linspace(1.0, 3.0, high) / np.linspace(1.0, 3.0, high).sum()  # count_1 drifts
            data[f"count_{i}"] = rng.choice(np.arange(high), rows, p=p).astype(np.float64)
        for i, size in enumerate(CATEGORY_SIZES):
            values = np.array([f"value-{k:02d}" for k in range(size)])
            weights = np.linspace(1.0, 2.0 + (3.0 * shift if i < 3 else 0.0), size)  # cat_0..cat_2 drift
            data[f"cat_{i}"] = pd.array(rng.choice(values, rows, p=weights / weights.sum()), dtype="string")
        return pd.DataFrame(data)

    window(1, shifted=False).to_parquet(folder / "reference.parquet", index=False)
    window(2, shifted=True).to_parquet(folder / "current.parquet", index=False)


# --- contenders (each run in its own process) --------------------------------------------------


def run_check_drift(reference: Any, current: Any, html_dir: Path | None) -> dict[str, float]:
    from quorum.configs.schema import DriftConfig
    from quorum.evaluation.drift import check_drift

    summary = check_drift(
        reference,
        current,
        site_id="bench",
        numeric=NUMERIC,
        categorical=CATEGORICAL,
        config=DriftConfig(),
        report_dir=html_dir,
    )
    return {f.column: f.statistic for f in summary.features}


def run_scipy(reference: Any, current: Any) -> dict[str, float]:
    """Evidently's methods at this size, written directly against numpy and scipy."""
    import numpy as np
    import pandas as pd
    from scipy import stats
    from scipy.spatial import distance

    def present(series: pd.Series) -> pd.Series:
        if pd.api.types.is_numeric_dtype(series):
            series = series.replace([np.inf, -np.inf], np.nan)
        return series.dropna()

    def jensen_shannon(ref: pd.Series, cur: pd.Series) -> float:
        ref_counts, cur_counts = ref.value_counts(), cur.value_counts()
        keys = ref_counts.index.union(cur_counts.index)
        ref_share = ref_counts.reindex(keys, fill_value=0).to_numpy() / len(ref)
        cur_share = cur_counts.reindex(keys, fill_value=0).to_numpy() / len(cur)
        return float(distance.jensenshannon(ref_share, cur_share))

    result = {}
    for column in [*NUMERIC, *CATEGORICAL]:
        ref, cur = present(reference[column]), present(current[column])
        distinct = pd.concat([ref, cur]).nunique()
        if column in NUMERIC and distinct > 5:
            norm = max(float(np.std(ref)), 0.001)
            result[column] = float(stats.wasserstein_distance(ref, cur)) / norm
        else:
            result[column] = jensen_shannon(ref, cur)
    return result


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(name: str, folder: Path) -> None:
    """One timed call in this fresh process; prints a JSON line with seconds, peak MiB and statistics."""
    import pandas as pd

    reference = pd.read_parquet(folder / "reference.parquet")
    current = pd.read_parquet(folder / "current.parquet")
    # Imports are start-up, not drift checking (Evidently's takes seconds): done before the clock starts.
    import scipy.spatial
    import scipy.stats  # noqa: F401

    work: Callable[[], dict[str, float]]
    if name == "scipy":
        work = lambda: run_scipy(reference, current)  # noqa: E731
    else:
        import evidently.metrics
        import evidently.presets  # noqa: F401

        import quorum.evaluation.drift  # noqa: F401

        html_dir = folder / "html" if name == "check_drift+html" else None
        work = lambda: run_check_drift(reference, current, html_dir)  # noqa: E731
    gc.collect()
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    started = time.perf_counter()
    stats = work()
    seconds = time.perf_counter() - started
    peak = _rss_kib("VmHWM") - before
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "stats": stats}))


def measure(name: str, folder: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", name, "--data", str(folder)]
    env = {**os.environ, "DO_NOT_TRACK": "1"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


CONTENDERS = ("scipy", "check_drift", "check_drift+html")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--html", action="store_true", help="also time check_drift writing Evidently's HTML report")
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data)
        return
    work = Path(tempfile.mkdtemp(prefix="quorum-bench-drift-"))
    try:
        started = time.perf_counter()
        make_windows(args.rows, work)
        print(
            f"{args.rows:,} rows x {len(NUMERIC) + len(CATEGORICAL)} columns per window, written in "
            f"{time.perf_counter() - started:.1f} s; median of {args.repeats} run(s), one process each"
        )
        names = CONTENDERS if args.html else CONTENDERS[:2]
        runs = {name: [measure(name, work) for _ in range(args.repeats)] for name in names}
        report(runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(runs: dict[str, list[dict[str, Any]]]) -> None:
    figures = {
        name: (statistics.median(r["seconds"] for r in results), max(r["peak_mib"] for r in results))
        for name, results in runs.items()
    }
    base_s, base_mib = figures["scipy"]
    print(f"    {'contender':<18} {'seconds':>8} {'peak MiB':>9} {'time ratio':>11} {'memory ratio':>13}")
    for name, (seconds, peak) in figures.items():
        ratios = f"{seconds / base_s:>10.2f}x {peak / max(base_mib, 1):>12.2f}x"
        print(f"    {name:<18} {seconds:>8.2f} {peak:>9.0f} {ratios}")
    direct = runs["scipy"][0]["stats"]
    for name in [name for name in runs if name != "scipy"]:
        worst = max(abs(direct[column] - runs[name][0]["stats"][column]) for column in direct)
        print(f"    largest difference of {name}'s statistics from scipy's: {worst:.2e}")


if __name__ == "__main__":
    main()

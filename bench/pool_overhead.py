"""Pool mode at 8 and 16 sites against the in-process run of the same job, as a user runs both.

The workload is the fixed one of ``bench/tuning.py``: N sites x 5,000 rows x 32 float32 features
(numpy seed 0; site i shifts its first 4 features by 0.25 * i; label = 1 if x @ w + 0.5 * noise > 0,
w from seed 42), 20% held out per site, MLP 32-64-64-1, SGD lr 0.05, batch 64, 1 local epoch,
10 rounds of FedAvg with every site. Each site gets it as a raw CSV (plus a two-value protected
column for the fairness gates and a current window for monitoring), so every job runs the whole
lifecycle: contract, preprocessing, the rounds, evaluation, gates, promotion, monitoring.

Everything goes through the ``quorum`` command in a temporary folder, servers on free loopback ports:
  1. ``quorum up`` (Prefect and MLflow servers, one pool and worker per site plus the coordinator's);
  2. the baseline: ``quorum run --force`` in-process;
  3. ``--jobs`` consecutive ``quorum run --runner pool --force``;
  4. ``quorum down``;
then again with ``--big`` sites: up, one pool job, down.

For each job: wall time end to end, start-up (command launched until every site answered its
preprocess request), per-round wall time (between round checkpoints in the artifact store), sites
lost (configured sites missing from any round), and the coverage gate from the audit log.

    .venv/bin/python bench/pool_overhead.py [--sites 8] [--jobs 3] [--big 16] [--no-baseline] [--keep]

Prints figures and ratios only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QUORUM = str(Path(sys.executable).with_name("quorum"))
ROWS, FEATURES, SHIFTED, ROUNDS, HIDDEN = 5_000, 32, 4, 10, (64, 64)


@dataclass(frozen=True)
class Job:
    name: str
    wall_s: float
    startup_s: float
    rounds_s: tuple[float, ...]
    lost: tuple[str, ...]
    coverage: str
    exit_code: int


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _write_sites(root: Path, sites: int) -> list[str]:
    """Raw CSVs of the fixed workload, one folder per site (the data the sites hold)."""
    rng = np.random.default_rng(0)
    w = np.random.default_rng(42).normal(size=FEATURES)
    names = [f"f{i:02d}" for i in range(FEATURES)]
    site_ids = [f"s{i:02d}" for i in range(sites)]
    for index, site_id in enumerate(site_ids):
        x = rng.normal(size=(ROWS, FEATURES))
        x[:, :SHIFTED] += 0.25 * index
        y = (x @ w + 0.5 * rng.normal(size=ROWS) > 0).astype(int)
        raw = root / "sites" / site_id / "raw"
        raw.mkdir(parents=True)
        header = ",".join([*names, "label", "group"])
        groups = np.where(np.arange(ROWS) % 2 == 0, "a", "b")
        rows = zip(x, y, groups, strict=True)
        lines = [",".join([*(f"{v:.6f}" for v in row), str(label), group]) for row, label, group in rows]
        (raw / "train.csv").write_text("\n".join([header, *lines]) + "\n")
        (raw / "current.csv").write_text("\n".join([header, *lines[:1_000]]) + "\n")
    return site_ids


def _federation(root: Path, site_ids: list[str]) -> Path:
    config = {
        "name": "bench-pool",
        "model_name": "bench-pool-model",
        "seed": 0,
        "state_dir": "state",
        "features": {"numeric": [f"f{i:02d}" for i in range(FEATURES)]},
        "contract": {"min_rows": 1_000, "label_rate": [0.05, 0.95]},
        "sites": {s: {"root": f"sites/{s}", "target": "label", "protected_attribute": "group"} for s in site_ids},
        "model": {"hidden_sizes": list(HIDDEN)},
        "training": {
            "rounds": ROUNDS,
            "local_epochs": 1,
            "batch_size": 64,
            "learning_rate": 0.05,
            "positive_weight": "none",
            "min_sites": len(site_ids),
        },
        "gates": {"min_accuracy": 0.6, "min_auc": 0.6, "max_regression": None, "min_sites": len(site_ids)},
        "drift": {"min_rows": 30, "html_report": False},
        "deployment": {
            "prefect_port": _free_port(),
            "mlflow_port": _free_port(),
            "round_deadline_s": 300,
            "session_start_timeout_s": 300,
        },
    }
    path = root / "federation.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _quorum(root: Path, *args: str, api_url: str | None = None) -> tuple[float, int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    clean["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if api_url:  # the in-process run reports to the same Prefect server as the pool jobs
        clean["PREFECT_API_URL"] = api_url
    started = time.perf_counter()
    done = subprocess.run([QUORUM, *args], cwd=root, env=clean, capture_output=True, text=True, check=False)
    return time.perf_counter() - started, done.returncode, done.stdout + done.stderr


def _run(root: Path, config: Path, governance: Path, keys: list[str], job_id: str, pool: bool) -> Job:
    args = ["run", "--force", "--config", str(config), "--governance", str(governance), "--job-id", job_id]
    args += [arg for key in keys for arg in ("--approve-with", key)]
    args += ["--runner", "pool"] if pool else []
    deployment = yaml.safe_load(config.read_text())["deployment"]
    api_url = None if pool else f"http://127.0.0.1:{deployment['prefect_port']}/api"
    launched = time.time()
    wall, code, output = _quorum(root, *args, api_url=api_url)
    if code != 0:
        print(f"  {job_id} exited {code}:\n" + "\n".join(output.strip().splitlines()[-12:]))
    jobs = root / "state" / "artifacts" / "jobs" / job_id
    manifests = sorted((jobs / "rounds").glob("*/manifest.json"))
    stamps = [m.stat().st_mtime for m in manifests]  # round r's time: from checkpoint r-1 to checkpoint r
    rounds = tuple(later - earlier for earlier, later in itertools.pairwise(stamps))
    site_ids = sorted(yaml.safe_load(config.read_text())["sites"])
    trained_every_round = set(site_ids)
    for manifest in manifests:
        trained_every_round &= set(json.loads(manifest.read_text())["sites"])
    lost = tuple(s for s in site_ids if s not in trained_every_round) if manifests else tuple(site_ids)
    first_replies = list((jobs / "replies" / "000001").glob("*.json"))
    record = jobs / "job.json"
    startup = (
        max(p.stat().st_mtime for p in first_replies) - launched
        if pool and first_replies
        else (record.stat().st_mtime - launched if record.exists() else float("nan"))
    )
    return Job(job_id, wall, startup, rounds, lost, _coverage(root, job_id), code)


def _coverage(root: Path, job_id: str) -> str:
    audit = root / "state" / "audit.jsonl"
    if not audit.exists():
        return "no audit log"
    for line in reversed(audit.read_text().splitlines()):
        entry = json.loads(line)
        details = entry.get("details", {})
        if entry.get("event") == "gate_verdict" and details.get("job_id") == job_id:
            [gate] = [g for g in details["gates"] if g["name"] == "site_coverage"] or [{"reason": "missing"}]
            return str(gate["reason"])
    return "no verdict"


def _print_job(job: Job, baseline: Job | None) -> None:
    rounds = job.rounds_s or (float("nan"),)
    ratio = f"  {job.wall_s / baseline.wall_s:4.2f}x in-process" if baseline else ""
    print(
        f"  {job.name:<14} exit {job.exit_code}  job {job.wall_s:6.1f} s{ratio}  start-up {job.startup_s:5.1f} s  "
        f"round median {statistics.median(rounds):5.2f} s (max {max(rounds):5.2f} s)  "
        f"sites lost {len(job.lost)}{' ' + ','.join(job.lost) if job.lost else ''}"
    )
    print(f"  {'':<14} coverage gate: {job.coverage}")


def _federation_run(sites: int, jobs: int, baseline: bool, keep: bool = False) -> None:
    from tests.federation import write_governance

    root = Path(tempfile.mkdtemp(prefix=f"quorum-bench-pool-{sites}-"))
    try:
        site_ids = _write_sites(root, sites)
        config = _federation(root, site_ids)
        governance, keys = write_governance(root)
        keys = keys[:2]
        print(f"\n{sites} sites x {ROWS} rows x {FEATURES} features, {ROUNDS} rounds (folder {root})")
        up_s, code, output = _quorum(root, "up", "--config", str(config), "--governance", str(governance))
        reported = next((line for line in output.splitlines() if line.startswith("up in")), "")
        print(f"  quorum up      {up_s:6.1f} s (exit {code}; {reported or output.strip()[-400:]})")
        try:
            if code != 0:
                return
            local = _run(root, config, governance, keys, "in-process", pool=False) if baseline else None
            if local is not None:
                _print_job(local, None)
            for index in range(1, jobs + 1):
                _print_job(_run(root, config, governance, keys, f"pool-{index}", pool=True), local)
        finally:
            down_s, code, _ = _quorum(root, "down", "--config", str(config))
            print(f"  quorum down    {down_s:6.1f} s (exit {code})")
    finally:
        if keep:
            print(f"  kept {root} (services' logs under state/services/)")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--big", type=int, default=16, help="sites of the second federation (0: skip)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-process run")
    parser.add_argument("--keep", action="store_true", help="keep the federations' folders and logs")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.1f} at start")
    _federation_run(args.sites, args.jobs, baseline=not args.no_baseline, keep=args.keep)
    if args.big:
        _federation_run(args.big, 1, baseline=False, keep=args.keep)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

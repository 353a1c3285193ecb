"""The whole lifecycle as a user runs it (`quorum run`), against a plain torch loop, in one run.

The fixed workload of ``bench/tuning.py``: 8 sites x 5,000 rows x 32 float32 features (numpy seed 0;
site i shifts its first 4 features by 0.25 * i; label = 1 if x @ w + 0.5 * noise > 0, w from seed 42),
written as each site's ``raw/train.csv`` plus a 5,000-row current window (seed 1) for drift, with a
federation config (MLP 32-64-64-1, SGD lr 0.05, batch 64, 1 local epoch, 10 rounds of FedAvg, 20% held
out, no PII columns, no HTML drift report) and a governance file with two approvers whose keys sign.

(a) ``quorum run --force`` as a subprocess, timed from launch to exit: preprocess (Great Expectations
    contract), tune, evaluate, promote (MLflow, provenance, two signatures), monitor (drift). With
    ``--runner local`` (default) the sites run in that process and the command starts its own temporary
    Prefect API; ``--runner pool`` dispatches to each site's work pool: the script starts ``quorum up`` for the
    generated federation first (on free loopback ports, not timed) and ``quorum down`` at the end.
(b) Plain torch: the same 10 rounds of local training and FedAvg with state dicts
    (``bench/tuning.py``'s loop), plus each round's evaluation on every site's held-out rows.

Each repeat runs (a) then (b), so their ratio is taken under the same machine load. The first `quorum run`
of a new federation also creates its Prefect database; it is timed apart ("first run") and every
repeat after it runs on the same state folder.

    .venv/bin/python bench/lifecycle.py [--repeats 2] [--runner local|pool] [--site-processes auto|0|N] [--keep DIR]

Prints figures only; timings are never asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tuning  # the workload and the plain loop are bench/tuning.py's own

QUORUM = Path(sys.executable).with_name("quorum")
APPROVERS = ("alice", "bob")
STAGES = ("start-up", "preprocess", "tune", "evaluate", "promote", "monitor")


def write_federation(root: Path, site_processes: int | str = "auto") -> tuple[Path, Path, list[Path]]:
    """The workload as site CSVs, a federation config, a governance file and two approvers' keys."""
    from quorum.lineage.keys import generate_key_pair, public_key_fingerprint

    names = [f"f{i:02d}" for i in range(tuning.FEATURES)]
    sites = tuning.make_sites()
    current = _current_windows(names)
    for index, ((train, test), window) in enumerate(zip(sites, current, strict=True)):
        raw = root / "sites" / f"site-{index}" / "raw"
        raw.mkdir(parents=True)
        x = np.concatenate([train[0], test[0]])
        y = np.concatenate([train[1], test[1]]).astype("int8")
        _write_csv(raw / "train.csv", names, x, y)
        _write_csv(raw / "current.csv", names, window, None)
    federation = {
        "name": "bench-lifecycle",
        "model_name": "bench-model",
        "seed": 0,
        "state_dir": "state",
        "features": {"numeric": names},
        "sites": {f"site-{i}": {"root": f"sites/site-{i}"} for i in range(tuning.SITES)},
        "model": {"hidden_sizes": list(tuning.HIDDEN)},
        "training": {
            "rounds": tuning.ROUNDS,
            "local_epochs": tuning.EPOCHS,
            "batch_size": tuning.BATCH,
            "learning_rate": tuning.LEARNING_RATE,
            "positive_weight": "none",
            "test_fraction": tuning.TEST_FRACTION,
            "min_sites": tuning.SITES,
        },
        "gates": {"min_accuracy": 0.8, "min_auc": 0.8, "max_selection_rate_gap": None},
        "drift": {"html_report": False},
        # free loopback ports for `--runner pool` (`quorum up`), so no other server's port is taken
        "deployment": {"prefect_port": _free_port(), "mlflow_port": _free_port(), "site_processes": site_processes},
    }
    for name in (*APPROVERS, "coordinator"):
        generate_key_pair(root / "keys" / f"{name}.key", root / "keys" / f"{name}.pub")
    keys = [root / "keys" / f"{name}.key" for name in APPROVERS]
    pinned = {n: public_key_fingerprint(root / "keys" / f"{n}.pub") for n in (*APPROVERS, "coordinator")}
    governance = {
        "quorum": len(APPROVERS),
        "approvers": [
            {"name": n, "role": "reviewer", "public_key": f"keys/{n}.pub", "fingerprint": pinned[n]} for n in APPROVERS
        ],
        # the checkpoint key signs the audit log's head; its private half sits beside it, as on a coordinator
        "checkpoints": {"public_key": "keys/coordinator.pub", "fingerprint": pinned["coordinator"]},
    }
    config, governance_path = root / "federation.yaml", root / "governance.yaml"
    config.write_text(yaml.safe_dump(federation, sort_keys=False), encoding="utf-8")
    governance_path.write_text(yaml.safe_dump(governance, sort_keys=False), encoding="utf-8")
    return config, governance_path, keys


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _current_windows(names: list[str]) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    windows = []
    for index in range(tuning.SITES):
        x = rng.normal(size=(tuning.ROWS, len(names)))
        x[:, : tuning.SHIFTED] += 0.25 * index
        windows.append(x.astype(np.float32))
    return windows


def _write_csv(path: Path, names: list[str], x: np.ndarray, y: np.ndarray | None) -> None:
    import pandas as pd

    frame = pd.DataFrame(x, columns=names)
    if y is not None:
        frame["label"] = y
    frame.to_csv(path, index=False, float_format="%.6g")


# --- (a) quorum run ---------------------------------------------------------------------------------


def quorum_run(
    root: Path, config: Path, governance: Path, keys: list[Path], runner: str
) -> tuple[float, dict[str, float]]:
    """Wall seconds of one `quorum run` from launch to exit, and the stage seconds its table printed."""
    command = [str(QUORUM), "run", "--config", str(config), "--governance", str(governance), "--force"]
    command += ["--runner", runner]
    for key in keys:
        command += ["--approve-with", str(key)]
    env = _env()
    env["COLUMNS"] = "200"  # one table row per line, so the stage seconds can be read back
    started = time.perf_counter()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"quorum run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return wall, _stage_seconds(done.stdout)


def _stage_seconds(table: str) -> dict[str, float]:
    found = {}
    for stage in STAGES:
        match = re.search(rf"^\W*{re.escape(stage)}\W.*?(\d+\.\d+) s\W*$", table, flags=re.MULTILINE)
        if match:
            found[stage] = float(match.group(1))
    return found


# --- (b) plain torch loop with per-round evaluation --------------------------------------------------


def plain_run(sites: list[tuple[tuning.Split, tuning.Split]]) -> tuple[float, float]:
    """Wall seconds and final mean accuracy of ``tuning.plain_rounds``' loop with an evaluation after each round."""
    accuracies: list[float] = []
    started = time.perf_counter()
    tuning.plain_rounds(sites, lambda model: accuracies.append(_evaluate(model, sites)))
    return time.perf_counter() - started, accuracies[-1]


def _evaluate(model: torch.nn.Module, sites: list[tuple[tuning.Split, tuning.Split]]) -> float:
    """Each site's held-out accuracy (what the round loop's per-round evaluation computes, among others)."""
    import torch

    model.eval()
    accuracies = []
    with torch.no_grad():
        for _, (x, y) in sites:
            scores = torch.sigmoid(model(torch.from_numpy(x))).numpy()
            accuracies.append(float(np.mean((scores >= 0.5) == y)))
    return float(np.mean(accuracies))


# --- main ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed pairs after the first run")
    parser.add_argument("--runner", choices=("local", "pool"), default="local")
    parser.add_argument("--keep", type=Path, help="write the federation here and keep it (default: a temp folder)")
    parser.add_argument(
        "--site-processes",
        type=lambda text: text if text == "auto" else int(text),
        default="auto",
        help="deployment.site_processes of the generated federation: auto (default), 0 (in the job's process) or N",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.keep or Path(tempfile.mkdtemp(prefix="quorum-bench-lifecycle-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        config, governance, keys = write_federation(root, args.site_processes)
        print(
            f"workload: {tuning.SITES} sites x {tuning.ROWS} rows x {tuning.FEATURES} features as CSV, MLP "
            f"{tuning.FEATURES}-{'-'.join(map(str, tuning.HIDDEN))}-1, {tuning.ROUNDS} rounds, {tuning.EPOCHS} "
            f"local epoch; runner {args.runner}, site_processes {args.site_processes}; federation in {root}"
        )
        if args.runner == "pool":
            print("pool runner: starting the stack (`quorum up`, not timed) ...")
            _quorum(root, "up", "--config", str(config), "--governance", str(governance))
        sites = tuning.make_sites()
        plain_run(sites[:1])  # warm-up: torch's first-call costs stay out of the timings
        first, first_stages = quorum_run(root, config, governance, keys, args.runner)
        print(f"  first run (creates the Prefect database): quorum run {first:6.2f} s  {_stages(first_stages)}")
        pairs = []
        for _ in range(args.repeats):
            wall, stages = quorum_run(root, config, governance, keys, args.runner)
            plain, accuracy = plain_run(sites)
            pairs.append((wall, plain))
            print(
                f"  quorum run {wall:6.2f} s, plain loop {plain:6.2f} s (accuracy {accuracy:.4f}): "
                f"{wall / plain:5.2f}x  {_stages(stages)}  (load average {os.getloadavg()[0]:.1f})"
            )
        ratios = [w / p for w, p in pairs]
        if ratios:
            print(
                f"  ratio quorum run / plain loop: median {statistics.median(ratios):.2f}x, best {min(ratios):.2f}x "
                f"(quorum median {statistics.median(w for w, _ in pairs):.2f} s, "
                f"plain median {statistics.median(p for _, p in pairs):.2f} s)"
            )
    finally:
        if args.runner == "pool" and (root / "federation.yaml").exists():
            _quorum(root, "down", "--config", str(root / "federation.yaml"))
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


def _quorum(root: Path, *argv: str) -> None:
    done = subprocess.run([str(QUORUM), *argv], cwd=root, env=_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"quorum {argv[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def _env() -> dict[str, str]:
    """This shell's environment without a Prefect or MLflow server of its own: the federation's are used."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}


def _stages(stages: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in stages.items())


if __name__ == "__main__":
    main()

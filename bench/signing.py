"""Signing benchmark: approver signatures over a 1 GiB model folder, and the mean time to roll back.

(a) A model folder of 1 GiB of random bytes (8 files of 128 MiB, numpy seed 0) in a temp folder.
    Timed on the same files in the same run, page cache warm for all (one untimed read first):
    ``quorum.lineage.signing.sign_model`` and ``verify_signature`` (OpenSSF model-signing, sha256 per file),
    ``quorum.lineage.provenance.build_statement`` (our own subject digests, re-computed at every verify),
    and coreutils ``sha256sum`` over the same files, once sequentially and once with one process per
    CPU. Throughput in MB/s (10^6 bytes per second); ratio = throughput / sequential sha256sum.
(b) Mean time to roll back: a tiny federation (3 sites, 2 rounds) where v1 and then v2 were promoted.
    Three times: make v2 champion again (untimed), then time from calling ``rollback_flow`` until
    ``deploy_flow`` at one site has verified and loaded v1. Flows run on a temporary Prefect API.

    .venv/bin/python bench/signing.py [--repeats 3] [--skip-rollback]

Prints figures only; timings are never asserted.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = Path(tempfile.mkdtemp(prefix="quorum-bench-signing-"))
os.environ["PREFECT_HOME"] = str(WORK / "prefect-home")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["DO_NOT_TRACK"] = "1"

MODEL_FILES, FILE_BYTES = 8, 128 * 1024 * 1024
ROLLBACKS = 3


def write_model(folder: Path) -> list[Path]:
    import numpy as np

    rng = np.random.default_rng(0)
    files = []
    for index in range(MODEL_FILES):
        path = folder / f"shard-{index:02d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.bytes(FILE_BYTES))
        files.append(path)
    return files


def timed(action: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` runs of ``action``."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def sha256sum(files: list[Path], processes: int) -> None:
    if processes == 1:
        subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True)
        return
    running = [
        subprocess.Popen(["sha256sum", *map(str, files[i::processes])], stdout=subprocess.DEVNULL)
        for i in range(processes)
    ]
    if any(p.wait() != 0 for p in running):
        raise RuntimeError("sha256sum failed")


def bench_signing(repeats: int) -> None:
    from quorum.lineage.keys import generate_key_pair
    from quorum.lineage.provenance import BuildFacts, build_statement
    from quorum.lineage.signing import sign_model, verify_signature

    model, signature = WORK / "model", WORK / "signatures" / "ann.sig"
    files = write_model(model)
    total = sum(p.stat().st_size for p in files)
    generate_key_pair(WORK / "ann.key", WORK / "ann.pub")
    facts = BuildFacts("job", "c" * 64, "commit", "run", "run", (), {"passed": True})
    sha256sum(files, 1)  # warm the page cache for every contender

    cpus = os.cpu_count() or 1
    results = {
        "sha256sum (sequential)": timed(lambda: sha256sum(files, 1), repeats),
        f"sha256sum ({cpus} processes)": timed(lambda: sha256sum(files, cpus), repeats),
        "sign (model-signing)": timed(lambda: sign_model(model, WORK / "ann.key", signature, "ann"), repeats),
        "verify (model-signing)": timed(lambda: verify_signature(model, signature, WORK / "ann.pub"), repeats),
        "provenance subject digests": timed(lambda: build_statement(model, "m", "1", facts), repeats),
    }
    baseline = total / results["sha256sum (sequential)"]
    print(f"\n(a) {total / 2**30:.2f} GiB in {len(files)} files, median of {repeats}, {cpus} CPUs")
    print(f"    {'operation':<30} {'seconds':>8} {'MB/s':>8} {'vs sha256sum':>13}")
    for name, seconds in results.items():
        rate = total / seconds
        print(f"    {name:<30} {seconds:>8.2f} {rate / 1e6:>8.0f} {rate / baseline:>12.2f}x")
    shutil.rmtree(model)


def bench_rollback() -> None:
    from quorum.flows.context import load_context
    from quorum.flows.deploy import deploy_flow, read_deployment
    from quorum.flows.governance import rollback_flow
    from quorum.flows.lifecycle import lifecycle
    from quorum.flows.promote import promote_approved, sign_candidate
    from quorum.lineage.keys import approver_for_private_key
    from quorum.lineage.signing import today_utc
    from quorum.lineage.tracking import CHAMPION, alias_version
    from tests.federation import pin_governance_root, write_federation, write_governance

    root = WORK / "federation"
    root.mkdir()
    config_path = write_federation(root, rounds=2)
    governance_path, keys = write_governance(root)
    pin_governance_root(config_path, governance_path)
    config, governance = str(config_path), str(governance_path)
    lifecycle(config, governance, keys[:2])
    lifecycle(config, governance, keys[:2])
    ctx = load_context(config, governance)
    site = ctx.config.site("alpha")
    deploy_flow(config, governance, "alpha")
    times, rollback_times = [], []
    for _ in range(ROLLBACKS):
        if alias_version(ctx.tracker, ctx.config.model_name, CHAMPION) != "2":
            again = load_context(config, governance)  # a re-promotion is a new statement: approvers sign again
            signers = [(approver_for_private_key(Path(k), again.governance), Path(k)) for k in keys[:2]]
            sign_candidate(again, "2", signers, today_utc())
            promote_approved(again, "2")
        started = time.perf_counter()
        rollback_flow(load_context(config, governance), [Path(keys[2]), Path(keys[0])], None, "bench")
        rollback_times.append(time.perf_counter() - started)
        deployment = deploy_flow(config, governance, "alpha")
        times.append(time.perf_counter() - started)
        running = read_deployment(site)
        assert deployment.version == "1" and running is not None and running.version == "1"
    print(f"\n(b) mean time to roll back (rollback_flow -> deploy_flow loaded v1 at one site), {ROLLBACKS} runs")
    print(f"    mean {statistics.mean(times):.2f} s   min {min(times):.2f} s   max {max(times):.2f} s")
    deploy_times = [total - rollback for total, rollback in zip(times, rollback_times, strict=True)]
    print(
        f"    of which rollback {statistics.mean(rollback_times):.2f} s, deploy {statistics.mean(deploy_times):.2f} s"
    )


def main() -> None:
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-rollback", action="store_true")
    args = parser.parse_args()
    try:
        bench_signing(args.repeats)
        if not args.skip_rollback:
            bench_rollback()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()

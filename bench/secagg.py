"""Secure aggregation benchmark: Quorum's SecAgg+ round against its unmasked round, and beside Flower's.

Fixed inputs (numpy seed 0): 8 sites, each with an update of P float32 values (normal, scale 0.01) and
an example count 100 * (site index + 1); neighbourhoods of 7 shares, threshold 4 (Quorum's defaults at
8 sites, passed to Flower as ``num_shares=7, reconstruction_threshold=4``).

(a) The aggregate and the dropout scenarios: Quorum's protocol (``tasks.secagg_protocol``, every step,
    the sites in turn in this process) on those updates, with one or more sites gone after a given step,
    against the exact float64 weighted mean of the sites whose update is in the sum.
(b) A round as the round loop runs it, at 8 sites x about 1M parameters (MLP 32-1000-1000-1, 4,000
    train rows per site, SGD batch 64, 1 epoch, 1 torch thread): unmasked = train each site + FedAvg;
    masked = the same training + advertise, share, clip and mask, unmask, checks. Interleaved repeats,
    medians and their ratio (target: masked <= 1.5 x unmasked).
(c) With ``--flower``: Flower's ``SecAggPlusWorkflow`` (flwr 1.42, simulation, Ray) on the same inputs and
    the same dropout scenarios, in a separate ``.venv-flower`` this script creates on first use
    (``pip install "flwr[simulation]==1.42.*"``; never the project's lock), run through
    ``bench/secagg_flower.py``: its aggregate's error, whether each scenario aggregates, and its fit-round
    time (clients return fixed updates, no training) beside its own unmasked fit round.

    .venv/bin/python bench/secagg.py [--params 1000000] [--repeats 2] [--flower] [--skip-training]

Prints figures only; timings are never asserted. The machine may be shared: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from quorum.configs.errors import QuorumError
from quorum.tasks.aggregate import fedavg
from quorum.tasks.secagg import add_mean_delta, clip, flatten, plan_round
from quorum.tasks.secagg_protocol import SecAggSite, checked_mean_delta, unmask_sum

REPO = Path(__file__).resolve().parents[1]
FLOWER_VENV = REPO / ".venv-flower"
FLOWER_PIN = "flwr[simulation]==1.42.*"
SITES, NUM_SHARES, THRESHOLD, JOB = 8, 7, 4, "bench-job"
FEATURES, HIDDEN, TRAIN_ROWS, BATCH, LEARNING_RATE = 32, (1000, 1000), 4000, 64, 0.05
CLIP_NORM = 1e4  # large: these runs compare aggregates, not clipping

# scenario -> (Quorum step after which the sites go, sites, their update in the sum?, Flower stage)
SCENARIOS: dict[str, tuple[str, tuple[int, ...], bool, str | None]] = {
    "no dropout": ("", (), True, None),
    "1 gone before advertising": ("before_keys", (2,), False, "setup"),
    "1 gone after advertising": ("after_keys", (2,), False, "share_keys"),
    "1 gone after sharing": ("after_share", (2,), False, "collect_masked_vectors"),
    "1 gone after masked input": ("after_mask", (2,), True, "unmask"),
    "3 gone after sharing (n-t of a 7-site neighbourhood)": ("after_share", (1, 2, 3), False, "collect_masked_vectors"),
    "4 gone after sharing (one too many)": ("after_share", (1, 2, 3, 4), False, "collect_masked_vectors"),
}


def make_inputs(params: int) -> tuple[list[NDArray[np.float32]], list[int]]:
    rng = np.random.default_rng(0)
    return [rng.normal(scale=0.01, size=params).astype(np.float32) for _ in range(SITES)], [
        100 * (i + 1) for i in range(SITES)
    ]


def site_ids() -> list[str]:
    return [f"site-{i}" for i in range(SITES)]


def secure_mean(
    vectors: Mapping[str, NDArray[np.floating]], examples: Mapping[str, int], step: str = "", gone: Collection[str] = ()
) -> NDArray[np.float64]:
    """Quorum's four steps for every site in turn; ``gone`` leave after ``step``. The checked weighted mean."""
    sites = {s: SecAggSite.generate(s, JOB) for s in vectors}
    keys = {s: site.round_keys(1) for s, site in sites.items() if not (step == "before_keys" and s in gone)}
    plan = plan_round(keys, JOB, 1, NUM_SHARES, THRESHOLD)
    inbox: dict[str, dict[str, bytes]] = {}
    shared = [s for s in keys if not (step == "after_keys" and s in gone)]
    for sender in shared:
        for recipient, ciphertext in sites[sender].share_keys(1, keys, plan).items():
            inbox.setdefault(recipient, {})[sender] = ciphertext
    unshared = sorted(set(keys) - set(shared))
    masked = {
        s: sites[s].mask(clip(vectors[s], CLIP_NORM), examples[s], 1, keys, plan, unshared)
        for s in shared
        if not (step == "after_share" and s in gone)
    }
    dropped = sorted(set(keys) - set(masked))
    revealed = {
        s: sites[s].reveal(1, keys, plan, dropped, {k: c for k, c in inbox.get(s, {}).items() if k in shared}, {})[0]
        for s in masked
        if not (step == "after_mask" and s in gone)
    }
    total = unmask_sum(masked, keys, plan, shared, revealed, 1, JOB)
    return checked_mean_delta(total, float(sum(examples[s] for s in masked)), CLIP_NORM, len(masked))


def exact_mean(
    vectors: Mapping[str, NDArray[np.floating]], examples: Mapping[str, int], sites: Collection[str]
) -> NDArray[np.float64]:
    total = sum(examples[s] for s in sites)
    return np.asarray(sum(vectors[s].astype(np.float64) * examples[s] for s in sites) / total)


def run_scenarios(updates: list[NDArray[np.float32]], examples: list[int]) -> dict[str, dict[str, Any]]:
    ids = site_ids()
    vectors, counts = dict(zip(ids, updates, strict=True)), dict(zip(ids, examples, strict=True))
    out: dict[str, dict[str, Any]] = {}
    for name, (step, gone_at, in_sum, _) in SCENARIOS.items():
        gone = [ids[i] for i in gone_at]
        summed = [s for s in ids if in_sum or s not in gone]
        started = time.perf_counter()
        try:
            got = secure_mean(vectors, counts, step, gone)
            error = float(np.abs(got - exact_mean(vectors, counts, summed)).max())
            out[name] = {"result": "aggregated", "max_abs_error": error, "s": time.perf_counter() - started}
        except QuorumError as exc:
            out[name] = {"result": f"refused: {exc.message}", "s": time.perf_counter() - started}
    return out


# --- (b) a round with training -------------------------------------------------------------------------


def training_round(
    masked: bool, sites: list[tuple[NDArray[np.float32], NDArray[np.float32]]], start: list[Any]
) -> float:
    from quorum.tasks.training import LocalTrainingConfig, train_local

    started = time.perf_counter()
    ids = site_ids()
    trained = {}
    for index, (x, y) in enumerate(sites):
        config = LocalTrainingConfig(HIDDEN, 0.0, 1, BATCH, LEARNING_RATE, False, seed=index)
        trained[ids[index]] = train_local(start, x, y, config)
    if masked:
        deltas = {s: flatten(r.weights) - flatten(start) for s, r in trained.items()}
        mean = secure_mean(deltas, {s: r.num_examples for s, r in trained.items()})
        add_mean_delta(start, mean)
    else:
        fedavg([(r.weights, r.num_examples) for r in trained.values()])
    return time.perf_counter() - started


def time_rounds(repeats: int) -> dict[str, Any]:
    import torch

    from quorum.tasks.model import initial_weights

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    w = np.random.default_rng(42).normal(size=FEATURES)
    sites = []
    for _ in range(SITES):
        x = rng.normal(size=(TRAIN_ROWS, FEATURES)).astype(np.float32)
        sites.append((x, (x @ w > 0).astype(np.float32)))
    start = initial_weights(FEATURES, HIDDEN, np.zeros(FEATURES), np.ones(FEATURES), seed=0)
    params = int(sum(np.size(t) for t in start))
    times: dict[str, list[float]] = {"unmasked": [], "masked": []}
    for _ in range(repeats):  # interleaved, so both see the same machine load
        times["unmasked"].append(training_round(False, sites, start))
        times["masked"].append(training_round(True, sites, start))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"params": params, "times_s": times, "median_s": medians, "ratio": medians["masked"] / medians["unmasked"]}


def time_protocol(updates: list[NDArray[np.float32]], examples: list[int], repeats: int) -> dict[str, float]:
    ids = site_ids()
    vectors, counts = dict(zip(ids, updates, strict=True)), dict(zip(ids, examples, strict=True))

    def best(work: Callable[[], object]) -> float:
        spent = []
        for _ in range(repeats):
            started = time.perf_counter()
            work()
            spent.append(time.perf_counter() - started)
        return statistics.median(spent)

    return {
        "quorum secagg+ (all steps, 8 sites in turn)": best(lambda: secure_mean(vectors, counts)),
        "quorum fedavg (unmasked)": best(lambda: fedavg([([v], n) for v, n in zip(updates, examples, strict=True)])),
    }


# --- (c) Flower -------------------------------------------------------------------------------------------


def flower_python() -> Path:
    """The separate Flower environment, created on first use; the project's own environment is never touched."""
    python = FLOWER_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {FLOWER_VENV} with {FLOWER_PIN} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", FLOWER_PIN], check=True)
    return python


def run_flower(updates: list[NDArray[np.float32]], examples: list[int], folder: Path) -> dict[str, Any]:
    inputs = folder / "inputs.npz"
    np.savez(inputs, examples=np.array(examples), **{f"update_{i}": u for i, u in enumerate(updates)})
    scenarios: dict[str, dict[str, Any]] = {"unmasked fit round": {"masked": False}}
    for name, (_, gone_at, _, stage) in SCENARIOS.items():
        scenarios[name] = {"stage": stage, "dropped": list(gone_at)}
    command = [
        str(flower_python()),
        str(REPO / "bench" / "secagg_flower.py"),
        str(inputs),
        str(folder),
        "--num-shares",
        str(NUM_SHARES),
        "--threshold",
        str(THRESHOLD),
        "--scenarios",
        json.dumps(scenarios),
    ]
    env = {**os.environ, "RAY_memory_monitor_refresh_ms": "0", "PYTHONWARNINGS": "ignore"}
    log = folder / "flower.log"
    with log.open("w") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT, env=env)
    results: dict[str, Any] = json.loads((folder / "flower.json").read_text())
    ids = site_ids()
    vectors, counts = dict(zip(ids, updates, strict=True)), dict(zip(ids, examples, strict=True))
    for name, (_, gone_at, in_sum, _) in SCENARIOS.items():
        path = folder / f"agg-{name}.npy"
        if path.exists():
            summed = [s for i, s in enumerate(ids) if in_sum or i not in gone_at]
            alive = [s for i, s in enumerate(ids) if i not in gone_at]
            got = np.load(path).astype(np.float64)
            results[name]["max_abs_error"] = float(np.abs(got - exact_mean(vectors, counts, summed)).max())
            results[name]["max_abs_error_without_gone"] = float(np.abs(got - exact_mean(vectors, counts, alive)).max())
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=1_000_000, help="values per update in (a) and (c)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--flower", action="store_true", help="also run Flower's SecAggPlusWorkflow (c)")
    parser.add_argument("--skip-training", action="store_true", help="skip (b)")
    args = parser.parse_args()
    updates, examples = make_inputs(args.params)

    print(
        f"(a) Quorum SecAgg+ on {SITES} sites x {args.params:,} values (num_shares {NUM_SHARES}, threshold {THRESHOLD})"
    )
    quorum = run_scenarios(updates, examples)
    for name, result in quorum.items():
        error = f", max |error| {result['max_abs_error']:.2e}" if "max_abs_error" in result else ""
        print(f"  {name:<55} {result['result'][:90]}{error} ({result['s']:.2f}s)")
    protocol = time_protocol(updates, examples, args.repeats)
    for name, seconds in protocol.items():
        print(f"  {name:<55} {seconds:.2f}s per round")

    if not args.skip_training:
        rounds = time_rounds(args.repeats)
        print(
            f"(b) one round at {SITES} sites x {rounds['params']:,} parameters, with training "
            f"(median of {args.repeats})"
        )
        for name, seconds in rounds["median_s"].items():
            print(f"  {name:<10} {seconds:.2f}s   (runs: {', '.join(f'{t:.2f}' for t in rounds['times_s'][name])})")
        print(f"  masked / unmasked = {rounds['ratio']:.2f}x (target <= 1.5x)")

    if args.flower:
        with tempfile.TemporaryDirectory(prefix="quorum-flower-") as folder:
            flower = run_flower(updates, examples, Path(folder))
        print("(c) Flower 1.42 SecAggPlusWorkflow (simulation) on the same inputs; fit round = median of rounds 2-3")
        for name, result in flower.items():
            error = ""
            if "max_abs_error" in result:
                without = result["max_abs_error_without_gone"]
                error = (
                    f", max |error| {result['max_abs_error']:.2e} (against the mean without the gone: {without:.2e})"
                )
            outcome = "aggregated" if result["aggregated"] else f"no aggregate {result['error'][:60]}"
            seconds = result["fit_round_s"]
            timing = f"{seconds:.2f}s per fit round" if seconds is not None else "no round"
            print(f"  {name:<55} {outcome}{error} ({timing})")
        plain, secure = flower["unmasked fit round"]["fit_round_s"], flower["no dropout"]["fit_round_s"]
        if plain and secure:
            print(f"  Flower masked / unmasked fit round = {secure / plain:.2f}x (no training in these rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

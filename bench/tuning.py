"""Federated tuning benchmark: Quorum's in-process path against a plain torch loop, and aggregation cost.

The fixed workload: 8 sites x 5,000 rows x 32 float32 features (numpy seed 0; site i shifts its first
4 features by 0.25 * i; label = 1 if x @ w + 0.5 * noise > 0, w from seed 42), 20% held out per site;
MLP 32-64-64-1, SGD lr 0.05, batch 64, 1 local epoch, 10 rounds of FedAvg with every site, 1 thread.

(a) Quorum: ``quorum.tasks.training.train_local`` per site and ``quorum.tasks.aggregate.fedavg`` per round, the
    functions the LocalRunner's tasks call, run sequentially without Prefect.
    With ``--prefect``, also the site work as the runners call it on processed site folders:
    ``quorum.tasks.site.train_site`` sequentially (site split cached after its first read), then the real
    ``LocalRunner``
    inside a Prefect flow (starts a temporary Prefect server: slow to start, so it is opt-in), each run
    next to a run of (b), so their ratio is taken under the same machine load.
(b) Plain torch: the same rounds with state dicts, ``torch.randperm`` and in-place averaging.

Then FedAvg (and the robust rules) over 8 updates of 25M float32 parameters: throughput and peak
extra memory (tracemalloc, which sees numpy's buffers) as a multiple of one model.

    .venv/bin/python bench/tuning.py [--repeats 3] [--prefect] [--skip-aggregation]

Prints figures only; timings are never asserted.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import gc
import os
import shutil
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from quorum.configs.schema import FederationConfig
from quorum.tasks.aggregate import fedavg
from quorum.tasks.model import ScaledMLP, Weights, initial_weights
from quorum.tasks.training import LocalTrainingConfig, predict_scores, train_local

SITES, ROWS, FEATURES, SHIFTED, TEST_FRACTION = 8, 5_000, 32, 4, 0.2
HIDDEN = (64, 64)
LEARNING_RATE, BATCH, EPOCHS, ROUNDS = 0.05, 64, 1, 10
AGG_SITES, AGG_PARAMS = 8, 25_000_000
PREFECT_PATHS = ("plain torch loop", "train_site, sequential", "prefect LocalRunner", "prefect flow run, whole")

Split = tuple[NDArray[np.float32], NDArray[np.float32]]


def make_sites() -> list[tuple[Split, Split]]:
    rng = np.random.default_rng(0)
    w = np.random.default_rng(42).normal(size=FEATURES)
    sites = []
    for index in range(SITES):
        x = rng.normal(size=(ROWS, FEATURES))
        x[:, :SHIFTED] += 0.25 * index
        y = (x @ w + 0.5 * rng.normal(size=ROWS) > 0).astype(np.float32)
        x32 = x.astype(np.float32)
        cut = int(ROWS * (1 - TEST_FRACTION))
        sites.append(((x32[:cut], y[:cut]), (x32[cut:], y[cut:])))
    return sites


def site_seed(server_round: int, index: int) -> int:
    return server_round * 1_009 + index


# --- (a) Quorum's in-process path -------------------------------------------------------------------


def quorum_rounds(sites: list[tuple[Split, Split]]) -> Weights:
    weights = initial_weights(FEATURES, HIDDEN, np.zeros(FEATURES), np.ones(FEATURES), seed=0)
    for server_round in range(1, ROUNDS + 1):
        replies = []
        for index, (train, _) in enumerate(sites):
            config = LocalTrainingConfig(
                HIDDEN, 0.0, EPOCHS, BATCH, LEARNING_RATE, False, site_seed(server_round, index)
            )
            result = train_local(weights, *train, config)
            replies.append((result.weights, result.num_examples))
        weights = fedavg(replies)
    return weights


def quorum_accuracy(weights: Weights, sites: list[tuple[Split, Split]]) -> float:
    x = np.concatenate([test[0] for _, test in sites])
    y = np.concatenate([test[1] for _, test in sites])
    return float(np.mean((predict_scores(weights, x, HIDDEN) >= 0.5) == y))


# --- (b) plain torch ----------------------------------------------------------------------------------


def plain_rounds(
    sites: list[tuple[Split, Split]], after_round: Callable[[torch.nn.Module], None] | None = None
) -> torch.nn.Module:
    """FedAvg with state dicts, sites in turn; ``after_round`` sees the global model after each round."""
    torch.manual_seed(0)
    global_model = ScaledMLP(FEATURES, HIDDEN)
    tensors = [(torch.from_numpy(x), torch.from_numpy(y)) for (x, y), _ in sites]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for server_round in range(1, ROUNDS + 1):
        states, counts = [], []
        for index, (x, y) in enumerate(tensors):
            local = copy.deepcopy(global_model)
            optimizer = torch.optim.SGD(local.parameters(), lr=LEARNING_RATE)
            generator = torch.Generator().manual_seed(site_seed(server_round, index))
            local.train()
            for _ in range(EPOCHS):
                order = torch.randperm(len(x), generator=generator)
                for start in range(0, len(x), BATCH):
                    idx = order[start : start + BATCH]
                    optimizer.zero_grad()
                    loss_fn(local(x[idx]), y[idx]).backward()
                    optimizer.step()
            states.append(local.state_dict())
            counts.append(len(x))
        total = sum(counts)
        averaged = {
            key: sum(state[key] * (count / total) for state, count in zip(states, counts, strict=True))
            for key in states[0]
        }
        global_model.load_state_dict(averaged)
        if after_round is not None:
            after_round(global_model)
    return global_model


def plain_accuracy(model: torch.nn.Module, sites: list[tuple[Split, Split]]) -> float:
    x = torch.from_numpy(np.concatenate([test[0] for _, test in sites]))
    y = np.concatenate([test[1] for _, test in sites])
    model.eval()
    with torch.no_grad():
        scores = torch.sigmoid(model(x)).numpy()
    return float(np.mean((scores >= 0.5) == y))


# --- optional: the real LocalRunner under Prefect -----------------------------------------------------


@dataclass(frozen=True)
class Timed:
    """Wall and CPU seconds of each timed run, and the accuracy of the last run's model."""

    walls: tuple[float, ...]
    cpus: tuple[float, ...]
    accuracy: float


def prefect_rounds(sites: list[tuple[Split, Split]], repeats: int) -> dict[str, Timed]:
    """Wall time, CPU time and accuracy of the site work as the runners call it, on processed site folders.

    ``train_site`` sequentially (the site's parquet is read and its matrix built once, then cached; no Prefect),
    then the real ``LocalRunner`` inside a real Prefect flow, FedAvg between rounds, each run next to a run
    of the plain loop, so a ratio compares runs that met the same machine load. The flow's own figures are
    its 10 rounds as the flow body runs them, every task run included; the flow run's start and end are a
    cost per job, not per round (Prefect joins its heartbeat thread, which sleeps in 1 s steps, so a flow
    run ends on a heartbeat second), shown apart as the whole flow run. CPU counts this process and the
    Prefect server's, which records every task run while the training runs. Runs against a throw-away
    Prefect home and temporary server, so no real Prefect state is touched.
    """
    root = Path(tempfile.mkdtemp(prefix="quorum-bench-"))
    atexit.register(shutil.rmtree, root, True)  # registered first, so it runs after Prefect stops its server
    os.environ["PREFECT_HOME"] = str(root / "prefect")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ.pop("PREFECT_API_URL", None)
    from prefect import flow

    from quorum.flows.runners.local import LocalRunner
    from quorum.tasks.site import train_site

    config, site_ids = _site_folders(root, sites)
    start_weights = initial_weights(FEATURES, HIDDEN, np.zeros(FEATURES), np.ones(FEATURES), seed=0)

    def plain() -> tuple[float, float, float]:
        wall, cpu = time.perf_counter(), _cpu_s()
        model = plain_rounds(sites)
        wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
        return plain_accuracy(model, sites), wall, cpu

    def sequential() -> tuple[float, float, float]:
        weights, wall, cpu = start_weights, time.perf_counter(), _cpu_s()
        for server_round in range(1, ROUNDS + 1):
            updates = [train_site(config, s, weights, server_round) for s in site_ids]
            weights = fedavg([(u.weights, u.num_examples) for u in updates])
        wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
        return quorum_accuracy(weights, sites), wall, cpu

    @flow(name="bench-tune", validate_parameters=False)
    def bench_flow() -> tuple[Weights, float, float]:
        runner = LocalRunner(config)
        weights, wall, cpu = start_weights, time.perf_counter(), _cpu_s()
        for server_round in range(1, ROUNDS + 1):
            replies = runner.train(site_ids, weights, server_round)
            weights = fedavg([(u.weights, u.num_examples) for u in replies.values()])
        return weights, time.perf_counter() - wall, _cpu_s() - cpu

    sequential()  # warm-up: the parquet caches
    bench_flow()  # warm-up: the temporary Prefect server starts here
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in PREFECT_PATHS}
    for _ in range(repeats):
        runs["plain torch loop"].append(plain())
        runs["train_site, sequential"].append(sequential())
        wall, cpu = time.perf_counter(), _cpu_s()
        weights, rounds_wall, rounds_cpu = bench_flow()
        wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
        accuracy = quorum_accuracy(weights, sites)
        runs["prefect LocalRunner"].append((accuracy, rounds_wall, rounds_cpu))
        runs["prefect flow run, whole"].append((accuracy, wall, cpu))
    return {
        name: Timed(tuple(w for _, w, _ in timed), tuple(c for _, _, c in timed), timed[-1][0])
        for name, timed in runs.items()
    }


def _cpu_s() -> float:
    """CPU seconds of this process and its children alive now (the temporary Prefect server)."""
    import psutil

    me = psutil.Process()
    children = sum(sum(child.cpu_times()[:2]) for child in me.children(recursive=True))
    return time.process_time() + children


def _site_folders(root: Path, sites: list[tuple[Split, Split]]) -> tuple[FederationConfig, list[str]]:
    """Processed site folders as ``preprocess_site`` leaves them, and a federation config over them."""
    import pandas as pd

    from quorum.configs.schema import FederationConfig
    from quorum.tasks.site import TEST_FILE, TRAIN_FILE

    names = [f"f{i:02d}" for i in range(FEATURES)]
    site_ids = [f"site-{i}" for i in range(SITES)]
    for site_id, (train, test) in zip(site_ids, sites, strict=True):
        processed = root / site_id / "processed"
        processed.mkdir(parents=True)
        for name, (x, y) in ((TRAIN_FILE, train), (TEST_FILE, test)):
            frame = pd.DataFrame(x.astype(np.float64), columns=names)
            frame["label"] = y.astype("int8")
            frame["group"] = "all"
            frame.to_parquet(processed / name, index=False)
    config = FederationConfig.model_validate(
        {
            "name": "bench",
            "model_name": "bench-model",
            "seed": 0,  # train_site's seed formula then matches site_seed() above
            "state_dir": str(root / "state"),
            "features": {"numeric": names},
            "sites": {s: {"root": str(root / s)} for s in site_ids},
            "model": {"hidden_sizes": list(HIDDEN)},
            "training": {
                "rounds": ROUNDS,
                "local_epochs": EPOCHS,
                "batch_size": BATCH,
                "learning_rate": LEARNING_RATE,
                "positive_weight": "none",
            },
        }
    )
    return config, site_ids


# --- aggregation at scale ----------------------------------------------------------------------------


def big_updates() -> list[tuple[list[NDArray[np.float32]], int]]:
    rng = np.random.default_rng(1)
    shapes = [(5_000, 4_000), (4_000,), (1_000, 4_995), (1_000,)]  # 20M + 4k + 4.995M + 1k = 25M
    assert sum(int(np.prod(s)) for s in shapes) == AGG_PARAMS
    base = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    return [([layer + np.float32(0.01 * k) for layer in base], 1_000 + k) for k in range(AGG_SITES)]


def measure(work: Callable[[], object]) -> tuple[float, int]:
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    start = time.perf_counter()
    result = work()
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result
    return elapsed, peak - before


def aggregation_figures(rules: Sequence[str]) -> None:
    from quorum.tasks.strategies import aggregate

    replies = big_updates()
    model_bytes = AGG_PARAMS * 4
    read_gb = AGG_SITES * model_bytes / 1e9
    print(f"\naggregation: {AGG_SITES} updates x {AGG_PARAMS / 1e6:.0f}M float32 ({model_bytes / 1e6:.0f} MB each)")
    for rule in rules:

        def work(rule: str = rule) -> object:
            if rule == "fedavg":  # quorum.tasks.aggregate.fedavg itself, as the round loop calls it today
                return fedavg(replies)
            return aggregate(rule, replies, trim_fraction=0.125, num_byzantine=1, multi_krum_m=3)  # type: ignore[arg-type]

        elapsed, extra = measure(work)
        print(
            f"  {rule:<13} {elapsed:7.2f} s  {read_gb / elapsed:6.2f} GB/s read  "
            f"peak extra {extra / 1e6:7.0f} MB = {extra / model_bytes:4.2f}x one model (result included)"
        )


# --- main ----------------------------------------------------------------------------------------------


def training_figures(repeats: int, with_prefect: bool) -> None:
    sites = make_sites()
    print(
        f"workload: {SITES} sites x {ROWS} rows x {FEATURES} features, MLP {FEATURES}-"
        f"{'-'.join(map(str, HIDDEN))}-1, SGD lr {LEARNING_RATE}, batch {BATCH}, {EPOCHS} epoch, {ROUNDS} rounds"
    )
    quorum_times, plain_times, quorum_cpu, plain_cpu = [], [], [], []
    quorum_weights: Weights = []
    plain_model: torch.nn.Module | None = None
    warm = [sites[0]]
    quorum_rounds(warm)  # first-call costs (torch kernels, allocator) stay out of the timings
    plain_rounds(warm)
    for _ in range(repeats):  # interleaved so drift in machine load hits both paths alike
        start, cpu = time.perf_counter(), time.process_time()
        quorum_weights = quorum_rounds(sites)
        quorum_times.append(time.perf_counter() - start)
        quorum_cpu.append(time.process_time() - cpu)
        start, cpu = time.perf_counter(), time.process_time()
        plain_model = plain_rounds(sites)
        plain_times.append(time.perf_counter() - start)
        plain_cpu.append(time.process_time() - cpu)
    assert plain_model is not None
    quorum_s, plain_s = statistics.median(quorum_times), statistics.median(plain_times)
    quorum_c, plain_c = statistics.median(quorum_cpu), statistics.median(plain_cpu)
    print("  (wall: median and min of the runs; cpu: median process time, less sensitive to a busy machine)")
    print(f"  quorum in-process : wall {quorum_s:6.3f} s, min {min(quorum_times):6.3f} s, cpu {quorum_c:6.3f} s")
    print(f"  plain torch loop  : wall {plain_s:6.3f} s, min {min(plain_times):6.3f} s, cpu {plain_c:6.3f} s")
    print(
        f"  ratio quorum/plain: wall {quorum_s / plain_s:6.3f}x, min {min(quorum_times) / min(plain_times):6.3f}x, "
        f"cpu {quorum_c / plain_c:6.3f}x"
    )
    accuracies = quorum_accuracy(quorum_weights, sites), plain_accuracy(plain_model, sites)
    print(f"  accuracy quorum {accuracies[0]:.4f}, plain {accuracies[1]:.4f}")
    if with_prefect:
        prefect_figures(sites, repeats)


def prefect_figures(sites: list[tuple[Split, Split]], repeats: int) -> None:
    timed = prefect_rounds(sites, repeats)
    plain = timed["plain torch loop"]
    print("  on processed site folders, each run next to a plain one (ratio: median and best of the pairs;")
    print("  LocalRunner: its rounds inside the flow; cpu: this process and the Prefect server):")
    for name, path in timed.items():
        walls = [w / p for w, p in zip(path.walls, plain.walls, strict=True)]
        cpus = [c / p for c, p in zip(path.cpus, plain.cpus, strict=True)]
        print(
            f"  {name:<23}: wall {statistics.median(path.walls):6.3f} s = {statistics.median(walls):.2f}x plain "
            f"(best {min(walls):.2f}x), cpu {statistics.median(path.cpus):6.3f} s = {statistics.median(cpus):.2f}x "
            f"(best {min(cpus):.2f}x), accuracy {path.accuracy:.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each path")
    parser.add_argument("--prefect", action="store_true", help="also time the LocalRunner inside a Prefect flow")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-aggregation", action="store_true")
    parser.add_argument("--rules", default="fedavg,median,trimmed_mean,krum", help="rules timed at 25M parameters")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if not args.skip_training:
        training_figures(args.repeats, args.prefect)
    if not args.skip_aggregation:
        aggregation_figures([r for r in args.rules.split(",") if r])


if __name__ == "__main__":
    main()

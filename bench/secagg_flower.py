"""Flower's side of ``bench/secagg.py``: SecAggPlusWorkflow (flwr 1.42, simulation) on the same inputs.

Runs inside the separate ``.venv-flower`` (never the project's environment); ``bench/secagg.py --flower``
creates it and calls this script. Each client returns its fixed update from the inputs file with its
example count; a mod in front of ``secaggplus_mod`` makes the chosen clients fail at one protocol stage.
Writes, per scenario, the aggregate (``agg-<scenario>.npy``) and the fit rounds' times (``flower.json``).

    .venv-flower/bin/python bench/secagg_flower.py INPUTS.npz OUT_DIR --num-shares 7 --threshold 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, Message, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.simulation import run_simulation


class FixedUpdate(NumPyClient):
    def __init__(self, inputs: str, index: int) -> None:
        with np.load(inputs) as data:
            self.update = data[f"update_{index}"]
            self.examples = int(data["examples"][index])

    def fit(self, parameters: Any, config: Any) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        return [self.update], self.examples, {}


def client_app(inputs: str, drop_stage: str | None, dropped: set[int], masked: bool) -> ClientApp:
    def client_fn(context: Context) -> Any:
        return FixedUpdate(inputs, int(context.node_config["partition-id"])).to_client()

    def dropper(msg: Message, context: Context, call_next: Any) -> Message:
        configs = msg.content.config_records.get("secaggplus_configs")
        stage = None if configs is None else configs.get("stage")
        if stage == drop_stage and int(context.node_config["partition-id"]) in dropped:
            raise RuntimeError(f"dropped at {stage}")
        return call_next(msg, context)

    return ClientApp(client_fn=client_fn, mods=[dropper, secaggplus_mod] if masked else [])


def server_app(
    out: Path, scenario: str, size: int, masked: bool, shares: int, threshold: int, times: list[float]
) -> ServerApp:
    app = ServerApp()

    class Saving(FedAvg):
        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            aggregated, metrics = super().aggregate_fit(server_round, results, failures)
            if aggregated is not None:
                np.save(out / f"agg-{scenario}.npy", parameters_to_ndarrays(aggregated)[0])
            return aggregated, metrics

    inner = SecAggPlusWorkflow(shares, threshold, max_weight=1000.0) if masked else default_fit_workflow

    def timed_fit(grid: Grid, context: Any) -> None:
        started = time.perf_counter()
        inner(grid, context)
        times.append(time.perf_counter() - started)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        start = ndarrays_to_parameters([np.zeros(size, dtype=np.float32)])
        strategy = Saving(fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2, initial_parameters=start)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=ROUNDS), strategy=strategy)
        DefaultWorkflow(fit_workflow=timed_fit)(grid, legacy)

    return app


ROUNDS = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs")
    parser.add_argument("out")
    parser.add_argument("--num-shares", type=int, required=True)
    parser.add_argument("--threshold", type=int, required=True)
    parser.add_argument(
        "--scenarios", required=True, help='JSON: {"name": {"stage": S, "dropped": [i], "masked": true}}'
    )
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.INFO if os.environ.get("FLOWER_VERBOSE") else logging.WARNING)
    out = Path(args.out)
    with np.load(args.inputs) as data:
        sites, size = len(data["examples"]), int(data["update_0"].size)
    scenarios = json.loads(args.scenarios)
    results: dict[str, Any] = {}
    for name, spec in scenarios.items():
        times: list[float] = []
        stage, dropped = spec.get("stage"), set(spec.get("dropped", []))
        masked = spec.get("masked", True)
        started = time.perf_counter()
        try:
            run_simulation(
                server_app=server_app(out, name, size, masked, args.num_shares, args.threshold, times),
                client_app=client_app(args.inputs, stage, dropped, masked),
                num_supernodes=sites,
                backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
            )
            error = ""
        except Exception as exc:  # a halted protocol is a result here, not a crash of the benchmark
            error = repr(exc)
        rounds = times[1:] or times
        results[name] = {
            "fit_round_s": statistics.median(rounds) if rounds else None,
            "fit_round_times_s": times,
            "whole_s": time.perf_counter() - started,
            "aggregated": (out / f"agg-{name}.npy").exists(),
            "error": error,
        }
        print(f"flower {name}: {results[name]}", file=sys.stderr, flush=True)
    (out / "flower.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

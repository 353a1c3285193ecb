"""Preprocessing benchmark: one site's contract check and preprocessing against pandas reading the file alone.

The fixed workload: one site, 1,000,000 rows x 30 columns in one CSV (numpy seed 0): ``record_id``
(unique int), ``label`` (0/1, about 20% positive), 20 float features (``num_00``..``num_19``; two of
them with 1% nulls), 6 categorical features (``cat_0``..``cat_5``, 3-6 values each) and 2 PII text
columns (``name``, ``email``) that the site drops (or hashes, with ``--pii-mode hash``).

Each measurement runs in a fresh Python process, so peak memory is that step's own:
(a) pandas alone: ``pd.read_csv(path)``;
(b) contract: what ``preprocess`` does up to the verdict: ``quorum.tasks.data.read_table``, PII removal and
    ``quorum.tasks.contract.validate_contract`` (Great Expectations, the full result written at the site);
(c) preprocess: ``quorum.tasks.site.preprocess_site``: (b), then cleaning, the stratified split, feature
    moments, the Parquet outputs and their DVC hash.
Time is the step alone (imports, including Great Expectations', are reported separately); peak memory is
the process's peak resident set (``resource.getrusage``), imports included. The data is generated in a
subprocess too: Linux carries a process's resident high-water mark across ``exec``, so a parent that
had held the table would lend its peak to every step measured after it.

    .venv/bin/python bench/preprocess.py [--rows 1000000] [--pii-mode drop|hash] [--keep DIR]

Prints figures only; timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
NUMERIC, CATEGORICAL = 20, 6
DOMAINS = {f"cat_{i}": [f"v{j}" for j in range(3 + i % 4)] for i in range(CATEGORICAL)}
STEPS = ("pandas", "contract", "preprocess")


def write_site(folder: Path, rows: int, pii_mode: str) -> Path:
    """The site's raw CSV and a one-site federation config around it; returns the config path."""
    import pandas as pd

    rng = np.random.default_rng(0)
    columns: dict[str, Any] = {"record_id": np.arange(rows), "label": (rng.random(rows) < 0.2).astype(int)}
    for index in range(NUMERIC):
        values = rng.normal(50 + index, 10 + index, rows).round(3)
        if index < 2:
            values[rng.random(rows) < 0.01] = np.nan
        columns[f"num_{index:02d}"] = values
    for name, domain in DOMAINS.items():
        columns[name] = rng.choice(domain, rows)
    columns["name"] = np.char.add("person-", rng.integers(0, 10**9, rows).astype(str))
    columns["email"] = np.char.add(columns["name"], "@example.org")
    raw = folder / "site" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(columns).to_csv(raw / "train.csv", index=False)
    config = {
        "name": "bench",
        "model_name": "bench-model",
        "state_dir": "state",
        "features": {"numeric": [f"num_{i:02d}" for i in range(NUMERIC)], "categorical": DOMAINS},
        "contract": {
            "min_rows": 1,
            "max_rows": 10 * rows,
            "numeric_ranges": {f"num_{i:02d}": [-1000, 1000] for i in range(NUMERIC)},
            "label_rate": [0.1, 0.3],
        },
        "sites": {
            "site": {
                "root": "site",
                "target": "label",
                "id_column": "record_id",
                "pii_columns": ["name", "email"],
                "pii_mode": pii_mode,
                "current": None,
            }
        },
    }
    path = folder / "federation.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def child(step: str, config_path: Path) -> dict[str, float]:
    """One step in this (fresh) process: import time, step time, peak RSS."""
    started = time.perf_counter()
    import pandas as pd

    if step != "pandas":
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        import great_expectations  # noqa: F401  (its import cost is reported apart from the step)

        from quorum.configs.schema import load_federation
        from quorum.tasks.contract import validate_contract
        from quorum.tasks.data import read_table
        from quorum.tasks.pii import protect_pii
        from quorum.tasks.site import preprocess_site

        config = load_federation(config_path)
        site = config.site("site")
    imported = time.perf_counter()
    if step == "pandas":
        frame = pd.read_csv(config_path.parent / "site" / "raw" / "train.csv")
        rows = len(frame)
    elif step == "contract":
        raw = protect_pii(read_table(site.data_path, site.id), site)
        summary = validate_contract(raw, config.features, config.contract, site, report_dir=site.reports_dir)
        assert summary.passed, summary.describe()
        rows = len(raw)
    else:
        fingerprint = preprocess_site(config, "site")
        assert fingerprint.usable, fingerprint.contract.describe()
        rows = fingerprint.raw_rows
    done = time.perf_counter()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"import_s": imported - started, "step_s": done - imported, "peak_mib": peak_kib / 1024, "rows": rows}


def measure(step: str, config_path: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--child", step, "--config", str(config_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if result.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{result.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--pii-mode", choices=("drop", "hash"), default="drop")
    parser.add_argument("--keep", type=Path, help="write the site here and keep it (default: a temp dir)")
    parser.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.config)))
        return
    if args.write:
        write_site(args.write, args.rows, args.pii_mode)
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="quorum-bench-preprocess-"))
    try:
        started = time.perf_counter()
        config_path = folder / "federation.yaml"
        subprocess.run(
            [sys.executable, __file__, "--write", str(folder), "--rows", str(args.rows), "--pii-mode", args.pii_mode],
            cwd=ROOT,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        csv = folder / "site" / "raw" / "train.csv"
        print(
            f"site: {args.rows:,} rows x 30 columns, {csv.stat().st_size / 2**20:.0f} MiB CSV "
            f"(written in {time.perf_counter() - started:.1f} s); pii_mode {args.pii_mode}"
        )
        results = {step: measure(step, config_path) for step in STEPS}
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    base = results["pandas"]
    print(f"{'step':<12} {'time s':>8} {'x pandas':>9} {'peak MiB':>9} {'x pandas':>9} {'imports s':>10}")
    for step, figures in results.items():
        print(
            f"{step:<12} {figures['step_s']:>8.1f} {figures['step_s'] / base['step_s']:>9.1f} "
            f"{figures['peak_mib']:>9.0f} {figures['peak_mib'] / base['peak_mib']:>9.1f} {figures['import_s']:>10.1f}"
        )


if __name__ == "__main__":
    main()

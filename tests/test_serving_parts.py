"""The pure parts of serving: raw rows to the training matrix, refusals, routing maths, the ONNX graph."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from quorum.configs.errors import ConfigError
from quorum.configs.schema import FeatureConfig, SiteConfig, load_federation
from quorum.tasks.features import to_matrix
from quorum.tasks.routing import RoutingCounts, agreements, route_request
from quorum.tasks.serving_rows import (
    RowRefused,
    batch_matrix,
    check_columns,
    parse_body,
    row_schema,
    rows_to_matrix,
)

FEATURES = FeatureConfig(numeric=("age", "income"), categorical={"channel": ("online", "branch")})
SITE = SiteConfig(
    id="alpha",
    root=Path("/nowhere"),
    target="churned",
    id_column="customer_id",
    pii_columns=("email", "phone"),
    protected_attribute="gender",
)


def _rows() -> list[dict[str, object]]:
    return [
        {"age": 40, "income": 1200.5, "channel": "online"},
        {"age": None, "income": "980", "channel": "branch"},  # null age, income as text (as a CSV gives it)
        {"age": 33.0, "income": "n/a", "channel": "fax"},  # unreadable number, category outside the domain
        {"age": 51, "income": 700, "channel": None},  # null category matches no value
    ]


def _clean_rows() -> list[dict[str, object]]:
    return [
        {"age": 40, "income": 1200.5, "channel": "online"},
        {"age": None, "income": "980", "channel": "branch"},  # null, and a number as text: both still numeric
        {"age": True, "income": 700, "channel": 3},  # a bool counts as 1; a number is no category
    ]


def _body(rows: list[dict[str, object]], shape: str) -> bytes:
    if shape == "rows":
        return json.dumps({"rows": rows}).encode()
    return json.dumps({"columns": {column: [row[column] for row in rows] for column in rows[0]}}).encode()


@pytest.mark.parametrize("shape", ["rows", "columns"])
@pytest.mark.parametrize("make_rows", [_rows, _clean_rows], ids=["unreadable-values", "numeric-values"])
def test_rows_become_the_matrix_training_builds_from_the_same_values(
    make_rows: Callable[[], list[dict[str, object]]], shape: str
) -> None:
    import pandas as pd

    rows = make_rows()
    frame = pd.DataFrame(
        {
            "age": pd.to_numeric(pd.Series([r["age"] for r in rows], dtype=object), errors="coerce"),
            "income": pd.to_numeric(pd.Series([r["income"] for r in rows], dtype=object), errors="coerce"),
            "channel": pd.Series([r["channel"] for r in rows], dtype=object).astype("string"),
        }
    )
    expected = to_matrix(frame, FEATURES)  # nulls filled by the column median of these rows
    fill = (float(np.nanmedian(frame["age"])), float(np.nanmedian(frame["income"])))

    matrix = batch_matrix(parse_body(_body(rows, shape), max_rows=10), row_schema(FEATURES, SITE, fill))

    np.testing.assert_array_equal(matrix, expected)
    np.testing.assert_array_equal(rows_to_matrix(rows, row_schema(FEATURES, SITE, fill)), expected)


@pytest.mark.parametrize(
    ("row", "status", "named"),
    [
        ({"age": 1, "income": 2, "channel": "online", "email": "x@y.z"}, 422, "email"),  # declared PII
        ({"age": 1, "income": 2, "channel": "online", "favourite": "blue"}, 422, "favourite"),  # unknown column
        ({"age": 1, "channel": "online"}, 422, "income"),  # a feature missing
    ],
)
def test_bad_rows_are_refused_naming_the_column_never_the_value(
    row: dict[str, object], status: int, named: str
) -> None:
    schema = row_schema(FEATURES, SITE, (0.0, 0.0))

    with pytest.raises(RowRefused) as info:
        check_columns([row], schema)

    assert info.value.status == status
    assert named in info.value.message and info.value.fix
    for value in row.values():
        if isinstance(value, str) and value not in ("online",):
            assert value not in info.value.render()


@pytest.mark.parametrize(
    ("columns", "named"),
    [
        ({"age": [1], "income": [2], "channel": ["online"], "phone": ["555"]}, "phone"),  # declared PII
        ({"age": [1], "income": [2], "channel": ["online"], "favourite": ["blue"]}, "favourite"),  # unknown
        ({"age": [1], "channel": ["online"]}, "income"),  # a feature missing
    ],
)
def test_bad_columns_are_refused_naming_the_column_never_the_value(
    columns: dict[str, list[object]], named: str
) -> None:
    schema = row_schema(FEATURES, SITE, (0.0, 0.0))
    batch = parse_body(json.dumps({"columns": columns}).encode(), max_rows=10)

    with pytest.raises(RowRefused) as info:
        batch_matrix(batch, schema)

    assert info.value.status == 422
    assert named in info.value.message and info.value.fix
    assert "555" not in info.value.render() and "blue" not in info.value.render()


def test_id_target_and_protected_columns_are_accepted_but_unused() -> None:
    schema = row_schema(FEATURES, SITE, (0.0, 0.0))
    row = {"age": 1, "income": 2, "channel": "online", "customer_id": 7, "churned": 0, "gender": "f"}

    check_columns([row], schema)

    assert rows_to_matrix([row], schema).tolist() == [[1.0, 2.0, 1.0, 0.0]]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),  # not JSON
        (b'{"row": {}}', 400),  # no "rows"
        (b'{"rows": []}', 400),  # empty
        (b'{"rows": [1, 2]}', 400),  # rows that are not objects
        (b'{"rows": [{}, {}, {}]}', 413),  # more than max_rows
        (b'{"columns": {"age": [1, 2, 3]}}', 413),  # more than max_rows, as columns
        (b'{"columns": {"age": [1, 2], "income": [1]}}', 400),  # columns of different lengths
        (b'{"columns": {"age": []}}', 400),  # no row at all
        (b'{"columns": {"age": 1}}', 400),  # a column that is not a list
        (b'{"columns": []}', 400),  # columns that are not an object
        (b"\xff\xfe", 400),  # not even text
    ],
)
def test_malformed_bodies_are_refused_with_their_status(body: bytes, status: int) -> None:
    with pytest.raises(RowRefused) as info:
        parse_body(body, max_rows=2)

    assert info.value.status == status


def test_canary_sends_the_configured_share_and_nothing_without_a_candidate() -> None:
    routes = [route_request(n, "canary", 10.0, candidate_ready=True) for n in range(10_000)]
    share = routes.count("candidate") / len(routes)

    assert abs(share - 0.10) < 0.001
    assert {route_request(n, "canary", 10.0, candidate_ready=False) for n in range(100)} == {"champion"}
    assert {route_request(n, "shadow", 0.0, candidate_ready=True) for n in range(100)} == {"champion"}


def test_shadow_counts_keep_only_rows_and_agreements() -> None:
    champion = np.array([0.1, 0.7, 0.6, 0.2])
    candidate = np.array([0.2, 0.8, 0.4, 0.9])

    counts = RoutingCounts().answered("champion", 4).shadowed(4, agreements(champion, candidate)).refused()

    assert counts.shadow_agreement_rate == 0.5
    assert counts.to_dict()["champion_rows"] == 4 and counts.refused_requests == 1
    assert RoutingCounts.from_dict(counts.to_dict()) == counts
    assert RoutingCounts().shadow_agreement_rate is None


def test_onnx_graph_and_int8_variant_answer_like_the_torch_model(tmp_path: Path) -> None:
    import torch

    from quorum.lineage.onnx_export import export_variants
    from quorum.tasks.model import build_model, get_weights, set_weights
    from quorum.tasks.scoring import load_scorer

    torch.manual_seed(0)
    model = build_model(6, (8, 4))
    weights = get_weights(model)
    weights[0] = np.linspace(1, 2, 6, dtype=np.float32)  # scaling buffers the graph must apply
    weights[1] = np.linspace(0.5, 3, 6, dtype=np.float32)
    set_weights(model, weights)
    model.eval()
    features = np.random.default_rng(1).normal(1.5, 2.0, size=(64, 6)).astype(np.float32)

    variants = export_variants(tmp_path, weights, [f"f{i}" for i in range(6)])
    fp32 = load_scorer(tmp_path, "onnx", (8, 4)).predict(features)
    int8 = load_scorer(tmp_path, "onnx-int8", (8, 4)).predict(features)
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(features))).double().numpy()

    assert variants.int8.stat().st_size > 0
    np.testing.assert_allclose(fp32, expected, atol=1e-6)
    np.testing.assert_allclose(int8, expected, atol=0.05)


def _config(root: Path, serving: dict[str, object]) -> Path:
    config = {
        "name": "f",
        "model_name": "m",
        "sites": {"alpha": {"root": "a"}, "beta": {"root": "b"}},
        "features": {"numeric": ["age"]},
        "serving": serving,
    }
    path = root / f"federation-{len(list(root.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_serving_config_names_known_sites_and_sane_policies(tmp_path: Path) -> None:
    good = _config(tmp_path, {"port": 8700, "routing": {"alpha": {"mode": "canary", "canary_percent": 5}}})
    assert load_federation(good).serving.policy("alpha").canary_percent == 5
    assert load_federation(good).serving.policy("beta").mode == "champion"
    assert [load_federation(good).serving_port(s) for s in ("alpha", "beta")] == [8700, 8701]  # one port per site
    declared = load_federation(_config(tmp_path, {"ports": {"alpha": 9100}, "start_with_up": True}))
    assert [declared.serving_port(s) for s in ("alpha", "beta")] == [9100, 8611] and declared.serving.start_with_up


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        ({"routing": {"alpha": {"mode": "canary"}}}, "canary_percent > 0"),  # a canary of nothing
        ({"routing": {"alpha": {"mode": "shadow", "canary_percent": 5}}}, "only to mode canary"),  # stray percent
        ({"routing": {"nowhere": {"mode": "shadow"}}}, "serving.routing names unknown site(s): nowhere"),  # typo
        ({"runtime": "tensorrt"}, "serving.runtime"),  # a runtime Quorum does not have
        ({"ports": {"nowhere": 9000}}, "serving.ports names unknown site(s): nowhere"),  # typo
        ({"ports": {"beta": 8610}}, "serving port 8610 of site beta is also the serving port of site alpha"),  # clash
        ({"ports": {"alpha": 4200}}, "is also deployment.prefect_port"),  # the Prefect server's port
        ({"port": 65535}, "serving port of site beta is 65536, outside 1024-65535"),  # the next site runs out
        ({"start_with_up": "sometimes"}, "serving.start_with_up"),  # not a yes or no
    ],
)
def test_bad_serving_config_is_refused_naming_the_key(tmp_path: Path, serving: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_federation(_config(tmp_path, serving))

    assert message in info.value.message


def test_the_onnx_runtime_path_serves_without_importing_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    from quorum.lineage.onnx_export import export_variants

    rng = np.random.default_rng(0)
    weights = [np.zeros(3, np.float32), np.ones(3, np.float32)]
    weights += [rng.normal(size=(4, 3)).astype(np.float32), np.zeros(4, np.float32)]
    weights += [rng.normal(size=(1, 4)).astype(np.float32), np.zeros(1, np.float32)]
    export_variants(tmp_path, weights, ["a", "b", "c"])
    script = (
        "import sys, numpy as np\n"
        "import quorum.flows.serving\n"
        "from quorum.tasks.scoring import load_scorer\n"
        f"scorer = load_scorer(__import__('pathlib').Path({str(tmp_path)!r}), 'auto', (4,))\n"
        "print(scorer.runtime, scorer.predict(np.ones((2, 3), np.float32)).shape, 'torch' in sys.modules)\n"
    )

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600)

    assert result.stdout.split() == ["onnx", "(2,)", "False"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_quorum_serve_stops_on_ctrl_c_and_sigterm_even_when_its_parent_ignored_sigint(signum: int) -> None:
    from quorum.cli.serve_command import stop_signals

    # a process started with `&` from a non-interactive shell inherits SIGINT ignored
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt, match=signal.Signals(signum).name), stop_signals():
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler interrupts the sleep at once
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # what the caller had is back
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, before)

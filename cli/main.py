"""The ``quorum`` command line.

Start-up stays fast: argument parsing and config validation import nothing heavy; Prefect, MLflow,
torch and the data tools load only inside the command that needs them. Every expected failure is a
``QuorumError`` caught once here and shown as a headline, the problem and the fix.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from quorum.configs.errors import QuorumError

DEFAULT_CONFIG = "configs/federation.yaml"
DEFAULT_GOVERNANCE = "configs/governance.yaml"


def _add_config(parser: argparse.ArgumentParser, governance: bool = False) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"federation config (default {DEFAULT_CONFIG})")
    if governance:
        parser.add_argument(
            "--governance", default=DEFAULT_GOVERNANCE, help=f"governance config (default {DEFAULT_GOVERNANCE})"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quorum", description="Run the federated model lifecycle across sites.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Prefect's own log lines")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="generate the demo federation and run the whole lifecycle")
    _add_config(demo, governance=True)
    demo.set_defaults(handler=_cmd_demo)

    run = commands.add_parser("run", help="run the whole lifecycle on a federation config")
    _add_config(run, governance=True)
    run.add_argument(
        "--approve-with",
        action="append",
        default=[],
        metavar="KEY",
        help="sign the new version with this approver private key (repeatable)",
    )
    run.add_argument("--job-id", help="name the job (default: generated)")
    run.add_argument(
        "--runner",
        choices=("local", "pool"),
        default="local",
        help="local: sites in this process (default); pool: each site on its own work pool (quorum up)",
    )
    run.add_argument("--resume", metavar="JOB", help="continue JOB from its last completed round")
    run.add_argument(
        "--force",
        action="store_true",
        help="train even when every site's data and the config equal the champion's (default: stop after preprocess)",
    )
    run.set_defaults(handler=_cmd_run)

    up = commands.add_parser("up", help="start Prefect and MLflow servers, the pools, deployments and site workers")
    _add_config(up, governance=True)
    up.add_argument("--prefect-file", default="infra/prefect.yaml", help="deployments to deploy")
    up.add_argument(
        "--database",
        metavar="URL",
        help="Prefect server database, e.g. postgresql://user:pass@host:5432/prefect "
        "(default: deployment.prefect_database, else SQLite under the state folder)",
    )
    up.add_argument(
        "--no-site-workers",
        action="store_true",
        help="start no site worker here: each site runs `quorum worker --site ID` on its own host",
    )
    up.set_defaults(handler=_cmd_up)
    worker = commands.add_parser("worker", help="run one site's Prefect worker here, in the foreground")
    _add_config(worker)
    worker.add_argument("--site", required=True, help="the site id whose pool this worker serves")
    worker.add_argument("--api-url", help="Prefect API (default: deployment.prefect_api_url, else the local server)")
    worker.set_defaults(handler=_cmd_worker)
    for name, handler, text in (
        ("status", _cmd_status, "show servers, pools, workers and the last runs"),
        ("down", _cmd_down, "stop exactly the processes `quorum up` started"),
    ):
        sub = commands.add_parser(name, help=text)
        _add_config(sub)
        sub.set_defaults(handler=handler)

    infra = commands.add_parser("infra", help="deployment files").add_subparsers(dest="infra_command", required=True)
    render = infra.add_parser("render", help="write infra/prefect.yaml for a federation config")
    _add_config(render, governance=True)
    render.add_argument("--out", default="infra/prefect.yaml")
    render.add_argument(
        "--no-demo-keys",
        action="store_true",
        help="do not let the scheduled lifecycle sign with the demo approver keys",
    )
    render.set_defaults(handler=_cmd_render)

    data = commands.add_parser("data", help="site data helpers").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the deterministic demo data into each site's folder")
    _add_config(synth)
    synth.add_argument("--overwrite", action="store_true", help="replace existing files")
    synth.set_defaults(handler=_cmd_synth)
    push = data.add_parser("push", help="push one site's processed data to that site's own DVC remote")
    _add_config(push)
    push.add_argument("--site", required=True, help="site id")
    push.set_defaults(handler=_cmd_data_push)
    example = data.add_parser("example", help="write the site CSVs of a real example dataset (no download)")
    example.add_argument("name", choices=("breast-cancer",), help="the example")
    example.add_argument(
        "--out",
        default="data/examples/breast-cancer",
        help="folder for <site>/raw/*.csv (default data/examples/breast-cancer, what configs/examples/ expects)",
    )
    example.set_defaults(handler=_cmd_data_example)

    contract = commands.add_parser("contract", help="data contracts").add_subparsers(
        dest="contract_command", required=True
    )
    init = contract.add_parser("init", help="profile a site's data and write a first contract to review and commit")
    _add_config(init)
    init.add_argument("--site", required=True, help="the site whose snapshot is profiled")
    init.add_argument("--out", help="contract file (default: contracts/<federation name>.yaml beside the config)")
    init.add_argument(
        "--margin", type=float, default=0.1, help="widen observed numeric ranges by this fraction of the span"
    )
    init.add_argument("--overwrite", action="store_true", help="replace an existing contract file")
    init.set_defaults(handler=_cmd_contract_init)

    lineage = commands.add_parser("lineage", help="print what a registered model version was made from")
    lineage.add_argument("model", help="registered model name")
    lineage.add_argument("--version", required=True, help="model version number")
    _add_config(lineage)
    lineage.set_defaults(handler=_cmd_lineage)

    prep = commands.add_parser("preprocess", help="run one site's preprocessing (what `dvc repro` calls)")
    _add_config(prep)
    prep.add_argument("--site", required=True, help="site id")
    prep.set_defaults(handler=_cmd_preprocess)

    keys = commands.add_parser("keys", help="approver keys").add_subparsers(dest="keys_command", required=True)
    gen = keys.add_parser("generate", help="create an approver key pair (private key mode 0600)")
    gen.add_argument("--name", required=True, help="approver name")
    gen.add_argument("--out", default=".quorum/keys", help="folder for NAME.key and NAME.pub")
    gen.add_argument("--config", help="federation config whose audit log records the new key (default: no record)")
    gen.set_defaults(handler=_cmd_keys_generate)

    approve = commands.add_parser("approve", help="sign a registered model version; promote it once the quorum is met")
    approve.add_argument("model", help="registered model name")
    approve.add_argument("--version", required=True, help="model version number")
    approve.add_argument("--key", required=True, help="your approver private key")
    _add_config(approve, governance=True)
    approve.set_defaults(handler=_cmd_approve)

    rollback = commands.add_parser("rollback", help="make the previous signed champion current again")
    rollback.add_argument("model", help="registered model name")
    rollback.add_argument("--to", dest="to_version", metavar="VERSION", help="an earlier champion (default: the last)")
    rollback.add_argument("--key", required=True, help="private key of an approver allowed to roll back")
    rollback.add_argument("--reason", default="", help="why, for the audit log")
    _add_config(rollback, governance=True)
    rollback.set_defaults(handler=_cmd_rollback)

    deploy = commands.add_parser("deploy", help="verify the champion at a site, load it and record what the site runs")
    deploy.add_argument("--site", required=True, help="site id")
    _add_config(deploy, governance=True)
    deploy.set_defaults(handler=_cmd_deploy)

    serve = commands.add_parser("serve", help="answer inference requests at a site with the verified champion")
    serve.add_argument("--site", required=True, help="site id")
    serve.add_argument("--port", type=int, help="port on 127.0.0.1 (default: serving.port in the config)")
    serve.add_argument(
        "--runtime",
        choices=("auto", "onnx", "onnx-int8", "torch"),
        help="model runtime (default: serving.runtime; auto prefers the signed ONNX variant)",
    )
    _add_config(serve, governance=True)
    serve.set_defaults(handler=_cmd_serve)

    drift = commands.add_parser(
        "drift-check", help="decide on retraining from every site's newest drift summary (--trigger starts it)"
    )
    _add_config(drift, governance=True)
    drift.add_argument(
        "--trigger", action="store_true", help="start the lifecycle deployment when drift calls for it (quorum up)"
    )
    drift.add_argument(
        "--check-sites", action="store_true", help="run every site's drift check here first (sites' data on this host)"
    )
    drift.set_defaults(handler=_cmd_drift_check)

    audit = commands.add_parser("audit", help="the governance audit log").add_subparsers(
        dest="audit_command", required=True
    )
    for name, handler, text in (
        ("show", _cmd_audit_show, "print the entries"),
        ("verify", _cmd_audit_verify, "check the hash chain"),
    ):
        sub = audit.add_parser(name, help=text)
        _add_config(sub)
        sub.set_defaults(handler=handler)

    ui = commands.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for this federation's tracking store")
    _add_config(ui)
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(handler=_cmd_ui)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except QuorumError as error:
        print(error.render(), file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted: work already saved is kept; run the command again to continue", file=sys.stderr)
        return 130


def _cmd_demo(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.demo(Path(args.config), Path(args.governance), verbose=args.verbose)


def _cmd_run(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.run(
        Path(args.config),
        Path(args.governance),
        args.approve_with,
        args.job_id,
        args.verbose,
        args.runner,
        args.resume,
        force=args.force,
    )


def _cmd_up(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.up(
        Path(args.config), Path(args.governance), Path(args.prefect_file), args.database, not args.no_site_workers
    )


def _cmd_worker(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.worker(Path(args.config), args.site, args.api_url)


def _cmd_status(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.status(Path(args.config))


def _cmd_down(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.down(Path(args.config))


def _cmd_render(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.render_infra(Path(args.config), Path(args.governance), Path(args.out), not args.no_demo_keys)


def _cmd_synth(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.synth(Path(args.config), overwrite=args.overwrite)


def _cmd_data_push(args: argparse.Namespace) -> int:
    from quorum.cli import data_commands

    return data_commands.data_push(Path(args.config), args.site)


def _cmd_data_example(args: argparse.Namespace) -> int:
    from quorum.cli import data_commands

    return data_commands.data_example(args.name, Path(args.out))


def _cmd_contract_init(args: argparse.Namespace) -> int:
    from quorum.cli import data_commands

    out = Path(args.out) if args.out else None
    return data_commands.contract_init(Path(args.config), args.site, out, args.margin, args.overwrite)


def _cmd_lineage(args: argparse.Namespace) -> int:
    from quorum.cli import data_commands

    return data_commands.lineage(Path(args.config), args.model, args.version)


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.preprocess_one(Path(args.config), args.site)


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.keys_generate(args.name, Path(args.out), Path(args.config) if args.config else None)


def _cmd_approve(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.approve(Path(args.config), Path(args.governance), args.model, args.version, Path(args.key))


def _cmd_rollback(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.rollback(
        Path(args.config), Path(args.governance), args.model, Path(args.key), args.to_version, args.reason, args.verbose
    )


def _cmd_deploy(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.deploy(Path(args.config), Path(args.governance), args.site, args.verbose)


def _cmd_serve(args: argparse.Namespace) -> int:
    from quorum.cli.serve_command import serve

    return serve(Path(args.config), Path(args.governance), args.site, args.port, args.runtime)


def _cmd_drift_check(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.drift_check(
        Path(args.config),
        Path(args.governance),
        trigger=args.trigger,
        check_sites=args.check_sites,
        verbose=args.verbose,
    )


def _cmd_audit_show(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.audit_show(Path(args.config))


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.audit_verify(Path(args.config))


def _cmd_ui(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.ui(Path(args.config), args.port)


if __name__ == "__main__":
    sys.exit(main())

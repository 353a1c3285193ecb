"""The ``quorum`` command line.

Start-up stays fast: argument parsing and config validation import nothing heavy; Prefect, MLflow,
torch and the data tools load only inside the command that needs them. Every expected failure is a
``QuorumError`` caught once here and shown as a headline, the problem and the fix. Anything else is a
bug or an outside tool failing in a way nobody foresaw: one guard around every command turns it into
one ``error:`` line that names a log file holding the traceback (``-v`` prints the traceback too), so
no command ever ends in a bare traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from quorum.cli.heap import freeze_for_exit
from quorum.configs.errors import QuorumError, ToolError

LAUNCHED_S = time.perf_counter()  # when the command started, to report how long it took to reach its first stage
LOG_DIR_ENV = "QUORUM_LOG_DIR"  # where tracebacks of unexpected failures go (default: <temp dir>/quorum-logs)
UNEXPECTED_EXIT = 70  # EX_SOFTWARE: not the user's input, a failure Quorum did not foresee

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
    _add_config(worker, governance=True)
    worker.add_argument("--site", required=True, help="the site id whose pool this worker serves")
    worker.add_argument("--api-url", help="Prefect API (default: deployment.prefect_api_url, else the local server)")
    worker.set_defaults(handler=_cmd_worker)
    status = commands.add_parser(
        "status", help="show servers, pools, workers, the last runs, stale sites and the signed champion"
    )
    _add_config(status, governance=True)
    status.set_defaults(handler=_cmd_status)
    down = commands.add_parser("down", help="stop exactly the processes `quorum up` started")
    _add_config(down)
    down.set_defaults(handler=_cmd_down)

    infra = commands.add_parser("infra", help="deployment files").add_subparsers(dest="infra_command", required=True)
    render = infra.add_parser(
        "render", help="write infra/prefect.yaml for a federation config (it names no private key)"
    )
    _add_config(render, governance=True)
    render.add_argument("--out", default="infra/prefect.yaml")
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
    _add_config(lineage, governance=True)
    lineage.set_defaults(handler=_cmd_lineage)

    prep = commands.add_parser("preprocess", help="run one site's preprocessing (what `dvc repro` calls)")
    _add_config(prep)
    prep.add_argument("--site", required=True, help="site id")
    prep.set_defaults(handler=_cmd_preprocess)

    placement = commands.add_parser("placement", help="where a job's work ran").add_subparsers(
        dest="placement_command", required=True
    )
    explain = placement.add_parser("explain", help="round by round: which sites were asked, answered, and why")
    explain.add_argument("job", help="the job id `quorum run` printed")
    _add_config(explain)
    explain.set_defaults(handler=_cmd_placement_explain)

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
    rollback.add_argument(
        "--key",
        required=True,
        action="append",
        help="an approver's private key; once per approver, the governance quorum in all, at least one of them "
        "allowed to roll back",
    )
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
    show = audit.add_parser("show", help="print the entries")
    _add_config(show)
    show.set_defaults(handler=_cmd_audit_show)
    verify = audit.add_parser(
        "verify", help="check the hash chain against the newest signed checkpoint and every site's witnessed head"
    )
    _add_config(verify, governance=True)
    verify.set_defaults(handler=_cmd_audit_verify)

    governance = commands.add_parser(
        "governance", help="change governance with the current quorum's signatures (TUF-style rotation)"
    ).add_subparsers(dest="governance_command", required=True)
    gov_sign = governance.add_parser("sign", help="sign a proposed next governance file with your approver key")
    gov_sign.add_argument("new", help="the proposed governance file (version: current + 1)")
    gov_sign.add_argument("--key", required=True, help="your approver private key (an approver of the current file)")
    gov_sign.add_argument("--governance", default=DEFAULT_GOVERNANCE, help="the current governance file")
    gov_sign.set_defaults(handler=_cmd_governance_sign)
    gov_adopt = governance.add_parser(
        "adopt", help="replace the governance file with the proposed one once the current quorum signed it"
    )
    gov_adopt.add_argument("new", help="the signed proposed governance file")
    gov_adopt.add_argument("--governance", default=DEFAULT_GOVERNANCE, help="the current governance file")
    gov_adopt.set_defaults(handler=_cmd_governance_adopt)
    gov_verify = governance.add_parser(
        "verify", help="verify the governance chain from version 1 (and from each site's accepted version)"
    )
    gov_verify.add_argument("--governance", default=DEFAULT_GOVERNANCE, help="the governance file")
    gov_verify.add_argument("--config", help="also check from the version each site of this federation accepted")
    gov_verify.set_defaults(handler=_cmd_governance_verify)

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
        return _report(error)
    except KeyboardInterrupt:
        print("interrupted: work already saved is kept; run the command again to continue", file=sys.stderr)
        return 130
    except Exception as error:  # the one guard: anything unforeseen becomes an error line and a log file
        known = known_failure(error)
        if known is not None:
            return _report(known)
        return _unexpected(error, list(sys.argv[1:] if argv is None else argv), args.verbose)


def _report(error: QuorumError) -> int:
    print(error.render(), file=sys.stderr)
    return error.exit_code


def known_failure(error: Exception) -> QuorumError | None:
    """Outside tools' own errors that have a known cause and fix, as the ``QuorumError`` a user should see."""
    if isinstance(error, RuntimeError) and "ephemeral Prefect API server" in str(error):
        return ToolError(
            "Prefect's temporary API server did not start in time",
            fix="run the command again (a first run also creates the database); on a busy machine allow more "
            "time with PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=600, or start the servers with `quorum up`",
        )
    return None


def log_dir() -> Path:
    return Path(os.environ.get(LOG_DIR_ENV) or Path(tempfile.gettempdir()) / "quorum-logs")


def _unexpected(error: Exception, argv: list[str], verbose: bool) -> int:
    """One ``error:`` line naming the log file with the traceback; ``-v`` prints the traceback as well."""
    trace = "".join(traceback.format_exception(error))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    log = log_dir() / f"quorum-{stamp}-{os.getpid()}.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"quorum {' '.join(argv)}\n\n{trace}", encoding="utf-8")
        where = f"the traceback is in {log}"
    except OSError as exc:
        where = f"the traceback could not be saved ({exc}); run with -v to see it"
    if verbose:
        print(trace, file=sys.stderr, end="")
    headline = (str(error).strip().splitlines() or [""])[0][:300]
    print(f"error: unexpected {type(error).__name__}: {headline}; {where}", file=sys.stderr)
    print(
        "  fix: run the command again with -v (quorum -v ...) to see the traceback here; "
        "if it persists, report it with the log file",
        file=sys.stderr,
    )
    return UNEXPECTED_EXIT


def _cmd_demo(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.demo(Path(args.config), Path(args.governance), verbose=args.verbose, launched_s=LAUNCHED_S)


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
        launched_s=LAUNCHED_S,
    )


def _cmd_up(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.up(
        Path(args.config), Path(args.governance), Path(args.prefect_file), args.database, not args.no_site_workers
    )


def _cmd_worker(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.worker(Path(args.config), Path(args.governance), args.site, args.api_url)


def _cmd_status(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.status(Path(args.config), Path(args.governance))


def _cmd_down(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.down(Path(args.config))


def _cmd_render(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.render_infra(Path(args.config), Path(args.governance), Path(args.out))


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

    return data_commands.lineage(Path(args.config), args.model, args.version, Path(args.governance))


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.preprocess_one(Path(args.config), args.site)


def _cmd_placement_explain(args: argparse.Namespace) -> int:
    from quorum.cli import placement_commands

    return placement_commands.explain(Path(args.config), args.job)


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.keys_generate(args.name, Path(args.out), Path(args.config) if args.config else None)


def _cmd_approve(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.approve(Path(args.config), Path(args.governance), args.model, args.version, Path(args.key))


def _cmd_rollback(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.rollback(
        Path(args.config),
        Path(args.governance),
        args.model,
        [Path(key) for key in args.key],
        args.to_version,
        args.reason,
        args.verbose,
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

    return commands.audit_verify(Path(args.config), Path(args.governance))


def _cmd_governance_sign(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.governance_sign(Path(args.governance), Path(args.new), Path(args.key))


def _cmd_governance_adopt(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.governance_adopt(Path(args.governance), Path(args.new))


def _cmd_governance_verify(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.governance_verify(Path(args.governance), Path(args.config) if args.config else None)


def _cmd_ui(args: argparse.Namespace) -> int:
    from quorum.cli import commands

    return commands.ui(Path(args.config), args.port)


def console() -> int:
    """The installed ``quorum`` script: ``main``, then exit without collecting what the command imported.

    Only here, where the process ends: ``main`` itself is also called by tests in their own process.
    """
    code = main()
    freeze_for_exit()
    return code


if __name__ == "__main__":
    sys.exit(console())

"""The ``orchestrator`` command.

``run``, ``validate`` and ``states`` work on this host without a daemon;
``serve`` runs the daemon and ``submit``, ``status``, ``watch``, ``cancel``,
``set``, ``switchover``, ``settle``, ``list`` and ``devices`` talk to it over
its REST API (``orchestrator.cli_client``);
``handover`` lends it a device over its handover socket, as a VMM does
(``orchestrator.handover``), and holds it until stopped;
``openapi`` prints or renews the committed OpenAPI document.

``main(argv)`` returns the exit status instead of exiting, so tests call it
directly.  One table of exit statuses (``ExitStatus``, in ``orchestrator.cli_output``
with what the commands print) serves every command;
``run`` and ``watch`` exit with their migration's outcome, the others with 0
when they did what was asked::

    0  succeeded     the migration succeeded; any other command did what was asked
    1  rolled back   it ended after pre-copy began; the VM runs on the source as before
    2  bad input     usage, an invalid plan or settings (nothing was recorded), or
                     another 4xx answer of the API (an unknown id, a conflict)
    3  failed        an operator is needed, and only then
    4  refused       it ended before pre-copy began; every device is as it was
    5  unavailable   the daemon could not be reached, went away, answered with a
                     5xx, or (serve) could not start

The daemon being out of reach has a status of its own, so a script never
takes it for what a migration did.  Bad input never shows a traceback: every
problem is printed with its field path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import stat
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

import trio

from orchestrator import __version__, logs
from orchestrator.cli_client import WatchBar, add_client_commands, client_command
from orchestrator.cli_output import (
    OUTCOME_EXIT_STATUS,
    ExitStatus,
    ProgressTerminal,
    exit_status,
    exit_status_help,
    help_layout,
    print_report,
    progress_line,
)
from orchestrator.engine import Migration
from orchestrator.errors import PlanError
from orchestrator.plan import parse_plan
from orchestrator.report import MigrationReport
from orchestrator.resolve import ResolvedPlan, load_plan, refuse_handles, resolve
from orchestrator.states import MigrationFlags, transition_table_markdown

if TYPE_CHECKING:
    from orchestrator.settings import SettingsError

__all__ = [
    "OUTCOME_EXIT_STATUS",
    "ExitStatus",
    "WatchBar",
    "build_parser",
    "exit_status",
    "exit_status_help",
    "main",
    "print_report",
    "progress_line",
]


DEFAULT_PLAN = "default_plan.toml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator",
        **help_layout(
            "Live-migrate the passthrough devices of a VM through the Linux device migration flow."
        ),
    )
    parser.add_argument("--version", action="version", version=f"orchestrator {__version__}")
    parser.add_argument(
        "--log-level",
        choices=logs.LEVELS,
        default=None,
        help=(
            "log level on stderr (default: warning on a terminal, where progress is shown; "
            "info otherwise)"
        ),
    )
    parser.add_argument(
        "--log-format",
        choices=("console", "json"),
        default=None,
        help="log format on stderr (default: console; for serve, the settings' log.format)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="migrate the devices of a plan on this host", **help_layout())
    run.add_argument(
        "plan",
        nargs="?",
        type=Path,
        help="plan file, .toml or .json (default: the embedded example plan)",
    )
    run.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    run.add_argument("--no-progress", action="store_true", help="no progress line on a terminal")

    validate = sub.add_parser(
        "validate", help="check a plan and print every problem", **help_layout()
    )
    validate.add_argument("plan", type=Path)
    validate.add_argument("--json", action="store_true", help="print the result as JSON")

    states = sub.add_parser(
        "states", help="print the device state model's arcs for a capability set", **help_layout()
    )
    states.add_argument(
        "--flags",
        default="STOP_COPY,P2P,PRE_COPY",
        help="comma-separated migration flags (STOP_COPY is always implied)",
    )
    _add_daemon_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    interactive = sys.stderr.isatty()
    level = args.log_level or ("warning" if interactive else "info")
    logs.configure(level, args.log_format or "console")
    try:
        if args.command == "run":
            return _run(args, interactive)
        if args.command == "validate":
            return _validate(args)
        if args.command == "states":
            return _states(args)
        return _daemon_commands(args)
    except PlanError as exc:
        _print_problems(exc, sys.stderr)
        return ExitStatus.BAD_INPUT
    except BrokenPipeError:
        # The reader went away (`| head`): not an error worth a traceback.
        # Point stdout at devnull so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitStatus.SUCCEEDED


def _load(path: Path | None) -> ResolvedPlan:
    if path is not None:
        return load_plan(path)
    text = resources.files("orchestrator").joinpath(DEFAULT_PLAN).read_text("utf-8")
    import tomllib

    return resolve(parse_plan(tomllib.loads(text)))


def _validate(args: argparse.Namespace) -> int:
    try:
        resolved = load_plan(args.plan)
    except PlanError as exc:
        if args.json:
            problems = [{"path": p.path, "message": p.message} for p in exc.problems]
            print(json.dumps({"valid": False, "problems": problems}, indent=2))
        else:
            _print_problems(exc, sys.stdout)
        return ExitStatus.BAD_INPUT
    plan = resolved.plan
    order = resolved.switchover_order()
    if args.json:
        print(
            json.dumps(
                {
                    "valid": True,
                    "vm": plan.vm,
                    "devices": len(plan.devices),
                    "order": order.as_dict() if order is not None else None,
                }
            )
        )
    else:
        print(f"{args.plan}: valid: VM {plan.vm!r}, {len(plan.devices)} device(s)")
        if order is None:
            print("order: known once the devices are opened (their capabilities come from them)")
        else:
            for line in order.lines():
                print(f"order: {line}")
    return ExitStatus.SUCCEEDED


def _states(args: argparse.Namespace) -> int:
    flags = MigrationFlags.STOP_COPY
    for word in filter(None, (w.strip().upper() for w in args.flags.split(","))):
        try:
            flags |= MigrationFlags[word]
        except KeyError:
            names = ", ".join(f.name or "" for f in MigrationFlags)
            raise PlanError(f"--flags: unknown flag {word!r} (known: {names})") from None
    print(transition_table_markdown(flags))
    return ExitStatus.SUCCEEDED


def _run(args: argparse.Namespace, interactive: bool) -> int:
    resolved = _load(args.plan)
    refuse_handles(resolved)  # no daemon here, so no handed-over devices
    migration = Migration(resolved)
    terminal = None
    if interactive and not args.no_progress:
        # Log lines go above the progress line, never onto it.
        terminal = ProgressTerminal(sys.stderr)
        level = args.log_level or "warning"
        logs.configure(level, args.log_format or "console", stream=cast(TextIO, terminal))
    trio.run(_run_migration, migration, terminal)
    report = migration.report
    assert report is not None
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print_summary(report, resolved, sys.stdout)
    return exit_status(report.outcome)


async def _run_migration(migration: Migration, terminal: ProgressTerminal | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_signal, migration)
        if terminal is not None:
            nursery.start_soon(_show_progress, migration, terminal)
        await migration.run()
        nursery.cancel_scope.cancel()


async def _cancel_on_signal(migration: Migration) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if migration.cancel(f"cancelled by {name}"):
                print(f"\n{name}: rolling back ...", file=sys.stderr)
            else:
                print(
                    f"\n{name}: past the commit point, completing on the destination",
                    file=sys.stderr,
                )


async def _show_progress(migration: Migration, terminal: ProgressTerminal) -> None:
    try:
        while True:
            terminal.show(progress_line(migration.progress()))
            await trio.sleep(0.1)
    finally:
        terminal.clear()


def print_summary(report: MigrationReport, resolved: ResolvedPlan, out: TextIO) -> None:
    print_report(report, out, downtime_limit_ms=resolved.plan.downtime_limit_ms)


def _print_problems(exc: PlanError, out: TextIO) -> None:
    print(f"invalid plan: {len(exc.problems)} problem(s)", file=out)
    for problem in exc.problems:
        print(f"  {problem}", file=out)


# -- the daemon and its clients ------------------------------------------------------


def _add_daemon_commands(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the daemon: the REST API over the migration service",
        **help_layout(
            "Settings come from --config (or $ORCHESTRATOR_CONFIG), then the environment "
            "(ORCHESTRATOR_STATE_DIR, ORCHESTRATOR_API__TCP, ...), then these flags."
        ),
    )
    serve.add_argument("--config", type=Path, help="settings file (TOML)")
    serve.add_argument("--state-dir", type=Path, help="directory of the journal")
    serve.add_argument("--unix-socket", type=Path, help="the API's Unix socket")
    serve.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP")
    serve.add_argument("--token-file", type=Path, help="file of accepted bearer tokens")
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate for the TCP listener")
    serve.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    serve.add_argument("--max-body-bytes", help="largest request body accepted")
    serve.add_argument("--shutdown-grace-s", help="time running migrations get on SIGTERM")
    # Also accepted after the command; SUPPRESS keeps a value given before it.
    serve.add_argument("--log-level", choices=logs.LEVELS, default=argparse.SUPPRESS)
    serve.add_argument("--log-format", choices=("console", "json"), default=argparse.SUPPRESS)

    openapi = sub.add_parser(
        "openapi", help="print the REST API's OpenAPI document", **help_layout()
    )
    openapi.add_argument(
        "--write", action="store_true", help="renew the committed orchestrator/api/openapi.json"
    )

    add_client_commands(sub)

    handover = sub.add_parser(
        "handover",
        help="hand a device over to the daemon, as a VMM does, and hold it until stopped",
        **help_layout(
            "Opens DEVICE (or takes --fd), registers --vm on the daemon's handover socket, "
            "hands the descriptor over and prints its handle (VM/NAME), which plans name as "
            'handle = "VM/NAME".  The daemon keeps it while this command runs: until '
            "SIGINT, SIGTERM or end of input."
        ),
    )
    handover.add_argument("device", nargs="?", type=Path, help="device file to open (O_RDWR)")
    handover.add_argument("--fd", type=int, help="hand over this inherited descriptor instead")
    handover.add_argument("--vm", required=True, help="the VM the device belongs to")
    handover.add_argument("--name", required=True, help="the device's name in plans")
    handover.add_argument("--kind", required=True, choices=("vfio", "vhost_vdpa"))
    handover.add_argument(
        "--socket", type=Path, help="the handover socket (default: the settings' one)"
    )
    handover.add_argument("--config", type=Path, help="the daemon's settings file")


def _daemon_commands(args: argparse.Namespace) -> int:
    from orchestrator.settings import SettingsError

    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "openapi":
            return _openapi(args)
        if args.command == "handover":
            return _handover(args)
        return client_command(args)
    except SettingsError as exc:
        _print_settings_problems(exc, sys.stderr)
        return ExitStatus.BAD_INPUT


def _serve(args: argparse.Namespace) -> int:
    from orchestrator import daemon
    from orchestrator.errors import OrchestratorError
    from orchestrator.settings import Settings, SettingsError

    flags = {
        "state_dir": args.state_dir,
        "shutdown_grace_s": args.shutdown_grace_s,
        "api": {
            "unix_socket": args.unix_socket,
            "tcp": args.tcp,
            "token_file": args.token_file,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            "max_body_bytes": args.max_body_bytes,
        },
        "log": {"level": args.log_level, "format": args.log_format},
    }
    settings = Settings.load(args.config, flags)
    logs.configure(settings.log.level, settings.log.format)
    failures: list[OrchestratorError] = []
    try:
        trio.run(daemon.serve, settings)
    except* OrchestratorError as group:
        failures.extend(_leaves(group))
    for failure in failures:
        if isinstance(failure, SettingsError):
            _print_settings_problems(failure, sys.stderr)
        else:
            print(f"orchestrator serve: {failure}", file=sys.stderr)
    if any(isinstance(f, SettingsError) for f in failures):
        return ExitStatus.BAD_INPUT
    return ExitStatus.UNAVAILABLE if failures else ExitStatus.SUCCEEDED


def _handover(args: argparse.Namespace) -> int:
    from orchestrator.handover import HandoverClient, HandoverError
    from orchestrator.settings import Settings

    if (args.device is None) == (args.fd is None):
        print("orchestrator handover: give a DEVICE path or --fd, not both", file=sys.stderr)
        return ExitStatus.BAD_INPUT
    path = args.socket or Settings.load(args.config).handover_socket
    if path is None:
        print(
            "orchestrator handover: no handover socket: give --socket, or set handover_socket "
            "in the daemon's settings",
            file=sys.stderr,
        )
        return ExitStatus.BAD_INPUT
    fd = args.fd
    if fd is None:
        try:
            fd = os.open(args.device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            print(
                f"orchestrator handover: cannot open {args.device}: {exc.strerror}", file=sys.stderr
            )
            return ExitStatus.BAD_INPUT
    try:
        with HandoverClient(path) as client:
            client.register(args.vm)
            handle = client.hand_over(args.vm, args.name, args.kind, fd)
            os.close(fd)  # the daemon holds its own copy now
            fd = None
            print(handle, flush=True)
            return _hold(client.sock)
    except HandoverError as exc:
        print(f"orchestrator handover: refused: {exc.code}: {exc.message}", file=sys.stderr)
        return ExitStatus.BAD_INPUT
    except OSError as exc:
        print(f"orchestrator handover: {path}: {exc.strerror or exc}", file=sys.stderr)
        return ExitStatus.UNAVAILABLE
    finally:
        if fd is not None and args.fd is None:
            os.close(fd)


def _hold(sock: Any) -> int:
    """Wait for SIGINT, SIGTERM or the end of a piped stdin (0), or the daemon closing (1)."""
    import selectors

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, "daemon")
    with contextlib.suppress(ValueError, OSError):
        # A pipe or a terminal ends the hold when it ends; /dev/null would at once.
        mode = os.fstat(sys.stdin.fileno()).st_mode
        if stat.S_ISFIFO(mode) or sys.stdin.isatty():
            selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
    try:
        while True:
            for key, _ in selector.select():
                if key.data == "daemon":
                    print(
                        "orchestrator handover: the daemon closed the connection", file=sys.stderr
                    )
                    return ExitStatus.UNAVAILABLE
                if not os.read(sys.stdin.fileno(), 4096):
                    return ExitStatus.SUCCEEDED
    except KeyboardInterrupt:
        return ExitStatus.SUCCEEDED
    finally:
        selector.close()


def _leaves(group: BaseExceptionGroup[Any]) -> list[Any]:
    out: list[Any] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _openapi(args: argparse.Namespace) -> int:
    from orchestrator.api import render_openapi, write_openapi

    if args.write:
        print(f"wrote {write_openapi()}")
    else:
        sys.stdout.write(render_openapi())
    return ExitStatus.SUCCEEDED


def _print_settings_problems(exc: SettingsError, out: TextIO) -> None:
    print(f"invalid settings: {len(exc.problems)} problem(s)", file=out)
    for problem in exc.problems:
        print(f"  {problem}", file=out)

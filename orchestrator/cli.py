"""The ``orchestrator`` command.

``run``, ``validate`` and ``states`` work on this host without a daemon;
``serve`` runs the daemon and ``submit``, ``status``, ``watch``, ``cancel``,
``set``, ``switchover`` and ``settle`` talk to it over its REST API
(``orchestrator.api.client``);
``handover`` lends it a device over its handover socket, as a VMM does
(``orchestrator.handover``), and holds it until stopped;
``openapi`` prints or renews the committed OpenAPI document.

``main(argv)`` returns the exit status instead of exiting, so tests call it
directly.  One table of exit statuses (``ExitStatus``) serves every command;
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
import enum
import json
import os
import signal
import stat
import sys
import textwrap
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import trio

from orchestrator import __version__, logs
from orchestrator.engine import Migration
from orchestrator.errors import PlanError
from orchestrator.plan import parse_plan
from orchestrator.report import OUTCOME_MEANINGS, Control, MigrationReport, Outcome
from orchestrator.resolve import ResolvedPlan, load_plan, refuse_handles, resolve
from orchestrator.states import MigrationFlags, transition_table_markdown

if TYPE_CHECKING:
    # The daemon's modules (FastAPI, httpx) load only for the commands that need them.
    from orchestrator.api.client import Client
    from orchestrator.api.models import MigrationEvent
    from orchestrator.service import MigrationStatus
    from orchestrator.settings import SettingsError


class ExitStatus(enum.IntEnum):
    """What ``main`` returns, whatever the command: the module docstring's table."""

    SUCCEEDED = 0
    ROLLED_BACK = 1
    BAD_INPUT = 2
    FAILED = 3
    REFUSED = 4
    UNAVAILABLE = 5

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " ")

    @property
    def meaning(self) -> str:
        return _EXIT_MEANINGS[self]


_EXIT_MEANINGS: Final[Mapping[ExitStatus, str]] = {
    ExitStatus.SUCCEEDED: "the migration succeeded; any other command did what was asked",
    ExitStatus.ROLLED_BACK: OUTCOME_MEANINGS["rolled_back"],
    ExitStatus.BAD_INPUT: (
        "usage, an invalid plan or settings (nothing was recorded; the API answers 422), "
        "or another 4xx answer of the API (an unknown id, a conflict)"
    ),
    ExitStatus.FAILED: OUTCOME_MEANINGS["failed"],
    ExitStatus.REFUSED: OUTCOME_MEANINGS["refused"],
    ExitStatus.UNAVAILABLE: (
        "the daemon could not be reached, went away, answered with a 5xx, or (serve) "
        "could not start"
    ),
}

#: The exit status of a command that followed a migration to its end.
OUTCOME_EXIT_STATUS: Final[Mapping[Outcome, ExitStatus]] = {
    "succeeded": ExitStatus.SUCCEEDED,
    "refused": ExitStatus.REFUSED,
    "rolled_back": ExitStatus.ROLLED_BACK,
    "failed": ExitStatus.FAILED,
}


def exit_status(outcome: Outcome) -> ExitStatus:
    """What ``run`` and ``watch`` exit with once the migration has ended so."""
    return OUTCOME_EXIT_STATUS[outcome]


def exit_status_help(width: int = 79) -> str:
    """The exit status table as ``--help`` shows it after every command's options."""
    lines = ["exit status (every command):"]
    for status in ExitStatus:
        head = f"  {status.value}  {status.label}: "
        lines.append(
            textwrap.fill(status.meaning, width, initial_indent=head, subsequent_indent=" " * 5)
        )
    return "\n".join(lines)


DEFAULT_PLAN = "default_plan.toml"


def _help_layout(description: str | None = None) -> dict[str, Any]:
    """A parser's description, wrapped here, and the exit status table after its
    options: argparse prints both as given, so the table keeps its lines."""
    return {
        "formatter_class": argparse.RawDescriptionHelpFormatter,
        "description": None if description is None else textwrap.fill(description, 79),
        "epilog": exit_status_help(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator",
        **_help_layout(
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

    run = sub.add_parser("run", help="migrate the devices of a plan on this host", **_help_layout())
    run.add_argument(
        "plan",
        nargs="?",
        type=Path,
        help="plan file, .toml or .json (default: the embedded example plan)",
    )
    run.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    run.add_argument("--no-progress", action="store_true", help="no progress line on a terminal")

    validate = sub.add_parser(
        "validate", help="check a plan and print every problem", **_help_layout()
    )
    validate.add_argument("plan", type=Path)
    validate.add_argument("--json", action="store_true", help="print the result as JSON")

    states = sub.add_parser(
        "states", help="print the device state model's arcs for a capability set", **_help_layout()
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
    show_progress = interactive and not args.no_progress
    trio.run(_run_migration, migration, show_progress)
    report = migration.report
    assert report is not None
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print_summary(report, resolved, sys.stdout)
    return exit_status(report.outcome)


async def _run_migration(migration: Migration, show_progress: bool) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_signal, migration)
        if show_progress:
            nursery.start_soon(_show_progress, migration, sys.stderr)
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


async def _show_progress(migration: Migration, out: TextIO) -> None:
    try:
        while True:
            out.write("\r\x1b[K" + progress_line(migration.progress()))
            out.flush()
            await trio.sleep(0.1)
    finally:
        out.write("\r\x1b[K")
        out.flush()


def progress_line(progress: dict[str, Any]) -> str:
    sent = sum(progress["bytes_sent"].values())
    parts = [f"[{progress['phase']}]", f"sent {_mib(sent)}"]
    if progress["precopy_round"]:
        parts.append(f"round {progress['precopy_round']}")
    if progress["remaining_bytes"] is not None:
        parts.append(f"remaining {_mib(progress['remaining_bytes'])}")
    if progress["expected_downtime_ms"] is not None:
        parts.append(f"expected downtime {progress['expected_downtime_ms']:.1f} ms")
    return "  ".join(parts)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def print_summary(report: MigrationReport, resolved: ResolvedPlan, out: TextIO) -> None:
    print_report(report, out, downtime_limit_ms=resolved.plan.downtime_limit_ms)


def print_report(
    report: MigrationReport, out: TextIO, *, downtime_limit_ms: float | None = None
) -> None:
    downtime = "n/a" if report.downtime_ms is None else f"{report.downtime_ms:.1f} ms"
    limit = "" if downtime_limit_ms is None else f" (limit {downtime_limit_ms:g} ms)"
    print(
        f"VM {report.vm}: {report.outcome} in {report.duration_ms:.1f} ms, "
        f"downtime {downtime}{limit}",
        file=out,
    )
    pre = report.precopy
    if pre.rounds:
        print(
            f"pre-copy: {pre.rounds} round(s), {pre.decision or 'no decision'}: {pre.reason}",
            file=out,
        )
    if report.phases:
        print("phases: " + ", ".join(f"{k} {v:.1f} ms" for k, v in report.phases.items()), file=out)
    for name, barrier in report.barriers.items():
        print(
            f"barrier {name}: {barrier.members} member(s), "
            f"longest wait {barrier.wait_ms_max:.1f} ms",
            file=out,
        )
    header = ("device", "backend", "source", "destination", "pre-copy", "stop-copy", "state")
    rows = [header]
    for d in report.devices:
        check = "-"
        if report.outcome == "succeeded" and d.source_digest and d.destination_digest:
            check = "identical" if d.source_digest == d.destination_digest else "DIFFERS"
        rows.append(
            (
                d.name,
                d.backend,
                d.source_state + (" (reset)" if d.source_reset else ""),
                d.destination_state + (" (reset)" if d.destination_reset else ""),
                _mib(d.bytes_precopy),
                _mib(d.bytes_stopcopy),
                check,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )
    for note in report.notes:
        print(f"note: {note}", file=out)
    if report.error is not None:
        e = report.error
        where = ", ".join(
            x
            for x in (e.side and f"{e.side} device {e.device!r}", e.phase and f"phase {e.phase}")
            if x
        )
        print(f"error ({e.kind}{', ' + where if where else ''}): {e.message}", file=out)


def _print_problems(exc: PlanError, out: TextIO) -> None:
    print(f"invalid plan: {len(exc.problems)} problem(s)", file=out)
    for problem in exc.problems:
        print(f"  {problem}", file=out)


# -- the daemon and its clients ------------------------------------------------------


def _add_daemon_commands(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the daemon: the REST API over the migration service",
        **_help_layout(
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
        "openapi", help="print the REST API's OpenAPI document", **_help_layout()
    )
    openapi.add_argument(
        "--write", action="store_true", help="renew the committed orchestrator/api/openapi.json"
    )

    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection to the daemon")
    group.add_argument(
        "--config", type=Path, help="the daemon's settings file: its socket and token file"
    )
    group.add_argument(
        "--url", help="the daemon over TCP, http(s)://HOST:PORT (default: its Unix socket)"
    )
    group.add_argument("--socket", type=Path, help="the daemon's Unix socket")
    group.add_argument(
        "--token-file", type=Path, help="bearer token file (default: the settings' one)"
    )
    group.add_argument("--cacert", type=Path, help="CA certificate to verify an https --url")
    group.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer")

    submit = sub.add_parser(
        "submit",
        parents=[connection],
        help="start a migration (0 once the daemon accepted it; follow it with watch)",
        **_help_layout(),
    )
    submit.add_argument("plan", type=Path, help="plan file, .toml or .json")
    submit.add_argument(
        "--idempotency-key", help="submitting again with this key returns the first migration"
    )
    submit.add_argument("--json", action="store_true", help="print the status as JSON")

    def one_migration(name: str, summary: str, description: str | None = None) -> Any:
        """A verb on one migration by id, which prints its status (--json: as JSON)."""
        verb = sub.add_parser(name, parents=[connection], help=summary, **_help_layout(description))
        verb.add_argument("id")
        verb.add_argument("--json", action="store_true", help="print the status as JSON")
        return verb

    one_migration("status", "show a migration")

    watch = sub.add_parser(
        "watch",
        parents=[connection],
        help="follow a migration to its end and exit with its outcome",
        **_help_layout(),
    )
    watch.add_argument("id")
    watch.add_argument("--json", action="store_true", help="print the final status as JSON")
    watch.add_argument("--no-progress", action="store_true", help="no progress bar")

    one_migration("cancel", "roll a migration back")
    control = one_migration(
        "set",
        "change the downtime limit or bandwidth cap of a migration in pre-copy",
        "As virsh migrate-setmaxdowntime and migrate-setspeed: accepted before the "
        "migration's pre-copy decision (in prepare it applies from the first round), "
        "refused after it.  The cap applies at once, the limit at the next decision.",
    )
    control.add_argument("--downtime-limit-ms", type=float, help="the new downtime limit, in ms")
    control.add_argument(
        "--bandwidth-limit-mib-s",
        type=_cap,
        default=argparse.SUPPRESS,
        metavar="N|none",
        help="the new cap on the data channel, in MiB/s; none removes it",
    )
    one_migration(
        "switchover",
        "force the switchover of a migration in pre-copy, now",
        "As virsh migrate --force-complete: the pre-copy round in flight ends and the "
        "migration switches over, whether it converged or not (follow it with watch); "
        "with downtime_policy strict, a window predicted over the limit rolls back "
        "instead of pausing the VM past it.  Asked again while it goes on, the same "
        "answer; refused after a pre-copy decision it did not force.",
    )

    settle = sub.add_parser(
        "settle",
        parents=[connection],
        help="decide for a migration in doubt (its peer daemon out of reach)",
        **_help_layout(
            "A migration between two hosts is in doubt when one daemon waits on the "
            "other and cannot reach it: the source after its commit (how did the "
            "destination end? succeeded or failed), the destination after its vote "
            "(commit or abort?).  Refused while the peer can still be asked, unless "
            "--force: the peer's own answer is the one that counts."
        ),
    )
    settle.add_argument("id")
    settle.add_argument(
        "verdict",
        choices=("succeeded", "failed", "commit", "abort"),
        help="succeeded or failed (a migration this daemon runs); commit or abort (one "
        "it receives)",
    )
    settle.add_argument("--force", action="store_true", help="settle even if the peer answers")
    settle.add_argument("--json", action="store_true", help="print the status as JSON")

    handover = sub.add_parser(
        "handover",
        help="hand a device over to the daemon, as a VMM does, and hold it until stopped",
        **_help_layout(
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


def _cap(text: str) -> float | None:
    """A bandwidth cap on the command line: MiB/s, or none."""
    if text.strip().lower() in ("none", "unlimited"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of MiB/s, nor none: {text!r}") from None


def _daemon_commands(args: argparse.Namespace) -> int:
    from orchestrator.settings import SettingsError

    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "openapi":
            return _openapi(args)
        if args.command == "handover":
            return _handover(args)
        return _client_command(args)
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


def _client_command(args: argparse.Namespace) -> int:
    from orchestrator.api.client import ApiError, Unreachable

    try:
        with _client(args) as client:
            if args.command == "submit":
                return _submit(client, args)
            if args.command == "status":
                _print_status(client.status(args.id), args.json, sys.stdout)
                return ExitStatus.SUCCEEDED
            if args.command == "watch":
                return _watch(client, args)
            if args.command in ("set", "switchover"):
                return _control(client, args)
            if args.command == "settle":
                answer = client.settle(args.id, args.verdict, force=args.force)
                if args.json:
                    print(json.dumps(answer, indent=2))
                else:
                    print(f"migration {args.id}: settled ({args.verdict})")
                return ExitStatus.SUCCEEDED
            status = client.cancel(args.id)
            if args.json:
                print(status.model_dump_json(indent=2))
            else:
                print(f"migration {status.id}: cancelled, rolling back")
            return ExitStatus.SUCCEEDED
    except Unreachable as exc:
        print(f"orchestrator {args.command}: {exc}", file=sys.stderr)
        return ExitStatus.UNAVAILABLE
    except ApiError as exc:
        print(
            f"orchestrator {args.command}: {exc.message} ({exc.status} {exc.kind})", file=sys.stderr
        )
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return ExitStatus.BAD_INPUT if 400 <= exc.status < 500 else ExitStatus.UNAVAILABLE


def _client(args: argparse.Namespace) -> Client:
    from orchestrator.api.client import Client
    from orchestrator.settings import Settings, read_token_file

    settings = None
    if args.token_file is None or (args.url is None and args.socket is None):
        settings = Settings.load(args.config)
    token_file = args.token_file or (settings.api.token_file if settings else None)
    assert token_file is not None
    # The first token; the file's mode is its owner's business, not the daemon's.
    token = read_token_file(token_file, check_mode=False)[0]
    if args.url is not None:
        return Client(token=token, url=args.url, cacert=args.cacert, timeout_s=args.timeout)
    socket_path = args.socket or (settings.socket_path if settings else None)
    return Client(token=token, socket_path=socket_path, timeout_s=args.timeout)


def _submit(client: Client, args: argparse.Namespace) -> int:
    from orchestrator.plan import read_plan_data

    data = read_plan_data(args.plan)  # the daemon checks it; this only reads it
    status, created = client.submit(data, args.idempotency_key)
    if args.json:
        print(status.model_dump_json(indent=2))
    elif created:
        print(f"migration {status.id} started (VM {status.vm}): orchestrator watch {status.id}")
    else:
        print(f"migration {status.id} (VM {status.vm}) was already submitted with this key")
    return ExitStatus.SUCCEEDED


def _control(client: Client, args: argparse.Namespace) -> int:
    if args.command == "switchover":
        status = client.switchover(args.id)
        done = "switchover forced"
    else:
        changes: dict[str, float | None] = {}
        if args.downtime_limit_ms is not None:
            changes["downtime_limit_ms"] = args.downtime_limit_ms
        if "bandwidth_limit_mib_s" in args:
            changes["bandwidth_limit_mib_s"] = args.bandwidth_limit_mib_s
        # Nothing to change is the daemon's to refuse, with the words it uses.
        status = client.control(args.id, changes)
        done = "limits set"
    if args.json:
        print(status.model_dump_json(indent=2))
        return ExitStatus.SUCCEEDED
    print(f"migration {status.id}: {done}, phase {status.phase}")
    if status.control is not None:
        print("  " + control_line(status.control))
    return ExitStatus.SUCCEEDED


def control_line(control: Control) -> str:
    """The limits in force, in one line."""
    cap = control.bandwidth_limit_mib_s
    parts = [
        f"downtime limit {control.downtime_limit_ms:g} ms",
        f"bandwidth cap {cap:g} MiB/s" if cap is not None else "no bandwidth cap",
    ]
    if control.switchover_forced:
        parts.append("switchover forced")
    return ", ".join(parts)


def _print_status(status: MigrationStatus, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(status.model_dump_json(indent=2), file=out)
        return
    state = status.outcome or "running"
    committed = ", committed" if status.committed else ""
    print(
        f"migration {status.id}: VM {status.vm}, {state}, phase {status.phase}{committed}",
        file=out,
    )
    if status.progress is not None:
        print(
            "  " + progress_line({**status.progress.model_dump(), "phase": status.phase}), file=out
        )
    if status.report is not None:
        print_report(status.report, out)


def _watch(client: Client, args: argparse.Namespace) -> int:
    client.status(args.id)  # an unknown id fails here, before any bar is drawn
    bar = WatchBar(sys.stderr) if sys.stderr.isatty() and not args.no_progress else None
    try:
        for event in client.events(args.id):
            if bar is not None:
                bar.update(event)
    finally:
        if bar is not None:
            bar.clear()
    final = client.status(args.id)
    _print_status(final, args.json, sys.stdout)
    if final.outcome is None:
        # The stream ends when the migration does, or when the daemon stops.
        print(
            f"orchestrator watch: the event stream of {args.id} ended before its outcome "
            "(is the daemon stopping?)",
            file=sys.stderr,
        )
        return ExitStatus.UNAVAILABLE
    return exit_status(final.outcome)


class WatchBar:
    """A one-line progress bar on a terminal, driven by a migration's events."""

    WIDTH = 24

    def __init__(self, out: TextIO) -> None:
        from orchestrator.flow import Phase

        self.out = out
        # The forward path; rollback has no place on it and shows as such.
        self.order = [p.value for p in Phase if p is not Phase.ROLLBACK]
        self.phase = self.order[0]
        self.arcs = 0
        self.round: int | None = None
        self._drawn_at = 0.0

    def update(self, event: MigrationEvent) -> None:
        import time

        changed = False
        if event.kind == "phase" and "phase" in event.detail:
            self.phase, changed = str(event.detail["phase"]), True
        elif event.kind == "arc_end":
            self.arcs += 1
        elif event.kind == "decision":
            self.round = event.detail.get("round")
        now = time.monotonic()
        if changed or now - self._drawn_at >= 0.1:
            self._drawn_at = now
            self.out.write("\r\x1b[K" + self.line())
            self.out.flush()

    def line(self) -> str:
        if self.phase in self.order:
            done = round(self.WIDTH * self.order.index(self.phase) / (len(self.order) - 1))
            bar = "#" * done + "-" * (self.WIDTH - done)
        else:
            bar = "<" * self.WIDTH
        parts = [f"[{bar}]", self.phase, f"{self.arcs} state changes"]
        if self.round:
            parts.append(f"pre-copy rounds {self.round}")
        return "  ".join(parts)

    def clear(self) -> None:
        self.out.write("\r\x1b[K")
        self.out.flush()


def _print_settings_problems(exc: SettingsError, out: TextIO) -> None:
    print(f"invalid settings: {len(exc.problems)} problem(s)", file=out)
    for problem in exc.problems:
        print(f"  {problem}", file=out)

"""The ``orchestrator`` command.

``main(argv)`` returns the exit status instead of exiting, so tests call it
directly.  Exit status: 0 the command did what was asked; 1 a migration ran
but did not succeed (rolled back or failed); 2 the input was bad (usage, an
invalid plan).  Bad input never shows a traceback: every problem is printed
with its field path.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import trio

from orchestrator import __version__, logs
from orchestrator.errors import PlanError
from orchestrator.plan import parse_plan
from orchestrator.report import MigrationReport
from orchestrator.resolve import ResolvedPlan, load_plan, resolve
from orchestrator.runner import Migration
from orchestrator.states import MigrationFlags, transition_table_markdown

EXIT_OK = 0
EXIT_NOT_SUCCEEDED = 1
EXIT_BAD_INPUT = 2

DEFAULT_PLAN = "default_plan.toml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator",
        description=(
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
    parser.add_argument("--log-format", choices=("console", "json"), default="console")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="migrate the devices of a plan on this host")
    run.add_argument(
        "plan",
        nargs="?",
        type=Path,
        help="plan file, .toml or .json (default: the embedded example plan)",
    )
    run.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    run.add_argument("--no-progress", action="store_true", help="no progress line on a terminal")

    validate = sub.add_parser("validate", help="check a plan and print every problem")
    validate.add_argument("plan", type=Path)
    validate.add_argument("--json", action="store_true", help="print the result as JSON")

    states = sub.add_parser(
        "states", help="print the device state model's arcs for a capability set"
    )
    states.add_argument(
        "--flags",
        default="STOP_COPY,P2P,PRE_COPY",
        help="comma-separated migration flags (STOP_COPY is always implied)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    interactive = sys.stderr.isatty()
    level = args.log_level or ("warning" if interactive else "info")
    logs.configure(level, args.log_format)
    try:
        if args.command == "run":
            return _run(args, interactive)
        if args.command == "validate":
            return _validate(args)
        return _states(args)
    except PlanError as exc:
        _print_problems(exc, sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # The reader went away (`| head`): not an error worth a traceback.
        # Point stdout at devnull so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


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
        return EXIT_BAD_INPUT
    plan = resolved.plan
    if args.json:
        print(json.dumps({"valid": True, "vm": plan.vm, "devices": len(plan.devices)}))
    else:
        print(f"{args.plan}: valid: VM {plan.vm!r}, {len(plan.devices)} device(s)")
    return EXIT_OK


def _states(args: argparse.Namespace) -> int:
    flags = MigrationFlags.STOP_COPY
    for word in filter(None, (w.strip().upper() for w in args.flags.split(","))):
        try:
            flags |= MigrationFlags[word]
        except KeyError:
            names = ", ".join(f.name or "" for f in MigrationFlags)
            raise PlanError(f"--flags: unknown flag {word!r} (known: {names})") from None
    print(transition_table_markdown(flags))
    return EXIT_OK


def _run(args: argparse.Namespace, interactive: bool) -> int:
    resolved = _load(args.plan)
    migration = Migration(resolved)
    show_progress = interactive and not args.no_progress
    trio.run(_run_migration, migration, show_progress)
    report = migration.report
    assert report is not None
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print_summary(report, resolved, sys.stdout)
    return EXIT_OK if report.outcome == "succeeded" else EXIT_NOT_SUCCEEDED


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
    plan = resolved.plan
    downtime = "n/a" if report.downtime_ms is None else f"{report.downtime_ms:.1f} ms"
    print(
        f"VM {report.vm}: {report.outcome} in {report.duration_ms:.1f} ms, "
        f"downtime {downtime} (limit {plan.downtime_limit_ms:g} ms)",
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

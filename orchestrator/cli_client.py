"""The ``orchestrator`` verbs that talk to a running daemon over its REST API
(``orchestrator.api.client``): ``submit``, ``status``, ``watch``, ``cancel``,
``set``, ``switchover``, ``settle``, ``list`` and ``devices``.  (The daemon's
modules, FastAPI and httpx, load only when one of them runs.)

Each exits with ``ExitStatus``: 0 when it did what was asked (``watch``: the
migration's outcome), 2 for a 4xx answer (bad input, an unknown id, a
conflict), 5 when the daemon is out of reach or answers with a 5xx.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, get_args

from orchestrator.cli_output import (
    ExitStatus,
    control_line,
    exit_status,
    help_layout,
    mib,
    print_status,
    print_table,
)
from orchestrator.flow import Phase
from orchestrator.report import Outcome
from orchestrator.status import MAX_PAGE_SIZE, MigrationList, MigrationSummary

if TYPE_CHECKING:
    from orchestrator.api.client import Client
    from orchestrator.api.models import MigrationEvent

__all__ = ["WatchBar", "add_client_commands", "client_command"]


def add_client_commands(sub: Any) -> None:
    """The client verbs' parsers, each with the options that reach the daemon."""
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
        **help_layout(),
    )
    submit.add_argument("plan", type=Path, help="plan file, .toml or .json")
    submit.add_argument(
        "--idempotency-key", help="submitting again with this key returns the first migration"
    )
    submit.add_argument("--json", action="store_true", help="print the status as JSON")

    def one_migration(name: str, summary: str, description: str | None = None) -> Any:
        """A verb on one migration by id, which prints its status (--json: as JSON)."""
        verb = sub.add_parser(name, parents=[connection], help=summary, **help_layout(description))
        verb.add_argument("id")
        verb.add_argument("--json", action="store_true", help="print the status as JSON")
        return verb

    one_migration("status", "show a migration")

    watch = sub.add_parser(
        "watch",
        parents=[connection],
        help="follow a migration to its end and exit with its outcome",
        **help_layout(),
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
        **help_layout(
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

    listing = sub.add_parser(
        "list",
        parents=[connection],
        help="list migrations, newest first, as a table",
        **help_layout(
            "One line per migration: its id, VM, phase, outcome (running while it runs), "
            "start time and duration (UTC), downtime, device count and error.  The filters "
            "combine; the daemon pages the list (GET /v1/migrations), this command follows "
            "its cursor up to --limit lines, or to the end with --all."
        ),
    )
    listing.add_argument("--vm", help="only this VM's migrations")
    listing.add_argument("--outcome", choices=sorted(get_args(Outcome)), help="only those ended so")
    listing.add_argument(
        "--phase", choices=[p.value for p in Phase], help="only those in this phase"
    )
    listing.add_argument(
        "--since",
        type=_since,
        metavar="TIME|AGE",
        help="only those started at or after an RFC 3339 time (2026-12-08T01:00:00Z), or "
        "within an age: 90s, 30m, 2h, 7d",
    )
    limits = listing.add_mutually_exclusive_group()
    limits.add_argument(
        "--limit",
        type=_positive,
        default=LIST_DEFAULT,
        help=f"show at most this many, the newest (default {LIST_DEFAULT})",
    )
    limits.add_argument("--all", action="store_true", help="show every migration that matches")
    listing.add_argument(
        "--json",
        action="store_true",
        help='print {"migrations": [summaries], "next_cursor": ...} as JSON',
    )

    devices = sub.add_parser(
        "devices",
        parents=[connection],
        help="list the devices the daemon knows and the migration holding each",
        **help_layout(
            "The devices of this daemon's host it knows of (GET /v1/devices): those "
            "migrations used since it started, those an unfinished migration holds, those "
            "a VMM handed over, and the simulated devices whose files are in its state "
            "directory (with their size: they outlive migrations)."
        ),
    )
    devices.add_argument("--json", action="store_true", help="print the devices as JSON")


#: Lines ``orchestrator list`` shows when not told otherwise.
LIST_DEFAULT = 50

_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _since(text: str) -> str:
    """An RFC 3339 time as given (the daemon checks it), or an age made one."""
    match = _AGE.fullmatch(text.strip())
    if match is None:
        return text
    seconds = float(match.group(1)) * _AGE_UNITS[match.group(2)]
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat(timespec="seconds")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return value


def _cap(text: str) -> float | None:
    """A bandwidth cap on the command line: MiB/s, or none."""
    if text.strip().lower() in ("none", "unlimited"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of MiB/s, nor none: {text!r}") from None


def client_command(args: argparse.Namespace) -> int:
    from orchestrator.api.client import ApiError, Unreachable

    try:
        with _client(args) as client:
            if args.command == "submit":
                return _submit(client, args)
            if args.command == "status":
                print_status(client.status(args.id), args.json, sys.stdout)
                return ExitStatus.SUCCEEDED
            if args.command == "watch":
                return _watch(client, args)
            if args.command == "list":
                return _list(client, args, sys.stdout)
            if args.command == "devices":
                return _devices(client, args.json, sys.stdout)
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


def _list(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    filters = {"vm": args.vm, "outcome": args.outcome, "phase": args.phase, "since": args.since}
    query: dict[str, str | int] = {k: v for k, v in filters.items() if v is not None}
    shown: list[MigrationSummary] = []
    cursor: str | None = None
    while True:
        # Pages of what is still wanted, so that the cursor is right after the last shown.
        wanted = MAX_PAGE_SIZE if args.all else min(args.limit - len(shown), MAX_PAGE_SIZE)
        page = client.page({**query, "limit": wanted, **({"cursor": cursor} if cursor else {})})
        shown.extend(m for m in page.migrations if isinstance(m, MigrationSummary))
        cursor = page.next_cursor
        if cursor is None or (not args.all and len(shown) >= args.limit):
            break
    if args.json:
        print(
            MigrationList(migrations=shown, next_cursor=cursor).model_dump_json(indent=2), file=out
        )
        return ExitStatus.SUCCEEDED
    if not shown:
        print("no migrations match", file=out)
        return ExitStatus.SUCCEEDED
    print_table([_LIST_HEADER, *(_list_row(m) for m in shown)], out)
    if cursor is not None:
        print(
            f"(the newest {len(shown)}: --limit N for more, --all for every one)", file=sys.stderr
        )
    return ExitStatus.SUCCEEDED


_LIST_HEADER = (
    "ID",
    "VM",
    "PHASE",
    "OUTCOME",
    "STARTED (UTC)",
    "TOOK",
    "DOWNTIME",
    "DEVICES",
    "ERROR",
)


def _list_row(m: MigrationSummary) -> tuple[str, ...]:
    outcome = m.outcome or ("in doubt" if m.in_doubt else "running")
    took = "-" if m.finished_at is None else _duration(m.finished_at - m.started_at)
    downtime = "-" if m.downtime_ms is None else f"{m.downtime_ms:.1f} ms"
    error = m.error or ""
    if len(error) > 60:
        error = error[:59] + "…"
    return (m.id, m.vm, m.phase, outcome, _utc(m.started_at), took, downtime, str(m.devices), error)


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _devices(client: Client, as_json: bool, out: TextIO) -> int:
    devices = client.devices()
    if as_json:
        print(json.dumps([d.model_dump(mode="json") for d in devices], indent=2), file=out)
        return ExitStatus.SUCCEEDED
    if not devices:
        print("no devices known", file=out)
        return ExitStatus.SUCCEEDED
    rows = [("DEVICE", "BACKEND", "NAME", "MIGRATION", "HANDLE", "FILES")]
    for d in devices:
        files = f"{len(d.files)} ({mib(d.file_bytes)})" if d.files else "-"
        rows.append((d.device, d.backend, d.name, d.migration or "-", d.handle or "-", files))
    print_table(rows, out)
    return ExitStatus.SUCCEEDED


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
    print_status(final, args.json, sys.stdout)
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

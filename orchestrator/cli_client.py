"""The ``orchestrator`` verbs that talk to a running daemon over its REST API
(``orchestrator.api.client``): ``submit``, ``status``, ``watch``, ``cancel``,
``set``, ``switchover``, ``settle``, ``list`` and ``devices``.

Each exits with ``ExitStatus``: 0 when it did what was asked (``watch``: the
migration's outcome), 2 for a 4xx answer (bad input, an unknown id, a
conflict), 5 when the daemon is out of reach or answers with a 5xx.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from orchestrator.cli_output import (
    ExitStatus,
    control_line,
    exit_status,
    help_layout,
    print_status,
)

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

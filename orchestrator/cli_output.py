"""What the ``orchestrator`` command prints, whatever the command: the exit
statuses (one table for every command, in ``--help`` and the README) and the
lines and tables that show a migration, its progress and its report.
"""

from __future__ import annotations

import argparse
import enum
import textwrap
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TextIO

from orchestrator.report import OUTCOME_MEANINGS, Control, MigrationReport, Outcome

if TYPE_CHECKING:
    from orchestrator.status import MigrationStatus

__all__ = [
    "OUTCOME_EXIT_STATUS",
    "ExitStatus",
    "control_line",
    "exit_status",
    "exit_status_help",
    "help_layout",
    "mib",
    "print_report",
    "print_status",
    "print_table",
    "progress_line",
]


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


def help_layout(description: str | None = None) -> dict[str, Any]:
    """A parser's description, wrapped here, and the exit status table after its
    options: argparse prints both as given, so the table keeps its lines."""
    return {
        "formatter_class": argparse.RawDescriptionHelpFormatter,
        "description": None if description is None else textwrap.fill(description, 79),
        "epilog": exit_status_help(),
    }


def progress_line(progress: dict[str, Any]) -> str:
    sent = sum(progress["bytes_sent"].values())
    parts = [f"[{progress['phase']}]", f"sent {mib(sent)}"]
    if progress["precopy_round"]:
        parts.append(f"round {progress['precopy_round']}")
    if progress["remaining_bytes"] is not None:
        parts.append(f"remaining {mib(progress['remaining_bytes'])}")
    if progress["expected_downtime_ms"] is not None:
        parts.append(f"expected downtime {progress['expected_downtime_ms']:.1f} ms")
    return "  ".join(parts)


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Rows of cells in aligned columns, two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )


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
                mib(d.bytes_precopy),
                mib(d.bytes_stopcopy),
                check,
            )
        )
    print_table(rows, out)
    for note in report.notes:
        print(f"note: {note}", file=out)
    if report.error is not None:
        e = report.error
        where = ", ".join(
            x
            for x in (
                e.side and (f"{e.side} device {e.device!r}" if e.device else f"{e.side} side"),
                e.phase and f"phase {e.phase}",
            )
            if x
        )
        print(f"error ({e.kind}{', ' + where if where else ''}): {e.message}", file=out)


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


def print_status(status: MigrationStatus, as_json: bool, out: TextIO) -> None:
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


class ProgressTerminal:
    """A terminal stream that keeps one progress line at its bottom: whatever else is
    written to it (log lines) goes above it, never glued onto it."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.line = ""
        self._at_line_start = True

    def show(self, line: str) -> None:
        """Draw (or redraw) the progress line."""
        self.line = line
        self.out.write("\r\x1b[K" + line)
        self.out.flush()

    def clear(self) -> None:
        self.line = ""
        self.out.write("\r\x1b[K")
        self.out.flush()

    def write(self, text: str) -> int:
        if not text:
            return 0
        if self._at_line_start and self.line:
            self.out.write("\r\x1b[K")  # the progress line gives way
        self.out.write(text)
        self._at_line_start = text.endswith("\n")
        if self._at_line_start and self.line:
            self.out.write(self.line)  # and comes back below
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()

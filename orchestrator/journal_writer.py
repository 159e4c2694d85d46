"""The service's background journal writer, and what it keeps of a failing journal.

Phase changes and device transitions reach the journal through one writer, in
the order they happened, not awaited on the hot path (the service's docstring
says why).  While any migration is inside its downtime window the writer holds
back, at most ``TRACE_HOLD_MAX_S``.

A journal that refuses a write (a full or read-only disk, an I/O error) must
not stall a migration, nor make the daemon forget what it did: what was not
written stays queued, in order, the daemon reports itself not ready with the
reason (``failure``), and the writer tries again every ``RETRY_S``.  A
migration whose report could not be written still ends (its devices are
freed) and the service shows it from memory until the journal holds it.  Once
the queue is written (or, with nothing queued, a probe write passes) the
failure clears and the daemon is ready again.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import structlog
import trio

from orchestrator.engine import Migration, TraceEvent
from orchestrator.journal import Journal

__all__ = ["FINISH", "RETRY_S", "TRACE_HOLD_MAX_S", "Entry", "JournalWriter"]

log = structlog.get_logger("orchestrator.service")

#: The longest the journal writer holds the trace back for migrations inside
#: their downtime window.  bench/downtime_netem.py measured the downtime 7-10%
#: shorter with the writer held (1, 8 and 64 devices, two rounds alternated).
TRACE_HOLD_MAX_S = 1.0

#: How often a journal that refused a write is tried again.
RETRY_S = 1.0

#: Queued after a migration's last event: the writer then journals its report.
FINISH: Final = object()


@dataclass
class Entry:
    """A migration the service runs (or recovers)."""

    migration: Migration
    created_at: float
    keys: list[str]
    done: trio.Event = field(default_factory=trio.Event)
    # Set once the writer is done with the report: written, or refused by the journal.
    journaled: trio.Event = field(default_factory=trio.Event)
    # The journal holds the report (False: not yet, the journal refused it so far).
    finish_written: bool = False
    # When it ended (Unix time), once done.
    finished_at: float | None = None
    # Set and replaced whenever new events reach the journal: wakes followers.
    changed: trio.Event = field(default_factory=trio.Event)
    # One control change at a time: each is journaled in the order it applied.
    control_lock: trio.Lock = field(default_factory=trio.Lock)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


Item = tuple[Entry, TraceEvent | object]


class JournalWriter:
    """Writes each migration's events, then its report, to the journal, in order.

    ``entries`` gives the migrations tracked now (their downtime windows hold the
    writer back); ``written`` is called once a migration's report is in the journal.
    """

    def __init__(
        self,
        journal: Journal,
        entries: Callable[[], Iterable[Entry]],
        written: Callable[[Entry], None],
    ) -> None:
        self.journal = journal
        self._entries = entries
        self._written = written
        #: Why the journal refused the last write (None: it takes writes).
        self.failure: str | None = None
        self._send, self._receive = trio.open_memory_channel[Item](math.inf)
        self._queue: collections.deque[Item] = collections.deque()
        self._done = trio.Event()
        #: Set (and replaced) after each pass at the queue: whoever waits for the
        #: journal to take writes again wakes at each try.
        self.tried = trio.Event()

    def send(self, entry: Entry, item: TraceEvent | object) -> None:
        self._send.send_nowait((entry, item))

    def failed(self, exc: BaseException) -> None:
        """A write outside the writer (a control change) was refused: the writer
        probes the journal until it takes writes again."""
        self._fail(exc)

    async def close(self) -> None:
        """Write what is queued (one try), then stop."""
        self._send.close()
        await self._done.wait()

    async def run(self) -> None:
        try:
            while True:
                with trio.move_on_after(RETRY_S if self.failure else math.inf):
                    try:
                        self._queue.append(await self._receive.receive())
                    except trio.EndOfChannel:
                        await self._write_queue()
                        return
                # Whatever is queued already goes in the same pass, in batches.
                while True:
                    try:
                        self._queue.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._hold_during_downtime()
                await self._write_queue()
                self.tried.set()
                self.tried = trio.Event()
        finally:
            self._done.set()

    async def _hold_during_downtime(self) -> None:
        """Wait until no migration is inside its downtime window, or ``TRACE_HOLD_MAX_S``."""
        with trio.move_on_after(TRACE_HOLD_MAX_S):
            while True:
                for entry in list(self._entries()):
                    await entry.migration.downtime_window_closed()
                # Each wait is a checkpoint, in which another migration's window
                # may have opened (its first events already queued): the writer
                # takes the queue only once none is open, with no await between.
                if not any(e.migration.in_downtime_window for e in self._entries()):
                    return

    async def _write_queue(self) -> None:
        """Write the queue in order; what the journal refuses stays queued, and a
        report refused still lets its migration end (``journaled``)."""
        try:
            with trio.CancelScope(shield=True):
                await self._write_in_order()
                if self.failure is not None and not self._queue:
                    await self.journal.probe()  # nothing queued: is it writable?
        except Exception as exc:
            self._fail(exc)
            for entry, item in self._queue:
                if item is FINISH:
                    entry.journaled.set()
            return
        if self.failure is not None:
            log.warning("service.journal_writable_again", was=self.failure)
            self.failure = None

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            log.error("service.journal_failed", error=str(exc))
        self.failure = str(exc)

    async def _write_in_order(self) -> None:
        """Write the queue's head, a batch at a time, and take off what was written."""
        while self._queue:
            entry, item = self._queue[0]
            if item is FINISH:
                report = entry.migration.report
                assert report is not None
                await self.journal.finish(entry.migration.id, report)
                self._queue.popleft()
                entry.finish_written = True
                entry.journaled.set()
                self._written(entry)
                continue
            batch: list[TraceEvent] = []
            for other, event in self._queue:
                if other is not entry or event is FINISH:
                    break
                assert isinstance(event, TraceEvent)
                batch.append(event)
            await self.journal.record_events(entry.migration.id, batch)
            for _ in batch:
                self._queue.popleft()
            entry.notify()

"""Bulk transfers: a device's stream moved by its connection's own threads, trio told of the end.

A device's state is gigabytes of bytes that trio has no decision to take
about; what it decides on is when a round or a stream ends, and what went
wrong.  Handing every chunk to trio's thread and back (a wake-up of its
loop, a task switch, a turn at the GIL against every other connection) cost
half the throughput of a plain socket copy with four connections
(bench/stream_throughput.py), and handing it between two threads of our own
cost as much.  So, where a backend offers the blocking side of its stream
(``BlockingReader`` / ``BlockingWriter``), no hand-off at all:

* source: the connection's writer thread reads a ``_Pump``'s device into its
  own buffer, frames, checksums and sends it, then reads the next piece.
  Devices pumping on one connection go one after another, in the order they
  started (frames trio queued go first): each ends as soon as its own bytes
  are out, and a stop-copy drain's END follows its last byte from the same
  thread, so the destination settles that device while the others are still
  on the wire (with 64 devices, turns of a piece each made the downtime 10%
  longer, bench/downtime_netem.py);
* destination: the connection's reader thread, once a DATA payload of a
  device with a ``_Sink`` is verified, loads it into the device itself and
  reuses the buffer.

Each transfer is a ``Transfer``: the thread counts its bytes and posts its
end to trio once; the runner watches it against the device call deadline
and abandons it if a device call hangs (the thread, stuck in the device,
finishes or fails alone; the migration fails, and with it the channel).
"""

from __future__ import annotations

import threading

from orchestrator.errors import PeerError
from orchestrator.transport import wire
from orchestrator.transport.channel.buffers import _BufferPool
from orchestrator.transport.streams import BlockingReader, BlockingWriter, Transfer

__all__ = ["_Pump", "_Sink", "_view"]


class _Pump:
    """One device's bulk transfer out, served by its connection's writer thread."""

    __slots__ = ("end_after", "limit", "reader", "slot", "transfer")

    def __init__(
        self, slot: int, reader: BlockingReader, limit: int | None, end_after: int | None
    ) -> None:
        self.slot = slot
        self.reader = reader
        self.limit = limit
        #: The stream's bytes sent before this transfer, where the reader's end is
        #: the stream's: its END (with the total) goes out right after the last byte.
        self.end_after = end_after
        self.transfer = Transfer()

    def wanted(self, piece: int) -> int:
        """The bytes to read next (0: the transfer is over)."""
        transfer = self.transfer
        if transfer.stopping:
            return 0
        if self.limit is None:
            return piece
        return max(0, min(piece, self.limit - transfer.bytes))


#: Loaded ahead of what the connection delivers from now on: pieces (and None, the END).
_Backlog = list[tuple[memoryview, _BufferPool] | None]


class _Sink:
    """One device's bulk transfer in, loaded by its connection's reader thread.

    What arrived before the sink was attached (the backlog) is loaded first,
    by a thread of its own that holds ``_lock`` meanwhile: the reader, with a
    piece to load, waits for it, so bytes are loaded in order.
    """

    def __init__(self, name: str, writer: BlockingWriter) -> None:
        self.name = name
        self._writer = writer
        self.transfer = Transfer()
        self._lock = threading.Lock()
        self._failure: PeerError | None = None

    def start(self, backlog: _Backlog) -> None:
        """In trio's thread, before the connection can hand the sink anything."""
        if not backlog:
            return
        self._lock.acquire()

        def load_backlog() -> None:
            try:
                for item in backlog:
                    self._load_item(item)
            finally:
                self._lock.release()

        threading.Thread(target=load_backlog, name=f"sink-{self.name}", daemon=True).start()

    def put(self, event: wire.Event, pool: _BufferPool) -> None:
        """In the connection's reader thread: load a verified DATA, or end at the END."""
        with self._lock:
            if isinstance(event, wire.Data):
                for piece in event.pieces:
                    self._load_item((_view(piece), pool))
            else:
                self._load_item(None)

    def fail(self, error: PeerError) -> None:
        """The channel failed: load nothing more; the transfer ends with ``error``."""
        self._failure = error
        self.transfer.finish(error)

    def _load_item(self, item: tuple[memoryview, _BufferPool] | None) -> None:
        transfer = self.transfer
        if item is None:
            if transfer.abandoned and self._failure is None:
                self._failure = PeerError(f"the load of {self.name} was given up before its end")
            transfer.exhausted = self._failure is None
            transfer.finish(self._failure)
            return
        piece, pool = item
        if not transfer.finished and not transfer.abandoned:
            try:
                transfer.device_call(self._writer.write_from, piece)
            except BaseException as exc:  # told to trio, which raises it
                transfer.finish(exc)
            else:
                transfer.moved(piece.nbytes)
        pool.give(piece)


def _view(piece: wire.Piece) -> memoryview:
    """The piece itself where it is a view (a second view would keep its buffer from
    going back to the pool), else a view of it."""
    return piece if isinstance(piece, memoryview) else memoryview(piece)

"""The payload buffers a data connection receives into and lends to the devices' consumers.

A connection's reader ``recv_into``s each DATA payload into a buffer of the
connection's ``_BufferPool``; the frame, once verified, lends that very
buffer on (``NetworkStreamReceiver.receive_lent``), and the consumer's next
call gives it back.  The bytes a device loads were copied once, by the kernel.

Invariants:

* a buffer has one holder at a time: the reader filling it, the consumer it
  is lent to, or the pool;
* a buffer that anyone still views (a worker thread abandoned on cancel, a
  view kept past the call) is never reused: it is left to its holder, and
  the pool makes another;
* a pool lends at most ``count`` buffers: a reader that finds them all lent
  waits, which holds its connection back;
* the pools of one migration's channel share a ``ByteBudget``: beyond its cap,
  a pool that already lends a buffer waits for the budget too (one buffer a
  connection always goes, so every connection keeps moving): received but
  not yet loaded bytes stay under the cap plus a buffer a connection;
* the process keeps at most ``SPARE_BUFFER_BYTES`` of closed pools' buffers
  for the next connections.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from orchestrator.transport import wire

#: Payload buffers kept by the process for the next connections.
SPARE_BUFFER_BYTES = 64 << 20


class _SpareBuffers:
    """Payload buffers of connections that have closed, kept for the next ones.

    A migration's first megabytes would otherwise land in fresh pages (page
    faults and zeroing, twice the cost of the copy itself); kept, they are
    memory the process touched before.  At most ``limit_bytes`` are kept.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._spare: list[bytearray] = []
        self._bytes = 0

    def take(self, size: int) -> bytearray:
        with self._lock:
            for i, buffer in enumerate(self._spare):
                if len(buffer) == size:
                    self._bytes -= size
                    return self._spare.pop(i)
        return bytearray(size)

    def keep(self, buffers: Sequence[bytearray]) -> None:
        with self._lock:
            for buffer in buffers:
                if self._bytes + len(buffer) > self.limit_bytes:
                    return
                self._spare.append(buffer)
                self._bytes += len(buffer)


_SPARE = _SpareBuffers(SPARE_BUFFER_BYTES)


class ByteBudget:
    """Bytes received and not yet given back (loaded), shared by a channel's pools."""

    def __init__(self, cap_bytes: int | None) -> None:
        self.cap_bytes = cap_bytes
        self.outstanding = 0
        self._ready = threading.Condition()

    def take(self, size: int, *, first: bool, closed: Callable[[], bool]) -> bool:
        """Count ``size`` bytes out, waiting while over the cap (unless ``first``: the
        pool's only buffer out); False if ``closed()`` said so meanwhile."""
        with self._ready:
            cap = self.cap_bytes
            while not first and cap is not None and self.outstanding + size > cap and not closed():
                self._ready.wait()  # give() and the pool's close() wake it
            if closed():
                return False
            self.outstanding += size
            return True

    def give(self, size: int) -> None:
        with self._ready:
            self.outstanding -= size
            self._ready.notify_all()

    def wake(self) -> None:
        with self._ready:
            self._ready.notify_all()


class _BufferPool:
    """The payload buffers of one connection: its reader fills them, consumers give them back.

    Buffers are taken on demand, up to ``count``, and then reused: memory
    the process has touched once, not fresh pages (an allocating receive
    halves throughput here).  A reader that finds every buffer lent out
    waits, which holds the connection back: the pool is the per-connection
    bound on what is received but not yet loaded.  Once the pool is closed,
    buffers given back go to the spares of the process, for the next pool.
    """

    def __init__(self, size: int, count: int, budget: ByteBudget | None = None) -> None:
        self.size = size
        self._count = count
        self._made = 0
        self._free: list[bytearray] = []
        self._ready = threading.Condition()
        self._closed = False
        self._budget = budget
        #: Buffers out of the pool (being filled or lent), counted against the budget.
        self._out = 0

    def take(self) -> bytearray | None:
        """A free buffer (waiting for one, and for the budget, if need be); None once
        the pool is closed."""
        budget = self._budget
        if budget is not None:
            with self._ready:
                first = self._out == 0
            if not budget.take(self.size, first=first, closed=lambda: self._closed):
                return None
        with self._ready:
            while not self._free and self._made >= self._count and not self._closed:
                self._ready.wait()
            if self._closed:
                if budget is not None:
                    budget.give(self.size)
                return None
            self._out += 1
            if self._free:
                return self._free.pop()
            self._made += 1
        return _SPARE.take(self.size)

    def give(self, piece: wire.Piece) -> None:
        """Take back the buffer under a lent piece, unless somebody still holds on to it.

        Pieces that are not views of the pool's buffers (``bytes``) are
        nobody's to take back.
        """
        obj = piece.obj if isinstance(piece, memoryview) else None
        if not isinstance(obj, bytearray) or len(obj) != self.size:
            return
        assert isinstance(piece, memoryview)
        buffer: bytearray | None = None
        try:
            piece.release()
            # Resizing fails while any view of the buffer is alive (a worker
            # thread abandoned on cancel, a view kept past the call): then
            # the buffer is left to its holder and the pool makes another.
            obj.append(0)
            del obj[-1]
            buffer = obj
        except BufferError:
            pass
        with self._ready:
            self._out -= 1
            if buffer is None:
                self._made -= 1
            elif self._closed:
                _SPARE.keep([buffer])
            else:
                self._free.append(buffer)
            self._ready.notify()
        if self._budget is not None:
            self._budget.give(self.size)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            free, self._free = self._free, []
            self._ready.notify_all()
        if self._budget is not None:
            self._budget.wake()
        _SPARE.keep(free)


def _give_back(event: wire.Event, pool: _BufferPool) -> None:
    """Return the pool buffers of an event nobody will consume."""
    if isinstance(event, wire.Data):
        for piece in event.pieces:
            pool.give(piece)

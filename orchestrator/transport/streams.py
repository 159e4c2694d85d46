"""One device's stream, as the runner sees it: the interface and the local implementation.

A stream carries one device's migration data, in order, from the source
device's reads to the destination device's writes.  Its end is explicit: a
receiver that sees the stream stop without the end marker knows it was cut,
and must not present what it got as a whole stream.

Two implementations: ``local_stream`` joins two devices of one host through
a bounded trio memory channel, so that a slow destination holds the source
back instead of buffering a whole device state in memory; the network data
channel (the ``channel`` package) carries many devices' streams between two hosts.
``RateLimiter`` enforces a plan's ``bandwidth_limit_mib_s`` across every
stream of a migration, whichever implementation carries it.

Bulk transfers: a stream end that can (the network channel's) moves a
device's bytes in its own I/O threads, from a ``BlockingReader`` (the source
device's stream, read into the channel's buffers) or into a
``BlockingWriter`` (the destination device), with trio told only of the
transfer's end (a ``Transfer``): no hand-off to trio's thread per chunk.
"""

from __future__ import annotations

import abc
import contextlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import trio

from orchestrator.errors import PeerError

__all__ = [
    "BlockingReader",
    "BlockingWriter",
    "LocalStreamReceiver",
    "LocalStreamSender",
    "RateLimiter",
    "StreamReceiver",
    "StreamSender",
    "Transfer",
    "local_stream",
]

_END = object()
_T = TypeVar("_T")


class BlockingReader(Protocol):
    """A source device's stream as an I/O thread reads it (never trio's thread)."""

    def read_into(self, buffer: memoryview, cancel: threading.Event) -> int:
        """Fill ``buffer`` with the stream's next bytes, blocking; how many.

        0 means what ``Device.read`` answering ``b""`` means: nothing more
        now (pre-copy) or the end of the stream (stop-copy).  A failure is the
        backend's ``DeviceError``.  ``cancel`` is set when the runner gives up
        on the call: a wait that can look at it stops.
        """
        ...


class BlockingWriter(Protocol):
    """A destination device as an I/O thread loads its stream (never trio's thread)."""

    def write_from(self, data: memoryview, cancel: threading.Event) -> None:
        """Load the stream's next bytes, blocking; ``data`` is lent for the call.
        ``cancel``: as for ``BlockingReader.read_into``."""
        ...


class Transfer:
    """One bulk transfer of a device's stream, run by an I/O thread.

    The thread moves the bytes and counts them; trio's side is told once, at
    the end (``done``: the stream's end, the round's limit, a stop, or an
    error in ``error``), and where it asked, when ``reached`` a byte count.
    The runner watches ``in_call_s`` for a device call past its deadline,
    and ``abandon``s a transfer it gives up on: the thread stops at its next
    step, or, stuck in the device, finishes (or fails) alone and then moves
    nothing more.
    """

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        #: Bytes moved so far (read and queued, or loaded).
        self.bytes = 0
        #: Seconds the thread spent inside device calls, and inside the latest one.
        self.device_s = 0.0
        self.last_call_s = 0.0
        self.error: BaseException | None = None
        self.done = trio.Event()
        #: Set by trio's side: stop after the current piece (a round cut short).
        self.stopping = False
        #: Set when the runner gives up: a device call waiting on it stops.
        self.cancelled = threading.Event()
        #: Set by the thread: the device had nothing more (its reader or its END).
        self.exhausted = False
        #: Set by the thread: it sent the stream's END after the last byte.
        self.ended_stream = False
        self.abandoned = False
        self._call_began: float | None = None
        self._lock = threading.Lock()
        self._watches: list[tuple[int, trio.Event]] = []
        self._finished = False
        self._on_done: list[Callable[[Transfer], None]] = []

    # -- the I/O thread's side --

    def device_call(self, fn: Callable[[memoryview, threading.Event], _T], data: memoryview) -> _T:
        """``fn(data, cancelled)``, timed as a device call."""
        began = self._call_began = time.monotonic()
        try:
            return fn(data, self.cancelled)
        finally:
            self._call_began = None
            self.last_call_s = time.monotonic() - began
            self.device_s += self.last_call_s

    def moved(self, nbytes: int) -> None:
        """Count ``nbytes`` more; wake the waiters whose count is reached."""
        with self._lock:
            self.bytes += nbytes
            reached = [w for w in self._watches if w[0] <= self.bytes]
            if reached:
                self._watches = [w for w in self._watches if w[0] > self.bytes]
        for _, event in reached:
            self._post(event.set)

    def finish(self, error: BaseException | None = None) -> None:
        """The transfer is over (``error``: why it failed); trio's side hears of it once."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            self.error = error
        self._post(self._complete)

    def _post(self, fn: Callable[[], object]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn)

    # -- trio's side --

    @property
    def finished(self) -> bool:
        return self._finished

    def on_done(self, fn: Callable[[Transfer], None]) -> None:
        """Call ``fn(self)`` in trio's thread as the transfer ends, before ``done`` is set."""
        self._on_done.append(fn)

    def _complete(self) -> None:
        for fn in self._on_done:
            try:
                fn(self)
            except Exception as exc:  # run by trio's loop: never let it escape there
                if self.error is None:
                    self.error = exc
        with self._lock:
            watches, self._watches = self._watches, []
        for _, event in watches:
            event.set()
        self.done.set()

    def in_call_s(self) -> float | None:
        """How long the device call under way has taken (None: none is)."""
        began = self._call_began
        return None if began is None else time.monotonic() - began

    def stop(self) -> None:
        """Stop after the piece under way (the bytes moved so far stand)."""
        self.stopping = True

    def abandon(self) -> None:
        """Give up on the transfer: its thread moves nothing more."""
        self.stopping = self.abandoned = True
        self.cancelled.set()

    async def reached(self, nbytes: int) -> None:
        """Wait until ``nbytes`` are moved, or the transfer is over."""
        with self._lock:
            if self.bytes >= nbytes or self._finished:
                event = None
            else:
                event = trio.Event()
                self._watches.append((nbytes, event))
        if event is None:
            await trio.lowlevel.checkpoint()
        else:
            await event.wait()


class RateLimiter:
    """A shared byte-rate cap: senders book transmission slots in turn.

    Each ``consume(n)`` books the next ``n`` bytes of the link and sleeps
    until they would have crossed at the rate, less a small burst allowance
    so that several streams can keep the link busy without idling between
    slots.  The rate may change while senders wait (``set_rate``: an
    operator's migrate-setspeed), or the cap go (``None``): bookings are in
    bytes, and the time each is due is worked out again from the new rate,
    so a waiting sender is never held to the old one.
    """

    def __init__(self, bytes_per_s: float | None, burst_s: float = 0.005) -> None:
        self._burst_s = burst_s
        #: Bytes booked so far; the link is free again once it crossed them all.
        self._booked = 0.0
        #: The rate's anchor: byte ``_anchor_bytes`` crosses at ``_anchor_s``.
        self._anchor_s = -math.inf
        self._anchor_bytes = 0.0
        self._changed = trio.Event()
        #: Told of every rate change (bulk transfers, which the limiter cannot pace).
        self._watchers: list[Callable[[], None]] = []
        self.bytes_per_s: float | None = None
        self.set_rate(bytes_per_s)

    def watch(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn()`` whenever a rate is set, until the returned call stops it."""
        self._watchers.append(fn)
        return lambda: self._watchers.remove(fn)

    def set_rate(self, bytes_per_s: float | None) -> None:
        """Cap the rate at ``bytes_per_s`` from now on (None: no cap)."""
        if bytes_per_s is not None and (not bytes_per_s > 0 or math.isinf(bytes_per_s)):
            raise ValueError("rate must be a positive, finite number of bytes per second")
        now = trio.current_time() if self._anchor_s > -math.inf else -math.inf
        # What crossed by now at the old rate is history; the rest goes at the new one.
        self._anchor_bytes = min(self._booked, self._crossed_by(now))
        self._anchor_s = now
        self.bytes_per_s = bytes_per_s
        self._changed.set()
        self._changed = trio.Event()
        if bytes_per_s is not None:  # a bulk transfer goes on unpaced while none is
            for fn in list(self._watchers):
                fn()

    def _crossed_by(self, when: float) -> float:
        if self.bytes_per_s is None or when == -math.inf:
            return self._booked
        return self._anchor_bytes + (when - self._anchor_s) * self.bytes_per_s

    def _due(self, booked: float) -> float:
        """When the link has carried ``booked`` bytes, at the current rate."""
        if self.bytes_per_s is None:
            return -math.inf
        return self._anchor_s + (booked - self._anchor_bytes) / self.bytes_per_s

    async def consume(self, nbytes: int) -> None:
        now = trio.current_time()
        if self.bytes_per_s is not None and self._due(self._booked) < now:
            # The link went idle: its next slot starts now, not in the past.
            self._anchor_s, self._anchor_bytes = now, self._booked
        self._booked += nbytes
        mine = self._booked
        while True:
            # An absolute deadline: once it fired, the clock is past it (a relative
            # delay worked out again could round to a sliver that never elapses).
            deadline = self._due(mine) - self._burst_s
            if trio.current_time() >= deadline:
                await trio.lowlevel.checkpoint()
                return
            changed = self._changed
            with trio.move_on_at(deadline):
                await changed.wait()


class StreamSender(abc.ABC):
    """The source end of one device's stream.

    ``send`` may be called any number of times, then ``end`` once; ``aclose``
    is always safe (after ``end`` it does nothing; before it, the receiver
    sees a cut stream).  A chunk passed to ``send`` must not be mutated until
    ``send`` returns (``bytes`` never are); after that the stream holds no
    reference to it.
    """

    bytes_sent: int
    #: Whether the stream was ended (``end``, or a bulk transfer's thread at its end).
    ended: bool = False

    #: Whether ``start_pump`` is offered now (the network channel's streams, while no
    #: rate limit paces them).
    pumps: bool = False

    def start_pump(
        self, reader: BlockingReader, *, limit: int | None = None, end: bool = False
    ) -> Transfer:
        """Move ``reader``'s bytes into the stream in an I/O thread, up to ``limit``
        (None: until it has nothing more now); returns at once.  ``end``: the
        reader's end is the stream's (stop-copy), and the thread ends the stream
        at once (``Transfer.ended_stream``), without waiting for trio."""
        raise NotImplementedError(f"{type(self).__name__} moves no bulk transfers")

    @abc.abstractmethod
    async def send(self, chunk: bytes) -> None:
        """Send the next chunk; PeerError if the receiving end has gone."""

    async def flush(self) -> None:
        """Return once every chunk sent so far has left the stream's own queue.

        The runner calls it at the end of each pre-copy round, so that the
        round's time, and the bandwidth measured from it, include sending
        the round's bytes.  A local stream holds only its small bounded
        buffer: nothing to wait for.
        """
        await trio.lowlevel.checkpoint()

    @abc.abstractmethod
    async def end(self) -> None:
        """Mark the stream complete and close it."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close; without ``end`` first, the receiver sees a cut stream."""


class StreamReceiver(abc.ABC):
    """The destination end of one device's stream.

    Chunk boundaries are not preserved: only the bytes and their order are.
    Every chunk ``receive`` returns belongs to the caller from then on: the
    stream never reuses or mutates its memory, so it may be kept or handed
    on.  ``receive_lent`` lends its chunk instead, until the next call.
    """

    bytes_received: int

    #: Whether ``start_sink`` is offered (the network channel's streams).
    sinks: bool = False

    def start_sink(self, writer: BlockingWriter) -> Transfer:
        """Load the rest of the stream into ``writer`` in an I/O thread, to its end;
        returns at once (the transfer is done at the end, or at a failure)."""
        raise NotImplementedError(f"{type(self).__name__} moves no bulk transfers")

    @abc.abstractmethod
    async def receive(self) -> bytes | None:
        """The next chunk, or None at the end the sender marked.

        Raises PeerError if the stream was cut before its end, or if its
        channel failed (the error says why).
        """

    async def receive_lent(self) -> memoryview | None:
        """The next chunk, lent: valid until the next receive or ``aclose``.

        For consumers that are done with each chunk before they ask for the
        next (a device's ``write`` copies what it keeps): the network channel
        then hands out the very buffer the kernel received into and reuses
        it, with no copy and no fresh allocation.  Here (and for the local
        stream) it is a view of ``receive``'s chunk.
        """
        chunk = await self.receive()
        return None if chunk is None else memoryview(chunk)

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop receiving; a sender that has not ended sees the stream refused."""


@dataclass
class LocalStreamSender(StreamSender):
    """The source end of a stream between two devices of this host."""

    _channel: trio.MemorySendChannel[object]
    _limiter: RateLimiter | None = None
    bytes_sent: int = 0

    async def send(self, chunk: bytes) -> None:
        if self._limiter is not None:
            await self._limiter.consume(len(chunk))
        await self._put(chunk)
        self.bytes_sent += len(chunk)

    async def end(self) -> None:
        await self._put(_END)
        self.ended = True
        await self._channel.aclose()

    async def _put(self, item: object) -> None:
        try:
            await self._channel.send(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise PeerError("the receiving end closed the stream") from None

    async def aclose(self) -> None:
        await self._channel.aclose()


@dataclass
class LocalStreamReceiver(StreamReceiver):
    """The destination end of a stream between two devices of this host."""

    _channel: trio.MemoryReceiveChannel[object]
    bytes_received: int = 0

    async def receive(self) -> bytes | None:
        try:
            item = await self._channel.receive()
        except trio.EndOfChannel:
            raise PeerError("the stream was cut before its end") from None
        if item is _END:
            return None
        assert isinstance(item, bytes)
        self.bytes_received += len(item)
        return item

    async def aclose(self) -> None:
        await self._channel.aclose()


def local_stream(
    limiter: RateLimiter | None = None, buffered_chunks: int = 4
) -> tuple[LocalStreamSender, LocalStreamReceiver]:
    """A stream between two devices of this host."""
    send, receive = trio.open_memory_channel[object](buffered_chunks)
    return LocalStreamSender(send, limiter), LocalStreamReceiver(receive)

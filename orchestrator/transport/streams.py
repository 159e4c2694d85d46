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
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import trio

from orchestrator.errors import PeerError

__all__ = [
    "LocalStreamReceiver",
    "LocalStreamSender",
    "RateLimiter",
    "StreamReceiver",
    "StreamSender",
    "local_stream",
]

_END = object()


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
        self.bytes_per_s: float | None = None
        self.set_rate(bytes_per_s)

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

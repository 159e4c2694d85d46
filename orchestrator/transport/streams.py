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

    Each ``consume(n)`` books the next ``n / rate`` seconds of the link and
    sleeps until its slot starts, less a small burst allowance so that
    several streams can keep the link busy without idling between slots.
    """

    def __init__(self, bytes_per_s: float, burst_s: float = 0.005) -> None:
        if not bytes_per_s > 0 or math.isinf(bytes_per_s):
            raise ValueError("rate must be a positive, finite number of bytes per second")
        self.bytes_per_s = bytes_per_s
        self._burst_s = burst_s
        self._next_free = -math.inf

    async def consume(self, nbytes: int) -> None:
        now = trio.current_time()
        start = max(now, self._next_free)
        self._next_free = start + nbytes / self.bytes_per_s
        delay = self._next_free - now - self._burst_s
        if delay > 0:
            await trio.sleep(delay)
        else:
            await trio.lowlevel.checkpoint()


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

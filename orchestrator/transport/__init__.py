"""The device-state data channel between a source and a destination device.

A stream carries one device's migration data, in order, from the source
device's reads to the destination device's writes.  Its end is explicit: a
receiver that sees the channel close without the end marker knows the
stream was cut, and must not present what it got as a whole stream.

``local_stream`` joins two devices on one host through a bounded trio
memory channel, so a slow destination holds the source back instead of
buffering a whole device state in memory.  ``RateLimiter`` enforces a
plan's ``bandwidth_limit_mib_s`` across every stream of a migration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

from orchestrator.errors import PeerError

__all__ = ["RateLimiter", "StreamReceiver", "StreamSender", "local_stream"]

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


@dataclass
class StreamSender:
    """The source end of one device's stream."""

    _channel: trio.MemorySendChannel[object]
    _limiter: RateLimiter | None = None
    bytes_sent: int = 0

    async def send(self, chunk: bytes) -> None:
        """Send the next chunk; PeerError if the receiving end has gone."""
        if self._limiter is not None:
            await self._limiter.consume(len(chunk))
        await self._put(chunk)
        self.bytes_sent += len(chunk)

    async def end(self) -> None:
        """Mark the stream complete and close it."""
        await self._put(_END)
        await self._channel.aclose()

    async def _put(self, item: object) -> None:
        try:
            await self._channel.send(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise PeerError("the receiving end closed the stream") from None

    async def aclose(self) -> None:
        """Close without the end marker: the receiver sees a cut stream."""
        await self._channel.aclose()


@dataclass
class StreamReceiver:
    """The destination end of one device's stream."""

    _channel: trio.MemoryReceiveChannel[object]
    bytes_received: int = 0

    async def receive(self) -> bytes | None:
        """The next chunk, or None at the end the sender marked.

        Raises PeerError if the stream was cut before its end.
        """
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
) -> tuple[StreamSender, StreamReceiver]:
    """A stream between two devices of this host."""
    send, receive = trio.open_memory_channel[object](buffered_chunks)
    return StreamSender(send, limiter), StreamReceiver(receive)

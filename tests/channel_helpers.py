"""What the data channel's tests share: a listener in the test's nursery, raw
connections, streams poured and drained."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import trio

from orchestrator.transport import ChannelListener, StreamReceiver, StreamSender
from orchestrator.transport.channel.listener import DEFAULT_MAX_HANDSHAKES

Address = tuple[str, int]


@contextlib.asynccontextmanager
async def serving(
    handshake_timeout_s: float = 5.0, max_handshakes: int = DEFAULT_MAX_HANDSHAKES
) -> AsyncIterator[tuple[ChannelListener, Address]]:
    listener = ChannelListener(
        handshake_timeout_s=handshake_timeout_s, max_handshakes=max_handshakes
    )
    async with trio.open_nursery() as nursery:
        address = await nursery.start(listener.serve, "127.0.0.1")
        yield listener, address
        nursery.cancel_scope.cancel()


async def drain(receiver: StreamReceiver) -> bytes:
    out = bytearray()
    while (chunk := await receiver.receive()) is not None:
        assert isinstance(chunk, bytes)
        out += chunk
    return bytes(out)


async def pour(sender: StreamSender, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        await sender.send(data[i : i + chunk])
    await sender.end()


async def raw_connect(address: Address) -> trio.SocketStream:
    return await trio.open_tcp_stream(*address)


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = await stream.receive_some(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


async def closed_on_us(stream: trio.SocketStream) -> bool:
    """The peer closed the connection (EOF, or a reset if it left our bytes unread)."""
    try:
        return await stream.receive_some() == b""
    except trio.BrokenResourceError:
        return True


async def polled(condition: Callable[[], bool], within_s: float = 30.0) -> None:
    """Wait for ``condition``, which reads a kernel counter (no event to wait on):
    poll it.  The deadline only bounds a hang."""
    with trio.fail_after(within_s):
        while True:
            if condition():
                return
            await trio.sleep(0.01)

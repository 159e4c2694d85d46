"""The cross-host data channel over real loopback TCP: delivery, auth, tampering, cuts, rate."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from typing_extensions import Buffer

from orchestrator.errors import PeerAuthError, PeerError, PeerProtocolError
from orchestrator.transport import (
    DestinationChannel,
    RateLimiter,
    StreamReceiver,
    default_connections,
    new_secret,
    open_channel,
    wire,
)
from orchestrator.transport.channel import RECV_PIECE_BYTES, UNSENT_BYTES, ends
from tests.channel_helpers import (
    Address,
    closed_on_us,
    drain,
    polled,
    pour,
    raw_connect,
    receive_exactly,
    serving,
)


async def collect(receiver: StreamReceiver, got: bytearray) -> None:
    while (piece := await receiver.receive()) is not None:
        got.extend(piece)


async def stream_then_control(
    dest: DestinationChannel, got: bytearray, messages: list[dict[str, Any]]
) -> None:
    """gpu0's stream into ``got``, then every CONTROL message until the channel closes."""
    await collect(dest.receiver("gpu0"), got)
    with contextlib.suppress(PeerError):
        while True:
            messages.append(await dest.receive_control())


@pytest.mark.parametrize("connections", [1, 4])
async def test_many_devices_arrive_byte_exact_with_acks_and_control_both_ways(
    connections: int,
) -> None:
    devices = [f"dev{i}" for i in range(7)]
    # Sizes across frame boundaries: empty, tiny, one frame, several (4 MiB frames).
    sizes = [0, 1, 4095, 1 << 20, (4 << 20) + 3, 9 << 20, 12345]
    data = {d: os.urandom(n) for d, n in zip(devices, sizes, strict=True)}
    secret = new_secret()
    async with serving() as (listener, address):
        dest = listener.expect("mig-a", secret, devices)
        received: dict[str, bytes] = {}

        async def load(device: str) -> None:
            received[device] = await drain(dest.receiver(device))
            await dest.acknowledge(device)

        async with open_channel(
            address, "mig-a", secret, devices, parallel_connections=connections
        ) as src:
            await dest.wait_connected()
            assert src.connections == dest.connections == connections
            async with trio.open_nursery() as nursery:
                for device in devices:
                    nursery.start_soon(load, device)
                    # An odd chunk size: chunk boundaries are not preserved, bytes are.
                    nursery.start_soon(pour, src.sender(device), data[device], 3 << 20)
            await src.all_acknowledged()
            for device in devices:
                assert await src.acknowledged(device) == len(data[device])
                assert src.is_acknowledged(device)
            await src.send_control({"step": "commit", "n": 1})
            await src.send_control({"step": "commit", "n": 2})
            assert await dest.receive_control() == {"step": "commit", "n": 1}
            assert await dest.receive_control() == {"step": "commit", "n": 2}
            await dest.send_control({"ok": True})
            assert await src.receive_control() == {"ok": True}
            stats = src.statistics()
            assert stats.payload_bytes == sum(sizes) == dest.statistics().payload_bytes
            assert stats.connections == connections and stats.busy_s > 0
            assert stats.throughput_bytes_s is not None
        assert received == data
        assert all(dest.receiver(d).bytes_received == len(data[d]) for d in devices)
        # The control connections' descriptors are closed on both sides, the
        # source's by the time its block is left.
        assert src._control is not None and src._control.sock.fileno() == -1
        await dest.aclose()
        await trio.testing.wait_all_tasks_blocked()  # the destination's link tasks ended
        assert dest._control is not None and dest._control.sock.fileno() == -1


async def test_lent_pieces_are_the_pool_buffers_reused_unless_a_view_is_kept() -> None:
    """``receive_lent`` lends the buffer the kernel received into and takes it
    back at the next call; a view still held then keeps its bytes for good."""
    secret = new_secret()
    pieces = [os.urandom(1 << 20) for _ in range(40)]  # more than a pool holds
    async with serving() as (listener, address):
        dest = listener.expect("mig-p", secret, ["gpu0"])
        async with open_channel(address, "mig-p", secret, ["gpu0"]) as src:

            async def send() -> None:
                for piece in pieces:
                    await src.sender("gpu0").send(piece)
                await src.sender("gpu0").end()

            receiver = dest.receiver("gpu0")
            got = bytearray()
            buffers: set[int] = set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                first = await receiver.receive_lent()
                assert first is not None and first.readonly is False
                kept = first[:4096]  # held past the next call: never to be overwritten
                kept_bytes = bytes(kept)
                got += first
                while (view := await receiver.receive_lent()) is not None:
                    assert isinstance(view.obj, bytearray)
                    buffers.add(id(view.obj))
                    got += view
                    previous = view
                with pytest.raises(ValueError, match="released"):
                    previous[0]  # given back: released, not readable any more
            assert bytes(got) == b"".join(pieces)
            assert bytes(kept) == kept_bytes
            # 40 pieces through a handful of buffers: reused, not one per piece.
            assert len(buffers) < 30


async def test_receive_returns_bytes_of_its_own() -> None:
    secret = new_secret()
    async with serving() as (listener, address):
        dest = listener.expect("mig-q", secret, ["gpu0"])
        async with open_channel(address, "mig-q", secret, ["gpu0"]) as src:
            await pour(src.sender("gpu0"), b"abc" * 1000, 1000)
            chunk = await dest.receiver("gpu0").receive()
            assert isinstance(chunk, bytes) and chunk == (b"abc" * 1000)[: len(chunk)]


async def test_a_flood_of_unread_control_messages_fails_the_channel() -> None:
    secret = new_secret()
    async with serving() as (listener, address):
        dest = listener.expect("mig-r", secret, ["gpu0"])
        async with open_channel(address, "mig-r", secret, ["gpu0"]) as src:

            async def flood() -> None:
                with trio.fail_after(20):
                    for n in range(100_000):
                        await src.send_control({"n": n})

            with pytest.raises(PeerError):
                await flood()
            with pytest.raises(PeerError, match="CONTROL messages unread"):
                await dest.receive_control()


async def test_parallel_connections_default_to_one_per_device_up_to_four() -> None:
    assert [default_connections(n) for n in (0, 1, 3, 4, 9)] == [1, 1, 3, 4, 4]
    secret = new_secret()
    async with serving() as (listener, address):
        for devices in (["a", "b"], [f"d{i}" for i in range(6)]):
            migration = f"mig-{len(devices)}"
            dest = listener.expect(migration, secret, devices)
            async with open_channel(address, migration, secret, devices) as src:
                await dest.wait_connected()
                assert src.connections == dest.connections == min(len(devices), 4)
            await dest.aclose()


async def test_the_source_refuses_more_connections_than_devices() -> None:
    with pytest.raises(ValueError, match="parallel_connections"):
        async with open_channel(("127.0.0.1", 1), "m", new_secret(), ["a"], parallel_connections=2):
            pass


# -- authentication -----------------------------------------------------------------


async def authenticated(
    address: Address, migration: str, secret: bytes, connection: int = 0, connections: int = 1
) -> trio.SocketStream:
    """A hand-made source connection: the handshake by the wire module, nothing more."""
    stream = await raw_connect(address)
    nonce = wire.parse_challenge(await receive_exactly(stream, wire.CHALLENGE_SIZE))
    raw = wire.client_hello(
        secret, nonce, migration, connection, connections, secrets.token_bytes(32)
    )
    await stream.send_all(raw)
    hello = wire.parse_hello(raw[: wire.HELLO_PREFIX_SIZE], raw[wire.HELLO_PREFIX_SIZE :])
    wire.verify_welcome(secret, nonce, hello, await receive_exactly(stream, wire.WELCOME_SIZE))
    return stream


async def test_unauthenticated_connections_are_refused_and_the_listener_serves_on() -> None:
    secret = new_secret()
    async with serving() as (listener, address):
        dest = listener.expect("mig-b", secret, ["gpu0"])
        with pytest.raises(PeerAuthError, match="refused"):
            async with open_channel(address, "mig-b", new_secret(), ["gpu0"]):
                pass
        with pytest.raises(PeerAuthError, match="refused"):
            async with open_channel(address, "no-such-migration", secret, ["gpu0"]):
                pass
        # Garbage instead of a HELLO, and a client that says nothing at all.
        garbage = await raw_connect(address)
        await receive_exactly(garbage, wire.CHALLENGE_SIZE)
        await garbage.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 100)
        assert await closed_on_us(garbage)
        # A short handshake deadline for this one alone: the others' handshakes
        # must not race it on a busy machine.  (Each connection reads the
        # deadline as its handshake starts, before the challenge is sent.)
        listener.handshake_timeout_s = 0.2
        silent = await raw_connect(address)
        await receive_exactly(silent, wire.CHALLENGE_SIZE)
        listener.handshake_timeout_s = 5.0
        with trio.fail_after(5):
            assert await closed_on_us(silent)  # the handshake timed out
        # A refused channel is two refused connections: its data and its control connection.
        assert len(listener.rejections) == 6
        assert any("failed authentication" in r for r in listener.rejections)
        assert any("did not send a channel HELLO" in r for r in listener.rejections)
        # None of that touched the expected migration: it still works.
        async with open_channel(address, "mig-b", secret, ["gpu0"]) as src:
            await pour(src.sender("gpu0"), b"still here", 4)
            assert await drain(dest.receiver("gpu0")) == b"still here"


async def test_a_connection_index_cannot_be_taken_twice() -> None:
    secret = new_secret()
    async with serving() as (listener, address):
        listener.expect("mig-c", secret, ["a", "b"])
        first = await authenticated(address, "mig-c", secret, 0, 2)
        with pytest.raises(PeerAuthError):
            await authenticated(address, "mig-c", secret, 0, 2)
        assert "connection 0 is already open" in listener.rejections[-1]
        # Connection 2 of 2 data connections is the control connection: one too.
        control = await authenticated(address, "mig-c", secret, 2, 2)
        with pytest.raises(PeerAuthError):
            await authenticated(address, "mig-c", secret, 2, 2)
        assert "connection 2 is already open" in listener.rejections[-1]
        await first.aclose()
        await control.aclose()


async def test_the_source_refuses_a_destination_without_the_secret() -> None:
    # An impostor answers the challenge protocol but cannot prove the secret.
    async def impostor(stream: trio.SocketStream) -> None:
        await stream.send_all(wire.make_challenge(secrets.token_bytes(32)))
        await receive_exactly(stream, wire.HELLO_PREFIX_SIZE + len("mig-d"))
        await stream.send_all(b"PTMIG/W3" + secrets.token_bytes(32))
        await stream.receive_some()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, impostor, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(PeerAuthError, match="could not prove"):
            async with open_channel(("127.0.0.1", port), "mig-d", new_secret(), ["gpu0"]):
                pass
        nursery.cancel_scope.cancel()


# -- tampering, violations, cuts --------------------------------------------------------


class Gate:
    """Holds back the bytes a proxy relays from client to server while shut."""

    def __init__(self) -> None:
        self._open = trio.Event()
        self._open.set()

    def shut(self) -> None:
        if self._open.is_set():
            self._open = trio.Event()

    def open(self) -> None:
        self._open.set()

    async def passage(self) -> None:
        await self._open.wait()


@contextlib.asynccontextmanager
async def proxy(
    target: Address,
    tamper: Callable[[int, bytearray], None] = lambda offset, chunk: None,
    *,
    gate: Gate | None = None,
    receive_buffer: int | None = None,
) -> AsyncIterator[Address]:
    """A TCP proxy; ``tamper(offset, chunk)`` may change client->server bytes in flight,
    and a shut ``gate`` holds them back.  ``receive_buffer`` fixes the size of the
    client sockets' receive buffers (no autotuning): what the path from a client
    holds while the gate is shut."""

    async def relay(client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream(*target)

        async def upstream() -> None:
            # Like a network path, each direction on its own: a server that
            # stops reading does not stop what it sends from reaching the client.
            offset = 0
            with contextlib.suppress(trio.BrokenResourceError):
                while chunk := await client.receive_some(65536):
                    buf = bytearray(chunk)
                    tamper(offset, buf)
                    offset += len(buf)
                    if gate is not None:
                        await gate.passage()
                    await server.send_all(bytes(buf))
                await server.send_eof()

        async def downstream() -> None:
            while chunk := await server.receive_some(65536):
                await client.send_all(chunk)

        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(upstream)
                nursery.start_soon(downstream)
        await server.aclose()
        await client.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, relay, 0, host="127.0.0.1"))
        if receive_buffer is not None:
            # Set on the listening socket, so that accepted ones start with it.
            listeners[0].socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        yield ("127.0.0.1", listeners[0].socket.getsockname()[1])
        nursery.cancel_scope.cancel()


async def test_a_byte_flipped_in_flight_fails_the_migration_and_is_never_loaded() -> None:
    secret = new_secret()
    data = os.urandom(6 << 20)
    chunk = 1 << 20
    frame = wire.HEADER_SIZE + chunk + wire.TRAILER_SIZE
    hello = wire.HELLO_PREFIX_SIZE + len("mig-e")
    # A payload byte of the fourth data frame.
    target = hello + 3 * frame + wire.HEADER_SIZE + 1000

    def flip(offset: int, buf: bytearray) -> None:
        if offset <= target < offset + len(buf):
            buf[target - offset] ^= 0x01

    async with serving() as (listener, address), proxy(address, flip) as via:
        dest = listener.expect("mig-e", secret, ["gpu0"])
        got = bytearray()

        async def load() -> None:
            receiver = dest.receiver("gpu0")
            while (piece := await receiver.receive()) is not None:
                got.extend(piece)

        async with open_channel(via, "mig-e", secret, ["gpu0"]) as src:
            source_errors: list[PeerError] = []

            async def send() -> None:
                try:
                    await pour(src.sender("gpu0"), data, chunk)
                    await src.acknowledged("gpu0")
                except PeerError as exc:
                    source_errors.append(exc)

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    with pytest.raises(PeerProtocolError) as info:
                        await load()
            assert (info.value.device, info.value.seq) == ("gpu0", 3)
            assert "checksum mismatch" in str(info.value)
            # Nothing from the bad frame on was delivered (frames before it were
            # delivered, unless the failure overtook them in the queue: all or nothing).
            assert data[: 3 * chunk].startswith(bytes(got))
            # The source learnt why, and every other operation of either end says so too.
            assert len(source_errors) == 1
            assert "destination aborted" in str(source_errors[0])
            assert "checksum mismatch" in str(source_errors[0])
            with pytest.raises(PeerProtocolError):
                await dest.receive_control()
            with pytest.raises(PeerError, match="destination aborted"):
                await src.send_control({"too": "late"})


async def crafted_violation(
    frames: Callable[[wire.FrameEncoder], list[bytes]],
) -> tuple[PeerError, bytes, list[str]]:
    """Send hand-made frames on an authenticated connection; what did the destination do?"""
    secret = new_secret()
    async with serving() as (listener, address):
        dest = listener.expect("mig-f", secret, ["gpu0", "gpu1"])
        stream = await authenticated(address, "mig-f", secret)
        good, *rest = frames(wire.FrameEncoder())
        # The first frame is good: it is loaded before anything goes wrong.
        await stream.send_all(good)
        assert await dest.receiver("gpu0").receive() == b"a"
        for frame in rest:
            await stream.send_all(frame)
        got = bytearray()
        with pytest.raises(PeerError) as info:
            await collect(dest.receiver("gpu0"), got)
        with pytest.raises(PeerError):
            await dest.receiver("gpu1").receive()
        # The destination told the source why before closing.
        told = await receive_all(stream)
        decoder = wire.FrameDecoder(wire.Role.SOURCE, ["gpu0", "gpu1"])
        reasons = [e.reason for e in decoder.feed(told) if isinstance(e, wire.Abort)]
        return info.value, bytes(got), reasons


async def receive_all(stream: trio.SocketStream) -> bytes:
    """Everything until the peer closes (a reset after bytes we left unread included)."""
    out = b""
    with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
        while chunk := await stream.receive_some():
            out += chunk
    return out


def one(buffers: Sequence[Buffer]) -> bytes:
    return b"".join(bytes(memoryview(b)) for b in buffers)


@pytest.mark.parametrize(
    ("make", "problem", "seq"),
    [
        # data 0 fine, 1 never sent, then 2: a gap
        (lambda e: [one(e.data(0, b"a")), skip(e), one(e.data(0, b"c"))], "out of order", 2),
        # data 0, then the same frame again
        (
            lambda e: [*(lambda f: [f, f])(one(e.data(0, b"a"))), one(e.data(0, b"x"))],
            "duplicate",
            0,
        ),
        (
            lambda e: [one(e.data(0, b"a")), one(e.data(9, b"who")), one(e.data(0, b"b"))],
            "unknown device index 9",
            0,
        ),
    ],
    ids=["gap", "duplicate", "unknown-device"],
)
async def test_crafted_bad_frames_fail_the_migration_and_nothing_after_them_is_loaded(
    make: Callable[[wire.FrameEncoder], list[bytes]], problem: str, seq: int
) -> None:
    error, got, reasons = await crafted_violation(make)
    assert isinstance(error, PeerProtocolError)
    assert problem in str(error) and error.seq == seq
    assert got == b""  # nothing from the bad frame or after it
    assert len(reasons) == 1 and problem in reasons[0]


async def test_a_tampered_control_frame_fails_the_channel_and_comes_back_as_its_reason() -> None:
    """The control connection is checked as the data connections are: a good
    message is delivered, a corrupted one fails the channel, and the
    destination says why on that connection before it closes it."""
    secret = new_secret()
    async with serving() as (listener, address):
        dest = listener.expect("mig-g", secret, ["gpu0"])
        # One data connection: the control connection is number 1.
        control = await authenticated(address, "mig-g", secret, 1, 1)
        encoder = wire.FrameEncoder()
        await control.send_all(one(encoder.control({"op": "first"})))
        assert await dest.receive_control() == {"op": "first"}
        bad = bytearray(one(encoder.control({"op": "second"})))
        bad[wire.HEADER_SIZE + 3] ^= 0x20
        await control.send_all(bytes(bad))
        with pytest.raises(PeerProtocolError, match="checksum mismatch") as info:
            await dest.receive_control()
        assert info.value.connection == 1
        told = await receive_all(control)
        decoder = wire.FrameDecoder(wire.Role.SOURCE, ["gpu0"], 1, 1)
        reasons = [e.reason for e in decoder.feed(told) if isinstance(e, wire.Abort)]
        assert len(reasons) == 1 and "checksum mismatch" in reasons[0]


async def test_a_control_frame_on_a_data_connection_is_refused() -> None:
    secret = new_secret()
    async with serving() as (listener, address):
        dest = listener.expect("mig-h", secret, ["gpu0"])
        data = await authenticated(address, "mig-h", secret, 0, 1)
        await data.send_all(one(wire.FrameEncoder().control({"op": "commit"})))
        with pytest.raises(PeerProtocolError, match="CONTROL frame on a data connection"):
            await dest.receive_control()
        await data.aclose()


def skip(encoder: wire.FrameEncoder) -> bytes:
    encoder.data(0, b"never sent")
    return b""


async def test_a_connection_cut_before_the_end_is_a_peer_error() -> None:
    secret = new_secret()
    async with serving() as (listener, address):
        dest = listener.expect("mig-g", secret, ["gpu0"])
        stream = await authenticated(address, "mig-g", secret)
        encoder = wire.FrameEncoder()
        await stream.send_all(one(encoder.data(0, b"first")))
        await stream.aclose()
        receiver = dest.receiver("gpu0")
        with pytest.raises(PeerError, match=r"stream cut.*before the end of gpu0"):
            await drain(receiver)

        dest = listener.expect("mig-h", secret, ["gpu0"])
        stream = await authenticated(address, "mig-h", secret)
        await stream.send_all(one(wire.FrameEncoder().data(0, b"0123456789"))[:20])
        await stream.aclose()
        with pytest.raises(PeerError, match="cut in mid-frame"):
            await drain(dest.receiver("gpu0"))


async def test_leaving_the_source_block_before_the_end_cuts_the_streams() -> None:
    secret = new_secret()
    async with serving() as (listener, address):
        dest = listener.expect("mig-i", secret, ["gpu0", "gpu1"])
        async with open_channel(address, "mig-i", secret, ["gpu0", "gpu1"]) as src:
            await src.sender("gpu0").send(b"partial")
            await pour(src.sender("gpu1"), b"whole", 2)
        # All or nothing: gpu1's stream was whole, but the migration has failed.
        for device in ("gpu0", "gpu1"):
            with pytest.raises(PeerError, match=r"stream cut.*before the end of gpu0"):
                await drain(dest.receiver(device))


async def test_an_abort_reaches_the_other_side_with_its_reason() -> None:
    secret = new_secret()
    async with serving() as (listener, address):
        dest = listener.expect("mig-j", secret, ["gpu0"])
        async with open_channel(address, "mig-j", secret, ["gpu0"]) as src:
            await src.sender("gpu0").send(b"x")
            await src.abort("operator cancelled")
            with pytest.raises(PeerError, match="source aborted the migration: operator cancelled"):
                await drain(dest.receiver("gpu0"))
            with pytest.raises(PeerError, match="aborted here"):
                await src.sender("gpu0").send(b"y")

        dest = listener.expect("mig-k", secret, ["gpu0"])
        async with open_channel(address, "mig-k", secret, ["gpu0"]) as src:
            await dest.wait_connected()
            await dest.abort("destination device failed")
            with pytest.raises(PeerError, match=r"destination aborted.*device failed"):
                with trio.fail_after(10):
                    await src.acknowledged("gpu0")


async def test_closing_a_sender_early_cuts_and_after_end_does_nothing() -> None:
    secret = new_secret()
    async with serving() as (listener, address):
        dest = listener.expect("mig-l", secret, ["gpu0", "gpu1"])
        async with open_channel(address, "mig-l", secret, ["gpu0", "gpu1"]) as src:
            await pour(src.sender("gpu1"), b"done", 4)
            await src.sender("gpu1").aclose()  # after end: nothing happens
            assert await drain(dest.receiver("gpu1")) == b"done"
            await src.sender("gpu0").send(b"half")
            await src.sender("gpu0").aclose()
            with pytest.raises(PeerError, match=r"closed device 'gpu0'.*early"):
                await drain(dest.receiver("gpu0"))


async def test_the_rate_limit_is_honoured_across_connections() -> None:
    secret = new_secret()
    devices = ["a", "b", "c", "d"]
    per_device = 256 << 10
    rate = 4 << 20  # 1 MiB in total takes about 0.25 s
    async with serving() as (listener, address):
        dest = listener.expect("mig-m", secret, devices)
        async with open_channel(
            address, "mig-m", secret, devices, limiter=RateLimiter(rate)
        ) as src:
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for device in devices:
                    nursery.start_soon(pour, src.sender(device), b"z" * per_device, 32 << 10)
                    nursery.start_soon(drain, dest.receiver(device))
            elapsed = trio.current_time() - start
            stats = src.statistics()
    total = per_device * len(devices)
    # The burst allowance lets the last slots start early: a loose lower bound.
    assert elapsed >= 0.8 * total / rate
    assert stats.throughput_bytes_s is not None and stats.throughput_bytes_s <= 1.3 * rate


def test_a_pool_takes_back_only_its_own_buffers() -> None:
    from orchestrator.transport.channel.buffers import _BufferPool

    pool = _BufferPool(16, 1)
    buffer = pool.take()
    assert buffer is not None
    pool.give(b"x" * 16)  # bytes: not the pool's, so its one buffer is still lent
    assert (pool._made, pool._free) == (1, [])
    kept = memoryview(buffer)
    held = kept[:4]
    pool.give(kept)  # still viewed through ``held``: left to its holder
    assert (pool._made, pool._free) == (0, [])
    del held
    fresh = pool.take()
    assert fresh is not None and fresh is not buffer
    pool.give(memoryview(fresh))
    assert pool._free == [fresh]


async def test_flush_returns_only_once_the_queued_frames_are_sent() -> None:
    """Sends of ``bytes`` return once queued; ``flush`` waits for the writer to
    have handed them all to the kernel (the pre-copy round's true end)."""
    secret = new_secret()
    chunk = os.urandom(1 << 20)
    async with serving() as (listener, address):
        dest = listener.expect("mig-s", secret, ["gpu0"])
        async with open_channel(address, "mig-s", secret, ["gpu0"]) as src:
            sender = src.sender("gpu0")
            (link,) = src._links.values()
            unsent = link.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
            assert unsent == UNSENT_BYTES  # the rest waits in the writer's queue
            flushed = trio.Event()
            queued_after_flush: list[int] = []

            async def send_then_flush() -> None:
                # More than the destination's pool, the socket buffers and the
                # writer's queue together hold while nobody loads.
                for _ in range(96):
                    await sender.send(chunk)
                await sender.flush()
                queued_after_flush.append(link._queued_bytes)
                flushed.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_then_flush)
                await trio.sleep(0.5)
                assert not flushed.is_set()  # the destination holds everything back
                receiver = dest.receiver("gpu0")
                got = 0
                while got < 96 << 20:
                    view = await receiver.receive_lent()
                    assert view is not None
                    got += view.nbytes
            assert queued_after_flush == [0]
            await sender.end()


async def test_a_device_end_overtakes_other_devices_queued_data_and_nothing_else() -> None:
    """An END goes ahead of the DATA of other devices still queued to the writer,
    so the destination settles a device once its own bytes are in; never ahead
    of its own device's frames, nor of any frame but DATA (another device's
    END here).  The destination accepts that order: sequence numbers are per
    device."""
    from orchestrator.transport.channel.links import _Link, _split

    devices = ["gpu0", "gpu1", "gpu2", "gpu3"]
    ours, theirs = trio.socket.socketpair()
    link = _Link(ours, 0)
    piece = os.urandom(1000)

    async def data(device: int) -> None:
        await link.write(wire.Kind.DATA, device, piece, wait=False)

    async def end(device: int, pieces: int) -> None:
        await link.write_frame(
            lambda encoder: _split(encoder.end(device, pieces * len(piece))), ends=device
        )

    # Queued before the writer starts, so the queue holds all of it.
    await data(0)
    await data(1)
    await data(3)
    await end(3, 1)  # its own DATA is last: stays where it is
    await data(2)
    await data(0)
    await data(2)
    await end(1, 1)  # passes every DATA behind gpu3's END; stops there
    await end(0, 2)  # passes gpu2's last DATA; stops behind its own
    await end(2, 2)  # its own DATA is last: stays last
    link.start(
        wire.InboundValidator(wire.Role.SOURCE, devices),
        lambda event, pool: None,
        len(devices),
        lambda error: None,
    )
    decoder = wire.FrameDecoder(wire.Role.DESTINATION, devices)
    seen: list[tuple[str, int, int]] = []
    try:
        with trio.fail_after(5):
            while len(seen) < 10:
                received = await theirs.recv(1 << 16)
                assert received, "the link closed before its frames were all sent"
                for event in decoder.feed(received):
                    assert isinstance(event, wire.Data | wire.End)
                    seen.append((type(event).__name__, event.device, event.seq))
    finally:
        link.close()
        theirs.close()
    assert seen == [
        ("Data", 0, 0),
        ("Data", 1, 0),
        ("Data", 3, 0),
        ("End", 3, 1),
        ("End", 1, 1),
        ("Data", 2, 0),
        ("Data", 0, 1),
        ("End", 0, 2),
        ("Data", 2, 1),
        ("End", 2, 2),
    ]


async def test_small_frames_queued_before_a_clean_close_still_reach_the_peer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """END and CONTROL return once queued; closing the channel sends what is
    queued before it shuts the connections down.

    A proxy holds back every byte the source sends until the channel is being
    closed, and its small receive buffers leave the path from the source room
    for little: a data connection's kernel takes ``UNSENT_BYTES`` unsent (and
    at most its 4 MiB send buffer), so of 8 MiB the tail and the END are still
    in the writer's queue at the close; CONTROL frames past what the control
    connection's path holds wait in its unsent queue.  Nothing here depends
    on how fast the machine is."""
    # The close sends what is queued for at most ABORT_GRACE_S: here it only bounds a hang.
    monkeypatch.setattr(ends, "ABORT_GRACE_S", 60.0)
    secret = new_secret()
    data = os.urandom(8 << 20)
    assert len(data) > 4 * UNSENT_BYTES
    blob = "c" * (60 << 10)  # 5 MiB of CONTROL frames in all: more than their path holds
    gate = Gate()
    async with (
        serving() as (listener, address),
        proxy(address, gate=gate, receive_buffer=64 << 10) as via,
    ):
        dest = listener.expect("mig-t", secret, ["gpu0"])
        got = bytearray()
        messages: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_then_control, dest, got, messages)
            async with open_channel(via, "mig-t", secret, ["gpu0"]) as src:
                gate.shut()
                await pour(src.sender("gpu0"), data, 1 << 20)
                for n in range(85):
                    await src.send_control({"n": n, "blob": blob})
                assert not got and not messages  # all of it is still on the source's side

                async def open_gate() -> None:
                    gate.open()

                # It runs once this task waits: in the block's close, for the queues to drain.
                nursery.start_soon(open_gate)
    assert bytes(got) == data
    assert [m["n"] for m in messages] == list(range(85))
    assert all(m["blob"] == blob for m in messages)


async def test_bytes_in_flight_count_what_the_destination_has_not_taken_yet() -> None:
    """Sent is not delivered: what sits in the writer's queue and the kernel's
    send queue, unacknowledged, is reported until the destination reads it."""
    secret = new_secret()
    chunk = os.urandom(1 << 20)
    async with serving() as (listener, address):
        dest = listener.expect("mig-u", secret, ["gpu0"])
        async with open_channel(address, "mig-u", secret, ["gpu0"]) as src:
            sender = src.sender("gpu0")
            assert src.in_flight_bytes() == 0

            async def send_all() -> None:
                # More than the destination's pool and both socket buffers hold.
                for _ in range(64):
                    await sender.send(chunk)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                # Nobody loads: it piles up on the way, and stays there.
                await polled(lambda: src.in_flight_bytes() >= 1 << 20)
                assert src.in_flight_bytes() <= 64 << 20
                receiver = dest.receiver("gpu0")
                got = 0
                while got < 64 << 20:
                    view = await receiver.receive_lent()
                    assert view is not None
                    got += view.nbytes
            await polled(lambda: src.in_flight_bytes() == 0)
            await sender.end()


async def test_a_waited_control_message_survives_the_cancellation_of_its_channel() -> None:
    """What the commit and finish rely on: sent with ``wait`` under a shield, a
    message has reached the kernel before the cancelled channel shuts down."""
    secret = new_secret()
    data = os.urandom(4 << 20)
    async with serving() as (listener, address):
        dest = listener.expect("mig-v", secret, ["gpu0"])
        got = bytearray()
        messages: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_then_control, dest, got, messages)
            with trio.CancelScope() as scope:
                async with open_channel(address, "mig-v", secret, ["gpu0"]) as src:
                    sender = src.sender("gpu0")
                    await pour(sender, data, 1 << 20)
                    await sender.flush()
                    with trio.CancelScope(shield=True):
                        await src.send_control({"op": "finish"}, wait=True)
                    scope.cancel()
                    await trio.sleep_forever()
    assert bytes(got) == data
    assert messages == [{"op": "finish"}]


async def test_control_frames_the_socket_cannot_take_wait_their_turn_in_order() -> None:
    """The control connection writes from the caller's task; what the socket
    cannot take at once (a peer that stopped reading) is queued, later frames
    behind it, and a write with ``wait`` returns only once it has all gone."""
    from orchestrator.transport.channel.links import _ControlLink, _split

    ours, theirs = trio.socket.socketpair()
    link = _ControlLink(ours, 1)
    validator = wire.InboundValidator(wire.Role.SOURCE, ["gpu0"], 1, 1)
    blob = "x" * (60 << 10)
    async with trio.open_nursery() as nursery:
        errors: list[PeerError | None] = []

        async def ended(outcome: PeerError | None) -> None:
            errors.append(outcome)

        nursery.start_soon(link.run, validator, lambda event, pool: None, errors.append, ended)
        sent = 0

        async def write(blob: str, *, wait: bool = False) -> None:
            nonlocal sent
            message = {"n": sent, "blob": blob}
            sent += 1
            await link.write_frame(lambda encoder: _split(encoder.control(message)), wait=wait)

        while not link._unsent:  # until the socket's buffers are full
            await write(blob)
        for _ in range(3):  # queued behind, in order; each returns at once
            await write(blob)
        waited = trio.Event()

        async def last() -> None:
            await write("", wait=True)
            waited.set()

        nursery.start_soon(last)
        await trio.sleep(0.05)
        assert not waited.is_set()  # the peer has read nothing: it cannot have gone
        decoder = wire.FrameDecoder(wire.Role.DESTINATION, ["gpu0"], 1, 1)
        seen: list[int] = []
        with trio.fail_after(5):
            while len(seen) < sent:
                for event in decoder.feed(await theirs.recv(1 << 16)):
                    assert isinstance(event, wire.Control)
                    assert event.seq == event.message["n"] == len(seen)
                    seen.append(event.seq)
            await waited.wait()
        assert not link._unsent and not errors
        link.close()
    theirs.close()
    assert errors == [None]  # a clean end of stream, once closed


# -- the package's public names -----------------------------------------------------------

#: What callers import from ``orchestrator.transport.channel`` (a module before it
#: was split into ``links``, ``ends`` and ``listener``), and from the transport package.
CHANNEL_NAMES = [
    "ABORT_GRACE_S",
    "CONTROL_BACKLOG",
    "CONTROL_RECEIVE_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "LINK_TIMEOUT_S",
    "QUEUED_BYTES",
    "QUEUED_PIECES",
    "RECV_PIECE_BYTES",
    "SPARE_BUFFER_BYTES",
    "UNSENT_BYTES",
    "WRITE_BATCH",
    "WRITE_BATCH_BYTES",
    "ChannelListener",
    "ChannelStatistics",
    "DestinationChannel",
    "NetworkStreamReceiver",
    "NetworkStreamSender",
    "SourceChannel",
    "default_connections",
    "new_secret",
    "open_channel",
]


@pytest.mark.parametrize("module", ["orchestrator.transport", "orchestrator.transport.channel"])
def test_the_public_names_stay_where_callers_import_them(module: str) -> None:
    import importlib

    package = importlib.import_module(module)
    exported = set(package.__all__)
    assert all(hasattr(package, name) for name in exported)
    wanted = set(CHANNEL_NAMES)
    if module == "orchestrator.transport":
        # The package re-exports the channel's classes and functions, not its tunables.
        wanted = {name for name in wanted if not name.isupper()}
    assert wanted <= exported, sorted(wanted - exported)


@pytest.mark.parametrize("connections", [1, 2])
async def test_bytes_received_and_not_loaded_stay_under_the_migrations_cap(
    connections: int,
) -> None:
    # A destination that loads slower than the wire: what waits to be loaded
    # stays under the cap (plus the one buffer each connection may always
    # take, so that it keeps moving), and every byte still arrives, in order.
    cap = 4 << 20
    devices = [f"dev{i}" for i in range(connections)]
    data = {d: os.urandom(24 << 20) for d in devices}
    secret = new_secret()
    async with serving() as (listener, address):
        listener.max_buffered_bytes = cap
        dest = listener.expect("mig-cap", secret, devices)
        peak = 0
        got: dict[str, bytearray] = {d: bytearray() for d in devices}

        async def load(device: str) -> None:
            nonlocal peak
            receiver = dest.receiver(device)
            while (piece := await receiver.receive_lent()) is not None:
                peak = max(peak, listener.buffered_bytes())
                got[device] += piece
                await trio.sleep(0.01)  # the slow device: 100 MiB/s

        async with (
            open_channel(
                address, "mig-cap", secret, devices, parallel_connections=connections
            ) as src,
            trio.open_nursery() as nursery,
        ):
            for device in devices:
                nursery.start_soon(load, device)
                nursery.start_soon(pour, src.sender(device), data[device], 1 << 20)
        assert {d: bytes(b) for d, b in got.items()} == data
        assert peak <= cap + connections * RECV_PIECE_BYTES, peak
        assert peak >= cap // 2  # it did fill up: the bound was what held it
        await dest.aclose()

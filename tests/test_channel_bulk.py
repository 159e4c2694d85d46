"""Bulk transfers over the data channel: devices read and loaded in the channel's I/O threads."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from orchestrator.errors import DeviceError, PeerError
from orchestrator.transport import (
    DestinationChannel,
    RateLimiter,
    SourceChannel,
    new_secret,
    open_channel,
)
from orchestrator.transport.channel import RECV_PIECE_BYTES
from tests.channel_helpers import polled, serving


class MemoryReader:
    """A source device's stream in memory, read in pieces of at most ``piece`` bytes."""

    def __init__(self, data: bytes, piece: int | None = None) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.piece = piece
        self.threads: set[str] = set()

    def read_into(self, buffer: memoryview, cancel: threading.Event) -> int:
        self.threads.add(threading.current_thread().name)
        n = min(len(buffer), len(self.data) - self.pos, self.piece or len(buffer))
        buffer[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


class GatedReader(MemoryReader):
    """A memory stream whose reads past ``gate_at`` bytes wait for ``gate``."""

    def __init__(self, data: bytes, gate_at: int) -> None:
        super().__init__(data)
        self.gate_at = gate_at
        self.gate = threading.Event()

    def read_into(self, buffer: memoryview, cancel: threading.Event) -> int:
        if self.pos >= self.gate_at:
            self.gate.wait()
        return super().read_into(buffer, cancel)


class Waiting:
    """A destination device whose load returns only once the runner gives up."""

    def write_from(self, data: memoryview, cancel: threading.Event) -> None:
        cancel.wait()


class Collector:
    """A destination device that keeps what it loads."""

    def __init__(self) -> None:
        self.got = bytearray()
        self.threads: set[str] = set()

    def write_from(self, data: memoryview, cancel: threading.Event) -> None:
        self.threads.add(threading.current_thread().name)
        self.got += data


@contextlib.asynccontextmanager
async def one_gpu(
    tag: str, **options: Any
) -> AsyncIterator[tuple[DestinationChannel, SourceChannel]]:
    """A channel of one device, "gpu", migration ``tag``: its two ends, closed after."""
    secret = new_secret()
    async with serving() as (listener, address):
        dest = listener.expect(tag, secret, ["gpu"])
        async with open_channel(address, tag, secret, ["gpu"], **options) as src:
            yield dest, src
        await dest.aclose()


@pytest.mark.parametrize("connections", [1, 4])
async def test_pumped_streams_arrive_byte_exact_loaded_in_sink_threads(connections: int) -> None:
    devices = [f"dev{i}" for i in range(6)]
    sizes = [0, 1, 4095, RECV_PIECE_BYTES, (4 << 20) + 3, 9 << 20]
    data = {d: os.urandom(n) for d, n in zip(devices, sizes, strict=True)}
    secret = new_secret()
    async with serving() as (listener, address):
        dest = listener.expect("bulk", secret, devices)
        sinks = {d: Collector() for d in devices}
        async with open_channel(
            address, "bulk", secret, devices, parallel_connections=connections
        ) as src:
            await dest.wait_connected()

            async def load(device: str) -> None:
                receiver = dest.receiver(device)
                assert receiver.sinks
                transfer = receiver.start_sink(sinks[device])
                await transfer.done.wait()
                assert transfer.error is None and transfer.bytes == len(data[device])
                assert receiver.ended and receiver.bytes_received == len(data[device])
                await dest.acknowledge(device)

            async def send(device: str) -> None:
                sender = src.sender(device)
                assert sender.pumps
                reader = MemoryReader(data[device])
                # Two rounds: the first stops at its limit, the second at the end.
                first = sender.start_pump(reader, limit=len(data[device]) // 3)
                await first.done.wait()
                assert first.error is None and first.bytes == len(data[device]) // 3
                # Half the devices have the thread end their stream with the last
                # byte (the stop-copy drain), half end it through trio.
                by_thread = devices.index(device) % 2 == 0
                second = sender.start_pump(reader, end=by_thread)
                await second.done.wait()
                assert second.error is None and second.ended_stream is by_thread
                assert sender.bytes_sent == len(data[device])
                assert sender.ended is by_thread
                if not by_thread:
                    await sender.end()
                # Read by its connection's writer thread, never trio's.
                assert all(name.endswith("-tx") for name in reader.threads)

            async with trio.open_nursery() as nursery:
                for device in devices:
                    nursery.start_soon(load, device)
                    nursery.start_soon(send, device)
            for device in devices:
                assert await src.acknowledged(device) == len(data[device])
            assert src.statistics().payload_bytes == sum(sizes)
            assert dest.statistics().payload_bytes == sum(sizes)
        await dest.aclose()
    assert {d: bytes(s.got) for d, s in sinks.items()} == data
    # Loaded by the connections' reader threads (or a backlog's), never trio's.
    assert all(name.startswith(("channel-", "sink-")) for s in sinks.values() for name in s.threads)


async def test_a_sink_started_late_loads_what_arrived_before_it_first_in_order() -> None:
    data = os.urandom((3 << 20) + 17)
    async with one_gpu("late") as (dest, src):
        sender = src.sender("gpu")
        # Sent through trio first, then pumped: the destination takes the first
        # megabyte itself, then starts its sink with the rest queued or on its way.
        await sender.send(data[: 1 << 20])
        transfer = sender.start_pump(MemoryReader(data[1 << 20 :], piece=65536))
        await transfer.done.wait()
        await sender.end()
        receiver = dest.receiver("gpu")
        head = await receiver.receive_lent()
        assert head is not None
        got = bytearray(head)
        sink = Collector()
        loading = receiver.start_sink(sink)
        await loading.done.wait()
        assert loading.error is None
        assert bytes(got + sink.got) == data
        # What trio took before the sink is counted once.
        assert dest.statistics().payload_bytes == len(data) == src.statistics().payload_bytes


async def test_a_device_error_in_a_pump_or_a_sink_ends_its_transfer_with_that_error() -> None:
    class Failing:
        def read_into(self, buffer: memoryview, cancel: threading.Event) -> int:
            raise DeviceError("read failed", device="gpu", operation="read", errno=5)

    class Refusing:
        def write_from(self, data: memoryview, cancel: threading.Event) -> None:
            raise DeviceError("load refused", device="gpu", operation="write", errno=22)

    async with one_gpu("err") as (dest, src):
        sender = src.sender("gpu")
        failed = sender.start_pump(Failing())
        await failed.done.wait()
        assert isinstance(failed.error, DeviceError) and failed.bytes == 0
        loading = dest.receiver("gpu").start_sink(Refusing())
        await sender.send(os.urandom(3 << 20))
        await loading.done.wait()
        assert isinstance(loading.error, DeviceError)
        assert "load refused" in str(loading.error)
        await sender.end()


async def test_a_stuck_device_call_shows_and_an_abandoned_pump_moves_nothing_more() -> None:
    release = threading.Event()

    class Stuck:
        calls = 0

        def read_into(self, buffer: memoryview, cancel: threading.Event) -> int:
            self.calls += 1
            release.wait()
            buffer[:5] = b"stale"
            return 5

    secret = new_secret()
    async with serving() as (listener, address):
        dest = listener.expect("stuck", secret, ["gpu"])
        async with open_channel(address, "stuck", secret, ["gpu"]) as src:
            reader = Stuck()
            transfer = src.sender("gpu").start_pump(reader)
            # The thread is inside the device call: the runner sees it stuck there.
            await polled(lambda: transfer.in_call_s() is not None)
            transfer.abandon()
            release.set()
            await transfer.done.wait()
            assert transfer.bytes == 0 and reader.calls == 1
            await src.abort("the device hung")
        with pytest.raises(PeerError):
            await dest.receiver("gpu").receive()
        await dest.aclose()


async def test_a_failed_channel_ends_a_waiting_sink_with_the_channels_failure() -> None:
    async with one_gpu("cut") as (dest, src):
        await dest.wait_connected()
        loading = dest.receiver("gpu").start_sink(Collector())
        await src.sender("gpu").send(b"x" * 1000)
        await src.abort("operator cancelled")
        await loading.done.wait()
        assert isinstance(loading.error, PeerError)
        assert "operator cancelled" in str(loading.error)


async def test_a_stopped_pump_ends_its_round_after_the_piece_under_way() -> None:
    data = os.urandom(64 << 20)
    async with one_gpu("stop") as (dest, src):
        sender = src.sender("gpu")
        reader = GatedReader(data, 2 << 20)
        transfer = sender.start_pump(reader)
        loading = dest.receiver("gpu").start_sink(Collector())
        await loading.reached(2 << 20)
        transfer.stop()
        reader.gate.set()
        await transfer.done.wait()
        assert transfer.error is None and transfer.bytes < len(data)
        assert sender.bytes_sent == transfer.bytes
        await sender.end()
        await loading.done.wait()
        assert loading.bytes == transfer.bytes


async def test_a_rate_set_during_a_pump_stops_it_and_the_stream_no_longer_pumps() -> None:
    data = os.urandom(32 << 20)
    limiter = RateLimiter(None)
    async with one_gpu("rate", limiter=limiter) as (dest, src):
        sender = src.sender("gpu")
        assert sender.pumps
        reader = GatedReader(data, 1 << 20)
        transfer = sender.start_pump(reader)
        loading = dest.receiver("gpu").start_sink(Collector())
        await loading.reached(1 << 20)
        limiter.set_rate(64 << 20)
        reader.gate.set()
        await transfer.done.wait()
        assert transfer.stopping and not transfer.exhausted
        assert transfer.bytes < len(data)
        assert not sender.pumps  # the rest goes through trio, paced
        await sender.end()
        await loading.done.wait()
        assert loading.exhausted and loading.bytes == transfer.bytes


async def test_a_sink_given_up_on_never_reports_its_stream_whole() -> None:
    async with one_gpu("gone") as (dest, src):
        receiver = dest.receiver("gpu")
        # A device call that ends only when the runner gives up on it.
        loading = receiver.start_sink(Waiting())
        sender = src.sender("gpu")
        await sender.send(b"z" * 4096)
        await polled(lambda: loading.in_call_s() is not None)
        loading.abandon()  # the call returns (its cancel is set)
        await sender.end()
        await loading.done.wait()
        assert isinstance(loading.error, PeerError) and not loading.exhausted
        assert not receiver.ended

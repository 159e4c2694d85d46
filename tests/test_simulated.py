"""The simulated backend: state bytes, stream, dirtying, faults, timing, registry.

Time-dependent tests take pytest-trio's ``autojump_clock`` (a MockClock that
jumps as soon as every task sleeps), so they are exact and instant.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import random
import struct
import threading
import zlib
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest
import trio
from pydantic import ValidationError

from orchestrator.backends import BACKENDS, Backend, get_backend, precise_sleep
from orchestrator.backends.simulated import (
    END_SIZE,
    FAULT_ARCS,
    HEADER_SIZE,
    MAGIC,
    RUN_HEADER_SIZE,
    FaultSpec,
    SimulatedBackend,
    SimulatedDevice,
    SimulatedParams,
    reference_digest,
)
from orchestrator.backends.simulated.discard import DiscardDevice
from orchestrator.backends.simulated.faults import arc_name
from orchestrator.errors import DeviceError, PlanError
from orchestrator.plan import problems_from_validation
from orchestrator.states import Capabilities, DeviceState, MigrationFlags, Side, arcs

S = DeviceState
KIB = 1024
MIB = 1024 * 1024
# 64 KiB of state in 4 KiB pages: 16 pages, small enough to reason about.
SMALL = 1 / 16


def state_digest_of(content: bytes, page_size: int = 4 * KIB) -> str:
    """The state digest as the module docstring defines it, computed here independently:
    sha256 over the first 16 bytes of each page's sha256."""
    pages = [content[i : i + page_size] for i in range(0, len(content), page_size)]
    return hashlib.sha256(b"".join(hashlib.sha256(p).digest()[:16] for p in pages)).hexdigest()


def make_params(**changes: Any) -> SimulatedParams:
    return SimulatedParams.model_validate({"state_mib": SMALL, **changes})


async def opened(params: SimulatedParams, side: Side = Side.SOURCE) -> SimulatedDevice:
    device = SimulatedDevice(f"dev-{side.value}", side, params)
    await device.open()
    return device


async def walk(device: SimulatedDevice, *states: DeviceState) -> None:
    for state in states:
        await device.set_state(state)
        assert await device.get_state() is state


async def drain(device: SimulatedDevice, max_bytes: int = 64 * KIB) -> bytes:
    """Read until the device has nothing more now (PRE_COPY) or ever (STOP_COPY)."""
    chunks = []
    while chunk := await device.read(max_bytes):
        assert len(chunk) <= max_bytes
        chunks.append(chunk)
    return b"".join(chunks)


def source_route(params: SimulatedParams) -> tuple[DeviceState, ...]:
    """RUNNING to STOP_COPY, through pre-copy when the device has it."""
    if params.pre_copy and params.p2p:
        return (S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY)
    if params.pre_copy:
        return (S.PRE_COPY, S.STOP_COPY)
    if params.p2p:
        return (S.RUNNING_P2P, S.STOP, S.STOP_COPY)
    return (S.STOP, S.STOP_COPY)


def destination_route(params: SimulatedParams) -> tuple[DeviceState, ...]:
    """RUNNING to RESUMING."""
    return (S.RUNNING_P2P, S.STOP, S.RESUMING) if params.p2p else (S.STOP, S.RESUMING)


def parse(stream: bytes) -> tuple[tuple[int, int], list[tuple[int, int]], tuple[int, bytes] | None]:
    """Decode a whole stream as the module docstring specifies it, checking every crc.

    Returns ((page size, state size), [(offset, length) of each page run], end).
    """
    magic, version, flags, page, size = struct.unpack_from(">4sHHIQ", stream, 0)
    assert (magic, version, flags) == (MAGIC, 1, 0)
    pos = HEADER_SIZE
    runs = []
    end = None
    while pos < len(stream):
        assert end is None, "bytes after the end record"
        if stream[pos : pos + 1] == b"P":
            _, offset, length, crc = struct.unpack_from(">cQII", stream, pos)
            payload = stream[pos + RUN_HEADER_SIZE : pos + RUN_HEADER_SIZE + length]
            assert len(payload) == length
            assert zlib.crc32(payload, zlib.crc32(stream[pos : pos + 13])) == crc
            runs.append((offset, length))
            pos += RUN_HEADER_SIZE + length
        else:
            _, mutations, digest, crc = struct.unpack_from(">cQ32sI", stream, pos)
            assert stream[pos : pos + 1] == b"E"
            assert zlib.crc32(stream[pos : pos + END_SIZE - 4]) == crc
            end = (mutations, digest)
            pos += END_SIZE
    return (page, size), runs, end


async def migrate(
    source: SimulatedDevice,
    destination: SimulatedDevice,
    *,
    precopy_rounds: int = 2,
    max_bytes: int = 64 * KIB,
) -> None:
    """Migrate by hand, streaming each chunk to the destination as it is read."""
    params = source.params
    await walk(destination, *destination_route(destination.params))
    route = source_route(params)
    if params.pre_copy:
        await walk(source, route[0])
        for _ in range(precopy_rounds):
            while chunk := await source.read(max_bytes):
                await destination.write(chunk)
            await trio.sleep(0.01)
    await walk(source, *route[1 if params.pre_copy else 0 :])
    while chunk := await source.read(max_bytes):
        await destination.write(chunk)
    await walk(destination, S.STOP)


# --- the full transfer ------------------------------------------------------------------


@pytest.mark.parametrize("pre_copy", [True, False])
@pytest.mark.parametrize("p2p", [True, False])
@pytest.mark.parametrize("dirty_mib_s", [0.0, 5.0])
async def test_full_transfer_lands_the_source_state(
    autojump_clock: trio.testing.MockClock, pre_copy: bool, p2p: bool, dirty_mib_s: float
) -> None:
    params = make_params(pre_copy=pre_copy, p2p=p2p, dirty_mib_s=dirty_mib_s, seed=7)
    source = await opened(params)
    destination = await opened(params, Side.DESTINATION)
    await trio.sleep(1.0)
    assert await source.state_digest() != await destination.state_digest()

    await migrate(source, destination)

    assert await destination.state_digest() == await source.state_digest()
    assert destination.mutations == source.mutations
    if dirty_mib_s:
        assert source.mutations > 0
    assert await source.state_digest() == reference_digest(params, source.mutations)


async def test_transfer_in_reads_smaller_than_a_record(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Records split across reads, and across writes, still land whole."""
    params = make_params(dirty_mib_s=2.0)
    source = await opened(params)
    destination = await opened(params, Side.DESTINATION)
    await trio.sleep(0.5)
    await migrate(source, destination, max_bytes=1000)
    assert await destination.state_digest() == await source.state_digest()


async def test_destination_accepts_one_byte_at_a_time() -> None:
    params = make_params(state_mib=16 / 1024)
    source = await opened(params)
    destination = await opened(params, Side.DESTINATION)
    await walk(source, S.RUNNING_P2P, S.STOP, S.STOP_COPY)
    stream = await drain(source)
    await walk(destination, S.RUNNING_P2P, S.STOP, S.RESUMING)
    for i in range(len(stream)):
        await destination.write(stream[i : i + 1])
    await walk(destination, S.STOP)
    assert await destination.state_digest() == await source.state_digest()


async def test_stream_format_without_pre_copy() -> None:
    params = make_params(pre_copy=False)
    source = await opened(params)
    await walk(source, S.RUNNING_P2P, S.STOP, S.STOP_COPY)
    (page, size), runs, end = parse(await drain(source, 1 << 20))
    assert (page, size) == (4 * KIB, 64 * KIB)
    assert runs == [(0, 64 * KIB)]  # contiguous pages coalesce into one run
    assert end == (0, bytes.fromhex(await source.state_digest()))
    assert await source.read(1 << 20) == b""  # end of stream, for ever


async def test_loaded_destination_continues_the_source_mutations(
    autojump_clock: trio.testing.MockClock,
) -> None:
    params = make_params(dirty_mib_s=1.0, seed=3)
    source = await opened(params)
    destination = await opened(params, Side.DESTINATION)
    await trio.sleep(0.3)
    await migrate(source, destination)
    await walk(destination, S.RUNNING_P2P, S.RUNNING)
    await trio.sleep(0.3)
    await destination.get_state()  # the count catches up with the clock on each call
    assert destination.mutations > source.mutations
    assert await destination.state_digest() == reference_digest(params, destination.mutations)


# --- pre-copy ---------------------------------------------------------------------------


async def test_dirty_pages_are_sent_again(autojump_clock: trio.testing.MockClock) -> None:
    params = make_params(dirty_mib_s=0.1)
    page = params.page_bytes
    source = await opened(params)
    await walk(source, S.PRE_COPY)
    sweep = await drain(source)
    info = await source.precopy_info()
    assert (info.initial_bytes, info.dirty_bytes) == (0, 0)
    _, sweep_runs, _ = parse(sweep)
    assert [offset for offset, _ in sweep_runs] == sorted(offset for offset, _ in sweep_runs)
    assert sum(length for _, length in sweep_runs) == params.state_bytes
    at_sweep = apply_pages(params, sweep)

    before = source.mutations
    await trio.sleep(0.1)  # 0.01 MiB: a few page mutations
    info = await source.precopy_info()
    assert source.mutations > before
    assert info.initial_bytes == 0
    assert 0 < info.dirty_bytes <= (source.mutations - before) * page

    again = await drain(source)
    assert (await source.precopy_info()).dirty_bytes == 0
    _, runs, end = parse(sweep + again)
    assert end is None
    resent = {
        index
        for offset, length in runs[len(sweep_runs) :]
        for index in range(offset // page, (offset + length) // page)
    }
    now = apply_pages(params, sweep + again)
    changed = {
        i
        for i in range(16)
        if now[i * page : (i + 1) * page] != at_sweep[i * page : (i + 1) * page]
    }
    assert resent == changed  # exactly the pages the device rewrote
    assert len(resent) * page == info.dirty_bytes
    assert state_digest_of(now) == await source.state_digest()


def apply_pages(params: SimulatedParams, stream: bytes) -> bytes:
    """The pages a stream carries, applied in order onto zeros (a test-side loader)."""
    content = bytearray(params.state_bytes)
    pos = HEADER_SIZE
    while pos < len(stream) and stream[pos : pos + 1] == b"P":
        _, offset, length, _crc = struct.unpack_from(">cQII", stream, pos)
        body = pos + RUN_HEADER_SIZE
        content[offset : offset + length] = stream[body : body + length]
        pos = body + length
    return bytes(content)


async def test_precopy_info_tracks_what_was_read() -> None:
    params = make_params()
    source = await opened(params)
    await walk(source, S.PRE_COPY)
    first = await source.precopy_info()
    assert first.initial_bytes == HEADER_SIZE + params.state_bytes
    assert first.dirty_bytes == 0
    read = 0
    last = first.initial_bytes
    while chunk := await source.read(3000):  # smaller than one page record: splits
        read += len(chunk)
        info = await source.precopy_info()
        assert info.dirty_bytes == 0
        assert info.initial_bytes <= last
        # What was read is the initial data that left, plus record headers.
        overhead = read - (first.initial_bytes - info.initial_bytes)
        assert 0 <= overhead <= RUN_HEADER_SIZE * 16
        last = info.initial_bytes
    assert last == 0
    assert read == HEADER_SIZE + params.state_bytes + RUN_HEADER_SIZE * 16


async def test_stop_copy_size_bounds_what_stop_copy_produces(
    autojump_clock: trio.testing.MockClock,
) -> None:
    params = make_params(dirty_mib_s=0.2)
    source = await opened(params)
    full = await source.stop_copy_size()
    assert full >= HEADER_SIZE + params.state_bytes + END_SIZE
    await walk(source, S.PRE_COPY)
    await drain(source)
    await trio.sleep(0.1)
    await walk(source, S.PRE_COPY_P2P, S.STOP_COPY)
    estimate = await source.stop_copy_size()
    assert estimate < full
    tail = await drain(source)
    assert END_SIZE < len(tail) <= estimate
    assert await source.stop_copy_size() == 0


@pytest.mark.parametrize(
    "route", [(), (S.RUNNING_P2P,), (S.RUNNING_P2P, S.STOP, S.STOP_COPY)], ids=str
)
async def test_precopy_info_only_in_pre_copy_states(route: tuple[DeviceState, ...]) -> None:
    source = await opened(make_params())
    await walk(source, *route)
    with pytest.raises(DeviceError, match="PRE_COPY") as caught:
        await source.precopy_info()
    assert caught.value.errno == errno.EINVAL


async def test_leaving_pre_copy_ends_the_stream_and_a_new_one_starts_over() -> None:
    params = make_params()
    source = await opened(params)
    await walk(source, S.PRE_COPY)
    partial = await source.read(10 * KIB)
    assert partial.startswith(MAGIC)
    await walk(source, S.RUNNING)
    with pytest.raises(DeviceError, match="no migration stream in RUNNING"):
        await source.read(1)
    await walk(source, S.PRE_COPY)
    again = await drain(source)
    assert again.startswith(MAGIC)
    assert (await source.precopy_info()).initial_bytes == 0


async def test_stopped_states_do_not_mutate(autojump_clock: trio.testing.MockClock) -> None:
    source = await opened(make_params(dirty_mib_s=10.0))
    await walk(source, S.RUNNING_P2P, S.STOP)
    digest, count = await source.state_digest(), source.mutations
    await trio.sleep(5)
    await walk(source, S.STOP_COPY)
    await trio.sleep(5)
    assert (await source.state_digest(), source.mutations) == (digest, count)


# --- rollback proof: reference_digest ---------------------------------------------------


async def test_reference_digest_proves_a_rolled_back_source_holds_its_own_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    params = make_params(dirty_mib_s=3.0, transition_ms=20, seed=11)
    source = await opened(params)
    await trio.sleep(0.5)
    await walk(source, S.PRE_COPY)
    await source.read(20 * KIB)
    await trio.sleep(0.2)
    await walk(source, S.PRE_COPY_P2P, S.STOP_COPY)
    await source.read(8 * KIB)
    await walk(source, S.STOP, S.RUNNING_P2P, S.RUNNING)
    await trio.sleep(0.5)
    await source.get_state()
    assert source.mutations > 100
    assert await source.state_digest() == reference_digest(params, source.mutations)
    # One mutation more or less would not match: the digest pins the count.
    assert await source.state_digest() != reference_digest(params, source.mutations - 1)
    initial = random.Random(11).randbytes(params.state_bytes)
    assert reference_digest(params, 0) == state_digest_of(initial)


async def test_dirtying_follows_the_clock(autojump_clock: trio.testing.MockClock) -> None:
    params = make_params(dirty_mib_s=1.0)  # 256 page mutations a second
    source = await opened(params)
    for _ in range(10):
        await trio.sleep(0.0013)  # fractions carry over
    await source.get_state()
    assert source.mutations == int(0.013 * 256)
    await trio.sleep(1 - 0.013)
    await source.get_state()
    assert source.mutations in (255, 256)


# --- reset ------------------------------------------------------------------------------


async def test_reset_loses_the_content_and_restarts_the_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    params = make_params(dirty_mib_s=1.0)
    source = await opened(params)
    await trio.sleep(0.5)
    await walk(source, S.PRE_COPY)
    await source.read(5000)
    await source.reset()
    assert await source.get_state() is S.RUNNING
    assert (source.resets, source.mutations) == (1, 0)
    assert await source.state_digest() == state_digest_of(bytes(params.state_bytes))
    with pytest.raises(DeviceError, match="no migration stream"):
        await source.read(100)
    await trio.sleep(0.5)
    await source.get_state()
    assert source.mutations > 0
    assert await source.state_digest() == reference_digest(params, source.mutations, reset=True)
    await walk(source, S.PRE_COPY)
    assert (await source.read(HEADER_SIZE)).startswith(MAGIC)  # a new stream


async def test_reset_leaves_error_and_discards_a_load() -> None:
    params = make_params(fault=FaultSpec(at="stream", offset=0, kind="error_state"))
    destination = await opened(params, Side.DESTINATION)
    await walk(destination, S.RUNNING_P2P, S.STOP, S.RESUMING)
    with pytest.raises(DeviceError, match="injected error_state fault at stream offset 0"):
        await destination.write(b"x")
    assert await destination.get_state() is S.ERROR
    with pytest.raises(DeviceError, match="only a reset leaves it"):
        await destination.set_state(S.STOP)
    with pytest.raises(DeviceError, match="loads only in RESUMING"):
        await destination.write(b"x")
    with pytest.raises(DeviceError, match="ERROR"):
        await destination.stop_copy_size()
    await destination.reset()
    assert await destination.get_state() is S.RUNNING
    assert destination.resets == 1
    # The fault fired once; a fresh load now works.
    source = await opened(make_params())
    await migrate(source, destination)
    assert await destination.state_digest() == await source.state_digest()


# --- the digest cache -------------------------------------------------------------------


def page_runs(stream: bytes, start: int = HEADER_SIZE) -> list[tuple[int, int, int]]:
    """(stream position, state offset, length) of each page run from ``start`` on."""
    runs = []
    pos = start
    while pos < len(stream) and stream[pos : pos + 1] == b"P":
        _, offset, length, _crc = struct.unpack_from(">cQII", stream, pos)
        runs.append((pos, offset, length))
        pos += RUN_HEADER_SIZE + length
    return runs


def pages_of(runs: list[tuple[int, int, int]], page: int = 4 * KIB) -> set[int]:
    return {
        i
        for _, offset, length in runs
        for i in range(offset // page, -(-(offset + length) // page))
    }


def reseal_flip(stream: bytes, state_offset: int) -> bytes:
    """Flip the byte carrying ``state_offset`` in the first run that carries it, and re-seal
    the run's crc: the stream is well formed, only a digest can tell."""
    out = bytearray(stream)
    for pos, offset, length in page_runs(stream):
        if offset <= state_offset < offset + length:
            body = pos + RUN_HEADER_SIZE
            out[body + state_offset - offset] ^= 0xFF
            crc = zlib.crc32(out[body : body + length], zlib.crc32(out[pos : pos + 13]))
            struct.pack_into(">I", out, pos + 13, crc)
            return bytes(out)
    raise AssertionError(f"no run carries state offset {state_offset}")


async def exact(device: SimulatedDevice) -> bool:
    """The device's cached digest is the one its content has now, hashed from scratch."""
    digest = await device.state_digest()  # catches up with the clock first
    return digest == state_digest_of(bytes(device._content), device.params.page_bytes)


async def test_end_digest_catches_a_flipped_byte_in_a_page_sent_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    params = make_params(state_mib=0.25, dirty_mib_s=0.5, seed=5)  # 64 pages
    page = params.page_bytes
    source = await opened(params)
    clean = await opened(params, Side.DESTINATION)
    corrupted = await opened(params, Side.DESTINATION)
    for destination in (clean, corrupted):
        await walk(destination, *destination_route(params))
    await walk(source, S.PRE_COPY)
    sweep = await drain(source)
    await trio.sleep(0.1)  # a few pages change after they were sent
    await walk(source, S.PRE_COPY_P2P, S.STOP_COPY)
    tail = await drain(source)
    resent = pages_of(page_runs(tail, 0))
    assert resent
    victim = next(i for i in range(64) if i not in resent and i > 30)
    await clean.write(sweep)
    await corrupted.write(reseal_flip(sweep, victim * page + 1234))
    for destination in (clean, corrupted):
        await destination.write(tail)
    await walk(clean, S.STOP)  # the same stream, unflipped, loads
    assert await clean.state_digest() == await source.state_digest()
    with pytest.raises(DeviceError, match="differs from the source's"):
        await corrupted.set_state(S.STOP)
    assert await corrupted.get_state() is S.ERROR
    assert await corrupted.state_digest() != await source.state_digest()
    assert await exact(corrupted)


@pytest.mark.parametrize("drop_resend", [False, True])
async def test_a_page_dirtied_after_it_was_sent_is_resent_and_checked(
    autojump_clock: trio.testing.MockClock, drop_resend: bool
) -> None:
    params = make_params(dirty_mib_s=0.1, seed=9)  # 25.6 page mutations a second
    page = params.page_bytes
    source = await opened(params)
    destination = await opened(params, Side.DESTINATION)
    await walk(destination, *destination_route(params))
    await walk(source, S.PRE_COPY)
    sweep = await drain(source)
    await destination.write(sweep)
    at_sweep = source.mutations
    await trio.sleep(0.2)
    await walk(source, S.PRE_COPY_P2P, S.STOP_COPY)
    assert source.mutations > at_sweep
    tail = await drain(source)
    runs = page_runs(tail, 0)
    # Exactly the pages that changed since the sweep come again, before the end record.
    stopped = apply_pages(params, sweep + tail)
    at_sweep_content = apply_pages(params, sweep)
    changed = {
        i
        for i in range(16)
        if stopped[i * page : (i + 1) * page] != at_sweep_content[i * page : (i + 1) * page]
    }
    assert pages_of(runs) == changed != set()
    assert state_digest_of(stopped) == await source.state_digest()
    if drop_resend:
        pos, _, length = runs[0]
        tail = tail[:pos] + tail[pos + RUN_HEADER_SIZE + length :]
        await destination.write(tail)
        with pytest.raises(DeviceError, match="differs from the source's"):
            await destination.set_state(S.STOP)
        assert await destination.get_state() is S.ERROR
    else:
        await destination.write(tail)
        await walk(destination, S.STOP)
        assert await destination.state_digest() == await source.state_digest()
        assert await source.state_digest() == reference_digest(params, source.mutations)
    assert await exact(destination)


async def test_digest_cache_stays_exact_across_reset_and_a_second_migration(
    autojump_clock: trio.testing.MockClock,
) -> None:
    params = make_params(dirty_mib_s=2.0, seed=4)
    source = await opened(params)
    destination = await opened(params, Side.DESTINATION)
    await trio.sleep(0.3)
    await migrate(source, destination)
    assert await destination.state_digest() == await source.state_digest()
    await walk(destination, S.RUNNING_P2P, S.RUNNING)
    await trio.sleep(0.2)
    for device in (source, destination):
        assert await exact(device)
        await device.reset()
        assert await device.state_digest() == state_digest_of(bytes(params.state_bytes))
    await trio.sleep(0.3)
    for device in (source, destination):
        await device.get_state()
        assert device.mutations > 0
        assert await device.state_digest() == reference_digest(params, device.mutations, reset=True)
        assert await exact(device)

    await migrate(source, destination)  # the second migration, from reset content
    assert await destination.state_digest() == await source.state_digest()
    assert await source.state_digest() == reference_digest(params, source.mutations, reset=True)
    await walk(destination, S.RUNNING_P2P, S.RUNNING)
    await trio.sleep(0.2)
    await destination.get_state()
    assert destination.mutations > source.mutations
    assert await destination.state_digest() == reference_digest(
        params, destination.mutations, reset=True
    )
    for device in (source, destination):
        assert await exact(device)


@pytest.mark.parametrize("state_mib", [SMALL, 4.0], ids=["16-pages", "1024-pages"])
async def test_switchover_hashes_only_the_pages_it_moves(
    autojump_clock: trio.testing.MockClock, state_mib: float
) -> None:
    """Entering STOP_COPY and RESUMING -> STOP hash nothing; the pages re-sent in stop-copy
    are hashed once on each side, whatever the size of the state."""
    params = make_params(state_mib=state_mib, dirty_mib_s=0.1, seed=2)
    n_pages = params.state_bytes // params.page_bytes
    source = await opened(params)
    destination = await opened(params, Side.DESTINATION)
    assert (source.pages_hashed, destination.pages_hashed) == (n_pages, 0)  # at open
    await walk(destination, *destination_route(params))
    await trio.sleep(0.2)  # some pages change before the sweep
    await walk(source, S.PRE_COPY)
    sweep = await drain(source)
    await destination.write(sweep)
    initial = random.Random(2).randbytes(params.state_bytes)
    swept = apply_pages(params, sweep)
    page = params.page_bytes
    early = sum(
        swept[i * page : (i + 1) * page] != initial[i * page : (i + 1) * page]
        for i in range(n_pages)
    )
    assert early > 0
    # The sweep rehashed on the source the pages that changed since open, the destination
    # hashed every page as it landed.
    assert (source.pages_hashed, destination.pages_hashed) == (n_pages + early, n_pages)
    hashed_before_stop = source.pages_hashed
    at_sweep = source.mutations
    await trio.sleep(0.2)

    await walk(source, S.PRE_COPY_P2P, S.STOP_COPY)
    assert source.pages_hashed == hashed_before_stop  # entering STOP_COPY hashes nothing
    tail = await drain(source)
    resent = len(pages_of(page_runs(tail, 0)))
    assert 0 < resent <= source.mutations - at_sweep <= 10
    # The re-sent pages, hashed as they leave; the end record has nothing left to hash.
    assert source.pages_hashed == hashed_before_stop + resent
    await destination.write(tail)
    assert destination.pages_hashed == n_pages + resent  # hashed as they land
    await walk(destination, S.STOP)
    assert destination.pages_hashed == n_pages + resent  # the verdict hashes nothing
    assert await destination.state_digest() == await source.state_digest()
    assert await source.state_digest() == reference_digest(params, source.mutations)
    assert source.pages_hashed == hashed_before_stop + resent
    assert destination.pages_hashed == n_pages + resent


async def test_digest_of_a_partial_last_page_and_of_the_initial_content() -> None:
    # 2.5 MiB + 6 KiB in 8 KiB pages: several generation chunks and a partial last page.
    params = make_params(state_mib=2.5 + 6 / 1024, page_kib=8, seed=21)
    size, page = params.state_bytes, params.page_bytes
    assert size % page == 6 * KIB
    source = await opened(params)
    destination = await opened(params, Side.DESTINATION)
    expected = state_digest_of(random.Random(21).randbytes(size), page)
    assert await source.state_digest() == reference_digest(params, 0) == expected
    other = random.Random("simulated:DESTINATION:21").randbytes(size)
    assert await destination.state_digest() == state_digest_of(other, page)
    await migrate(source, destination)
    assert await destination.state_digest() == expected
    await source.reset()
    assert await source.state_digest() == state_digest_of(bytes(size), page)
    assert await source.state_digest() == reference_digest(params, 0, reset=True)


# --- arcs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "route", "target"),
    [
        ({}, (), S.STOP),  # a P2P device passes RUNNING_P2P
        ({}, (), S.STOP_COPY),
        ({}, (), S.ERROR),
        ({}, (S.RUNNING_P2P,), S.RUNNING_P2P),
        ({}, (S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY), S.PRE_COPY_P2P),
        ({}, (S.RUNNING_P2P, S.STOP), S.RUNNING),
        ({"pre_copy": False}, (), S.PRE_COPY),
        ({"p2p": False}, (), S.RUNNING_P2P),
        ({"p2p": False}, (S.PRE_COPY,), S.PRE_COPY_P2P),
    ],
)
async def test_a_request_that_is_not_one_arc_is_refused(
    changes: dict[str, Any], route: tuple[DeviceState, ...], target: DeviceState
) -> None:
    device = await opened(make_params(**changes))
    await walk(device, *route)
    before = await device.get_state()
    with pytest.raises(DeviceError) as caught:
        await device.set_state(target)
    assert caught.value.errno == errno.EINVAL
    assert f"{before.name} -> {target.name} is not one arc" in str(caught.value)
    assert caught.value.target == target.name
    assert await device.get_state() is before


# --- faults at a state ------------------------------------------------------------------


@pytest.mark.parametrize("side", [Side.SOURCE, Side.DESTINATION])
@pytest.mark.parametrize("kind", ["error", "error_state"])
async def test_error_faults_at_a_state(side: Side, kind: str) -> None:
    at = S.STOP_COPY if side is Side.SOURCE else S.RESUMING
    params = make_params(fault={"at": at.name.lower(), "kind": kind})
    device = await opened(params, side)
    route = source_route(params) if side is Side.SOURCE else destination_route(params)
    await walk(device, *route[:-1])
    before = await device.get_state()
    with pytest.raises(DeviceError, match=f"injected {kind} fault at entering {at.name}") as e:
        await device.set_state(at)
    assert e.value.errno == errno.EIO
    assert e.value.operation == "set_state"
    if kind == "error":
        assert await device.get_state() is before
        await walk(device, at)  # once: the retry succeeds
    else:
        assert await device.get_state() is S.ERROR
    assert device.fault is None


async def test_a_repeating_fault_fires_every_time() -> None:
    params = make_params(fault={"at": "PRE_COPY", "kind": "error", "once": False})
    device = await opened(params)
    for _ in range(3):
        with pytest.raises(DeviceError, match="injected error"):
            await device.set_state(S.PRE_COPY)
        assert await device.get_state() is S.RUNNING
    assert device.fault is not None


@pytest.mark.parametrize("side", [Side.SOURCE, Side.DESTINATION])
async def test_hang_at_a_state_never_returns(
    autojump_clock: trio.testing.MockClock, side: Side
) -> None:
    at = S.PRE_COPY_P2P if side is Side.SOURCE else S.RESUMING
    params = make_params(fault={"at": at.name, "kind": "hang"}, transition_ms=5)
    device = await opened(params, side)
    route = source_route(params) if side is Side.SOURCE else destination_route(params)
    await walk(device, *route[: route.index(at)])
    before = await device.get_state()
    start = trio.current_time()
    with pytest.raises(trio.TooSlowError), trio.fail_after(3600):
        await device.set_state(at)
    assert trio.current_time() - start == pytest.approx(3600)
    assert await device.get_state() is before
    await walk(device, at)  # the hang fired once


async def test_corrupt_at_a_source_state_fails_the_load() -> None:
    # The first byte after entering STOP_COPY is the end record's tag.
    params = make_params(fault={"at": "STOP_COPY", "kind": "corrupt"})
    source = await opened(params)
    destination = await opened(params, Side.DESTINATION)
    await walk(destination, *destination_route(params))
    await walk(source, S.PRE_COPY)
    sweep = await drain(source)
    await destination.write(sweep)
    await walk(source, S.PRE_COPY_P2P, S.STOP_COPY)
    tail = await drain(source)
    assert tail[:1] == bytes([ord("E") ^ 0xFF])
    with pytest.raises(DeviceError, match=f"bad record at stream offset {len(sweep)}"):
        await destination.write(tail)
    assert await destination.get_state() is S.RESUMING  # poisoned, still resuming
    with pytest.raises(DeviceError, match="bad record"):
        await destination.write(b"")
    with pytest.raises(DeviceError, match="load failed: bad record") as caught:
        await destination.set_state(S.STOP)
    assert caught.value.target == "STOP"
    assert await destination.get_state() is S.ERROR


async def test_corrupt_at_resuming_fails_the_load() -> None:
    params = make_params()
    source = await opened(params)
    destination = await opened(
        params.model_copy(update={"fault": FaultSpec(at="RESUMING", kind="corrupt")}),
        Side.DESTINATION,
    )
    await walk(source, S.RUNNING_P2P, S.STOP, S.STOP_COPY)
    stream = await drain(source)
    await walk(destination, *destination_route(params))
    with pytest.raises(DeviceError, match="stream offset 0: bad magic"):
        await destination.write(stream)
    with pytest.raises(DeviceError, match="load failed"):
        await destination.set_state(S.STOP)
    assert await destination.get_state() is S.ERROR


async def test_fault_at_a_state_with_an_offset_arms_on_entry() -> None:
    params = make_params(fault={"at": "STOP_COPY", "kind": "error", "offset": 100})
    source = await opened(params)
    await walk(source, S.PRE_COPY)
    await drain(source)  # covers byte 100 before STOP_COPY: nothing fires
    await walk(source, S.PRE_COPY_P2P, S.STOP_COPY, S.STOP, S.STOP_COPY)
    position = 0
    while position < 100:  # bytes 0..99 of the new stream
        position += len(await source.read(100 - position))
    with pytest.raises(DeviceError, match="stream offset 100"):
        await source.read(10)
    assert len(await drain(source)) > 0


# --- faults at an arc ------------------------------------------------------------------


async def loaded_destination(params: SimulatedParams) -> SimulatedDevice:
    """A destination in RESUMING holding a whole stream: RESUMING -> STOP will succeed."""
    source = await opened(make_params())
    await walk(source, S.RUNNING_P2P, S.STOP, S.STOP_COPY)
    destination = await opened(params, Side.DESTINATION)
    await walk(destination, S.RUNNING_P2P, S.STOP, S.RESUMING)
    await destination.write(await drain(source))
    return destination


@pytest.mark.parametrize("kind", ["error", "error_state"])
async def test_a_fault_at_a_post_load_arc_fires_on_that_arc_only(kind: str) -> None:
    # RESUMING -> STOP: the walk to RESUMING enters STOP from RUNNING_P2P first.
    destination = await loaded_destination(
        make_params(fault={"at": "Resuming -> Stop", "kind": kind})
    )
    with pytest.raises(
        DeviceError, match=f"injected {kind} fault at entering STOP from RESUMING"
    ) as e:
        await destination.set_state(S.STOP)
    assert (e.value.errno, e.value.operation, e.value.target) == (errno.EIO, "set_state", "STOP")
    assert destination.fault is None
    if kind == "error":
        assert await destination.get_state() is S.RESUMING
        await walk(destination, S.STOP, S.RUNNING_P2P, S.RUNNING)  # once: the retry loads
    else:
        assert await destination.get_state() is S.ERROR


async def test_a_fault_at_stop_to_running_p2p_spares_the_walk_to_resuming() -> None:
    destination = await loaded_destination(
        make_params(fault={"at": "STOP->RUNNING_P2P", "kind": "error", "once": False})
    )
    await walk(destination, S.STOP)
    for _ in range(2):  # not once: every time the arc is taken
        with pytest.raises(DeviceError, match="at entering RUNNING_P2P from STOP"):
            await destination.set_state(S.RUNNING_P2P)
        assert await destination.get_state() is S.STOP
    assert destination.fault is not None


async def test_another_arc_into_the_state_does_not_fire_an_arc_fault() -> None:
    params = make_params(fault={"at": "PRE_COPY_P2P->RUNNING_P2P", "kind": "error"})
    source = await opened(params)
    # RUNNING -> RUNNING_P2P enters the same state by another arc.
    await walk(source, S.RUNNING_P2P, S.PRE_COPY_P2P)
    with pytest.raises(DeviceError, match="at entering RUNNING_P2P from PRE_COPY_P2P"):
        await source.set_state(S.RUNNING_P2P)
    assert await source.get_state() is S.PRE_COPY_P2P
    await walk(source, S.RUNNING_P2P, S.RUNNING, S.RUNNING_P2P)


async def test_a_state_fault_still_fires_on_any_arc_into_the_state() -> None:
    params = make_params(fault={"at": "RUNNING_P2P", "kind": "error", "once": False})
    source = await opened(params)
    with pytest.raises(DeviceError, match="at entering RUNNING_P2P from RUNNING"):
        await source.set_state(S.RUNNING_P2P)
    await walk(source, S.PRE_COPY, S.PRE_COPY_P2P)
    with pytest.raises(DeviceError, match="at entering RUNNING_P2P from PRE_COPY_P2P"):
        await source.set_state(S.RUNNING_P2P)


async def test_hang_at_an_arc_never_returns(autojump_clock: trio.testing.MockClock) -> None:
    destination = await loaded_destination(
        make_params(fault={"at": "RESUMING->STOP", "kind": "hang"}, transition_ms=5)
    )
    with pytest.raises(trio.TooSlowError), trio.fail_after(60):
        await destination.set_state(S.STOP)
    assert await destination.get_state() is S.RESUMING
    await walk(destination, S.STOP)  # the hang fired once; the load is intact


async def test_an_arc_fault_with_an_offset_arms_when_that_arc_is_taken() -> None:
    params = make_params(fault={"at": "STOP->STOP_COPY", "kind": "error", "offset": 100})
    source = await opened(params)
    await walk(source, S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY)  # into STOP_COPY, another arc
    await drain(source)  # covers byte 100: nothing armed, nothing fires
    await walk(source, S.STOP, S.STOP_COPY)  # this arc arms byte 100 of the new stream
    position = 0
    while position < 100:
        position += len(await source.read(100 - position))
    with pytest.raises(DeviceError, match="stream offset 100"):
        await source.read(10)
    assert len(await drain(source)) > 0


async def test_corrupt_at_an_arc_flips_the_next_byte() -> None:
    params = make_params(fault={"at": "STOP->STOP_COPY", "kind": "corrupt"})
    source = await opened(params)
    await walk(source, S.RUNNING_P2P, S.STOP, S.STOP_COPY)
    assert (await drain(source))[:1] == bytes([MAGIC[0] ^ 0xFF])


# --- delays -----------------------------------------------------------------------------


async def timed_arc(device: SimulatedDevice, target: DeviceState) -> float:
    start = trio.current_time()
    await device.set_state(target)
    assert await device.get_state() is target
    return trio.current_time() - start


@pytest.mark.parametrize("transition_ms", [0, 5])
async def test_a_delay_at_an_arc_adds_exactly_delay_ms_once(
    autojump_clock: trio.testing.MockClock, transition_ms: float
) -> None:
    fault = {"at": "RUNNING -> RUNNING_P2P", "kind": "delay", "delay_ms": 250}
    source = await opened(make_params(fault=fault, transition_ms=transition_ms))
    latency = transition_ms / 1000
    assert await timed_arc(source, S.RUNNING_P2P) == pytest.approx(latency + 0.25, abs=1e-9)
    assert source.fault is None
    for state in (S.RUNNING, S.RUNNING_P2P, S.PRE_COPY_P2P, S.RUNNING_P2P):
        assert await timed_arc(source, state) == pytest.approx(latency, abs=1e-9)


async def test_a_repeating_delay_at_a_state_lengthens_every_arc_into_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fault = {"at": "running_p2p", "kind": "delay", "delay_ms": 40, "once": False}
    source = await opened(make_params(fault=fault, transition_ms=1))
    assert await timed_arc(source, S.RUNNING_P2P) == pytest.approx(0.041, abs=1e-9)
    assert await timed_arc(source, S.PRE_COPY_P2P) == pytest.approx(0.001, abs=1e-9)
    assert await timed_arc(source, S.RUNNING_P2P) == pytest.approx(0.041, abs=1e-9)
    assert await timed_arc(source, S.STOP) == pytest.approx(0.001, abs=1e-9)
    assert source.fault is not None


async def test_a_delay_is_the_arcs_one_precise_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    import orchestrator.backends.simulated.device as device_module

    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await precise_sleep.sleep(seconds)

    monkeypatch.setattr(device_module, "_sleep", sleep)
    fault = {"at": "RUNNING->RUNNING_P2P", "kind": "delay", "delay_ms": 2}
    source = await opened(make_params(fault=fault, transition_ms=1))
    with one_checkpoint():
        await source.set_state(S.RUNNING_P2P)
    assert slept == [pytest.approx(0.003)]
    fault["delay_ms"] = 3
    source = await opened(make_params(fault=fault))  # no latency: the delay is the sleep
    with one_checkpoint():
        await source.set_state(S.RUNNING_P2P)
    assert slept[1:] == [pytest.approx(0.003)]


async def test_a_delay_is_cancelled_by_the_callers_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fault = {"at": "RESUMING->STOP", "kind": "delay", "delay_ms": 5000}
    destination = await loaded_destination(make_params(fault=fault, transition_ms=2))
    start = trio.current_time()
    with trio.move_on_after(1) as scope:
        await destination.set_state(S.STOP)
    assert scope.cancelled_caught
    assert trio.current_time() - start == pytest.approx(1)
    assert await destination.get_state() is S.RESUMING  # the arc did not happen
    assert destination.fault is None  # and the delay is spent, as a cancelled hang is
    assert await timed_arc(destination, S.STOP) == pytest.approx(0.002, abs=1e-9)


async def test_a_refused_arc_does_not_spend_a_delay(autojump_clock: trio.testing.MockClock) -> None:
    source = await opened(make_params(fault={"at": "STOP", "kind": "delay", "delay_ms": 7}))
    with one_checkpoint(), pytest.raises(DeviceError, match="not one arc"):
        await source.set_state(S.STOP)  # RUNNING -> STOP: a P2P device has no such arc
    assert source.fault is not None
    await walk(source, S.RUNNING_P2P)
    assert await timed_arc(source, S.STOP) == pytest.approx(0.007, abs=1e-9)


# --- faults at a stream offset ----------------------------------------------------------


async def _stream_fault_pair(
    side: Side, kind: str, offset: int, *, once: bool = True, **changes: Any
) -> tuple[SimulatedDevice, SimulatedDevice]:
    params = make_params(**changes)
    fault = {"at": "stream", "kind": kind, "offset": offset, "once": once}
    faulty = params.model_copy(update={"fault": FaultSpec.model_validate(fault)})
    source = await opened(faulty if side is Side.SOURCE else params)
    destination = await opened(faulty if side is Side.DESTINATION else params, Side.DESTINATION)
    await walk(destination, *destination_route(params))
    await walk(source, S.RUNNING_P2P, S.STOP, S.STOP_COPY)
    return source, destination


async def _pump(source: SimulatedDevice, destination: SimulatedDevice, max_bytes: int) -> None:
    await Pump().run(source, destination, max_bytes)


class Pump:
    """Source to destination, remembering how far it got when a call fails."""

    def __init__(self) -> None:
        self.sent = 0  # bytes the destination accepted
        self.in_flight = b""  # read from the source, not accepted by the destination

    async def run(self, source: SimulatedDevice, destination: SimulatedDevice, size: int) -> None:
        while chunk := await source.read(size):
            self.in_flight = chunk
            await destination.write(chunk)
            self.in_flight = b""
            self.sent += len(chunk)


@pytest.mark.parametrize("side", [Side.SOURCE, Side.DESTINATION])
async def test_error_at_a_stream_offset_then_the_retry_goes_on(side: Side) -> None:
    offset = 10_000
    source, destination = await _stream_fault_pair(side, "error", offset)
    pump = Pump()
    with pytest.raises(DeviceError, match=f"stream offset {offset}") as caught:
        await pump.run(source, destination, 4000)
    assert caught.value.operation == ("read" if side is Side.SOURCE else "write")
    assert pump.sent <= offset < pump.sent + 4000
    if side is Side.DESTINATION:
        # The failed write consumed nothing: the writer sends the same bytes again.
        await destination.write(pump.in_flight)
    await _pump(source, destination, 4000)
    await walk(destination, S.STOP)
    assert await destination.state_digest() == await source.state_digest()


@pytest.mark.parametrize("side", [Side.SOURCE, Side.DESTINATION])
async def test_repeating_stream_fault_blocks_the_stream(side: Side) -> None:
    source, destination = await _stream_fault_pair(side, "error", 5, once=False)
    data = await source.read(64) if side is Side.DESTINATION else b""
    for _ in range(3):
        call = source.read(64) if side is Side.SOURCE else destination.write(data)
        with pytest.raises(DeviceError, match="stream offset 5"):
            await call


@pytest.mark.parametrize("side", [Side.SOURCE, Side.DESTINATION])
async def test_error_state_at_a_stream_offset(side: Side) -> None:
    source, destination = await _stream_fault_pair(side, "error_state", 30_000)
    with pytest.raises(DeviceError, match="error_state fault at stream offset 30000"):
        await _pump(source, destination, 8000)
    faulty = source if side is Side.SOURCE else destination
    assert await faulty.get_state() is S.ERROR
    with pytest.raises(DeviceError):
        await (faulty.read(10) if side is Side.SOURCE else faulty.write(b"x"))


@pytest.mark.parametrize("side", [Side.SOURCE, Side.DESTINATION])
async def test_hang_at_a_stream_offset_loses_nothing(
    autojump_clock: trio.testing.MockClock, side: Side
) -> None:
    source, destination = await _stream_fault_pair(side, "hang", 20_000)
    pump = Pump()
    with pytest.raises(trio.TooSlowError), trio.fail_after(60):
        await pump.run(source, destination, 8000)
    assert pump.sent <= 20_000
    if side is Side.DESTINATION:  # the hung write consumed none of its chunk
        await destination.write(pump.in_flight)
    await _pump(source, destination, 8000)
    await walk(destination, S.STOP)
    assert await destination.state_digest() == await source.state_digest()


async def test_corrupt_at_a_stream_offset_flips_exactly_that_byte() -> None:
    offset = 12_345
    clean, _ = await _stream_fault_pair(Side.DESTINATION, "error", 0)  # the source is clean
    faulty, destination = await _stream_fault_pair(Side.SOURCE, "corrupt", offset)
    expected = await drain(clean, 5000)
    got = await drain(faulty, 5000)
    assert len(got) == len(expected)
    diff = [i for i in range(len(got)) if got[i] != expected[i]]
    assert diff == [offset]
    assert got[offset] == expected[offset] ^ 0xFF
    with pytest.raises(DeviceError, match="crc mismatch in page run") as caught:
        await destination.write(got)
    record_start = int(str(caught.value).split("stream offset ")[1].split(":")[0])
    assert record_start <= offset < record_start + RUN_HEADER_SIZE + 64 * KIB
    with pytest.raises(DeviceError, match="load failed"):
        await destination.set_state(S.STOP)
    assert await destination.get_state() is S.ERROR


async def test_corrupt_at_a_stream_offset_on_the_destination() -> None:
    source, destination = await _stream_fault_pair(Side.DESTINATION, "corrupt", 40_000)
    with pytest.raises(DeviceError, match="crc mismatch"):
        await _pump(source, destination, 7000)
    with pytest.raises(DeviceError, match="load failed"):
        await destination.set_state(S.STOP)
    assert await destination.get_state() is S.ERROR


async def test_a_corrupt_digest_is_caught_at_stop() -> None:
    """Flipping a byte of the end record's digest fails its crc; check the digest path too."""
    params = make_params()
    source = await opened(params)
    destination = await opened(params, Side.DESTINATION)
    await walk(source, S.RUNNING_P2P, S.STOP, S.STOP_COPY)
    stream = bytearray(await drain(source))
    await walk(destination, *destination_route(params))
    # Re-seal a wrong digest with a valid crc: only the digest comparison can tell.
    end = len(stream) - END_SIZE
    stream[end + 9] ^= 0xFF
    stream[-4:] = struct.pack(">I", zlib.crc32(bytes(stream[end:-4])))
    await destination.write(bytes(stream))
    with pytest.raises(DeviceError, match="differs from the source's"):
        await destination.set_state(S.STOP)
    assert await destination.get_state() is S.ERROR


async def test_an_incomplete_stream_is_refused_at_stop() -> None:
    params = make_params()
    source = await opened(params)
    destination = await opened(params, Side.DESTINATION)
    await walk(source, S.RUNNING_P2P, S.STOP, S.STOP_COPY)
    stream = await drain(source)
    await walk(destination, *destination_route(params))
    await destination.write(stream[:-END_SIZE])
    with pytest.raises(DeviceError, match="no end record"):
        await destination.set_state(S.STOP)
    assert await destination.get_state() is S.ERROR


async def test_a_stream_of_another_size_is_refused() -> None:
    source = await opened(make_params(state_mib=2 * SMALL))
    destination = await opened(make_params(), Side.DESTINATION)
    await walk(source, S.RUNNING_P2P, S.STOP, S.STOP_COPY)
    await walk(destination, S.RUNNING_P2P, S.STOP, S.RESUMING)
    with pytest.raises(DeviceError, match="stream of 131072 bytes"):
        await destination.write(await source.read(100))


async def test_write_only_in_resuming_read_only_while_saving() -> None:
    device = await opened(make_params(), Side.DESTINATION)
    with pytest.raises(DeviceError, match="loads only in RESUMING, not RUNNING") as caught:
        await device.write(b"abc")
    assert caught.value.errno == errno.EINVAL
    await walk(device, S.RUNNING_P2P, S.STOP, S.RESUMING)
    with pytest.raises(DeviceError, match="no migration stream in RESUMING"):
        await device.read(10)
    source = await opened(make_params())
    await walk(source, S.PRE_COPY)
    with pytest.raises(DeviceError, match="max_bytes must be positive"):
        await source.read(0)


# --- timing -----------------------------------------------------------------------------


async def test_each_arc_takes_transition_ms(autojump_clock: trio.testing.MockClock) -> None:
    device = await opened(make_params(transition_ms=250))
    start = trio.current_time()
    await walk(device, S.RUNNING_P2P, S.STOP)
    assert trio.current_time() - start == pytest.approx(0.5)
    start = trio.current_time()
    with pytest.raises(DeviceError):
        await device.set_state(S.PRE_COPY)  # refused at once, no latency
    await device.reset()
    assert trio.current_time() - start == pytest.approx(0.25)


async def test_cancelled_arc_leaves_the_state(autojump_clock: trio.testing.MockClock) -> None:
    device = await opened(make_params(transition_ms=1000))
    with trio.move_on_after(0.5):
        await device.set_state(S.RUNNING_P2P)
    assert await device.get_state() is S.RUNNING


async def test_stream_moves_at_drain_mib_s(autojump_clock: trio.testing.MockClock) -> None:
    params = make_params(state_mib=1.0, drain_mib_s=4.0)
    source = await opened(params)
    destination = await opened(params, Side.DESTINATION)
    await walk(source, S.RUNNING_P2P, S.STOP, S.STOP_COPY)
    await walk(destination, S.RUNNING_P2P, S.STOP, S.RESUMING)
    start = trio.current_time()
    stream = await drain(source, 256 * KIB)
    read_time = trio.current_time() - start
    assert read_time == pytest.approx(len(stream) / (4 * MIB))
    start = trio.current_time()
    await destination.write(stream)
    assert trio.current_time() - start == pytest.approx(len(stream) / (4 * MIB))


async def test_a_cancelled_read_loses_nothing(autojump_clock: trio.testing.MockClock) -> None:
    params = make_params(drain_mib_s=0.1)
    source = await opened(params)
    destination = await opened(params, Side.DESTINATION)
    await walk(source, S.RUNNING_P2P, S.STOP, S.STOP_COPY)
    with trio.move_on_after(0.01) as scope:
        await source.read(16 * KIB)
    assert scope.cancelled_caught
    await walk(destination, *destination_route(params))
    await _pump(source, destination, 16 * KIB)
    await walk(destination, S.STOP)
    assert await destination.state_digest() == await source.state_digest()


@contextlib.contextmanager
def one_checkpoint() -> Iterator[None]:
    """The block is exactly one trio checkpoint: one schedule point and one cancel point
    (the task counters ``trio.testing.assert_checkpoints`` reads)."""
    task = trio.lowlevel.current_task()
    cancel, schedule = task._cancel_points, task._schedule_points
    yield
    assert (task._cancel_points - cancel, task._schedule_points - schedule) == (1, 1)


@pytest.mark.parametrize("delays", [False, True], ids=["instant", "with-latency"])
async def test_every_call_is_one_checkpoint(
    autojump_clock: trio.testing.MockClock, delays: bool
) -> None:
    """A call's latency (a transition or a drain) is its checkpoint; there is no other."""
    changes: dict[str, Any] = {"transition_ms": 1, "drain_mib_s": 1.0} if delays else {}
    params = make_params(**changes)
    source = await opened(params)
    destination = await opened(params, Side.DESTINATION)

    async def refused(call: Awaitable[object]) -> None:
        with one_checkpoint(), pytest.raises(DeviceError):
            await call

    for device in (source, destination):
        with one_checkpoint():
            await device.get_state()
        with one_checkpoint():
            await device.stop_copy_size()
        await refused(device.set_state(S.STOP_COPY))  # not one arc
        await refused(device.read(100))  # no stream
        await refused(device.write(b"x"))  # not resuming
        await refused(device.precopy_info())
    for state in (S.RUNNING_P2P, S.STOP, S.STOP_COPY):
        with one_checkpoint():
            await source.set_state(state)
    for state in (S.RUNNING_P2P, S.STOP, S.RESUMING):
        with one_checkpoint():
            await destination.set_state(state)
    await refused(source.read(0))
    while True:
        with one_checkpoint():
            chunk = await source.read(10 * KIB)
        with one_checkpoint():
            await destination.write(chunk)  # b"" at the end: still a checkpoint
        if not chunk:
            break
    with one_checkpoint():
        await destination.set_state(S.STOP)
    await walk(source, S.STOP, S.RUNNING_P2P, S.RUNNING, S.PRE_COPY)
    with one_checkpoint():
        await source.precopy_info()
    for device in (source, destination):
        with one_checkpoint():
            await device.reset()
        with one_checkpoint():
            await device.state_digest()
        with one_checkpoint():
            await device.close()
        await refused(device.get_state())  # closed
        await refused(device.set_state(S.RUNNING_P2P))
        await refused(device.reset())
    assert await destination.state_digest() == await source.state_digest()


# --- lifecycle --------------------------------------------------------------------------


async def test_open_reports_capabilities_and_close_ends_use() -> None:
    device = SimulatedDevice("d", Side.SOURCE, make_params(p2p=False))
    with pytest.raises(DeviceError, match="not open") as caught:
        await device.get_state()
    assert caught.value.errno == errno.EBADF
    with pytest.raises(DeviceError, match="not open"):
        await device.state_digest()
    capabilities = await device.open()
    assert capabilities == Capabilities(
        MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY,
        stop_copy_size=True,
        precopy_reinit=True,  # the simulator's default: it may report new initial data
    )
    assert await device.open() == capabilities  # idempotent
    digest = await device.state_digest()
    await device.close()
    await device.close()
    for call in (device.get_state(), device.set_state(S.STOP), device.read(1), device.reset()):
        with pytest.raises(DeviceError, match="closed"):
            await call
    with pytest.raises(DeviceError, match="closed"):
        await device.open()
    assert await device.state_digest() == digest  # still answers, for tests
    never_opened = SimulatedDevice("n", Side.SOURCE, make_params())
    await never_opened.close()
    with pytest.raises(DeviceError, match="not open"):
        await never_opened.get_state()


# --- params -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"state_mib": 0}, "greater than 0"),
        ({"state_mib": 5000}, "less than or equal to 4096"),
        ({"state_mib": float("nan")}, "finite number"),
        ({"page_kib": 3}, "power of two"),
        ({"page_kib": 2048}, "less than or equal to 1024"),
        ({"dirty_mib_s": -1}, "greater than or equal to 0"),
        ({"drain_mib_s": 0}, "greater than 0"),
        ({"colour": "red"}, "Extra inputs are not permitted"),
        (
            {"fault": {"at": "bogus", "kind": "error"}},
            r"expected 'stream', a state \(STOP, RUNNING",
        ),
        ({"fault": {"at": "error", "kind": "error"}}, "cannot be injected at ERROR"),
        ({"fault": {"at": "stream", "kind": "hang"}}, "needs offset"),
        ({"fault": {"at": "STOP", "kind": "explode"}}, "'error', 'error_state', 'hang'"),
        ({"fault": {"at": "stream", "kind": "hang", "offset": -1}}, "greater than or equal"),
        ({"fault": {"at": "STOP", "kind": "error", "when": 1}}, "Extra inputs"),
        ({"fault": {"at": "STOP->ERROR", "kind": "error"}}, "cannot be injected at an arc into"),
        ({"fault": {"at": "ERROR->STOP", "kind": "error"}}, "only a reset leaves it"),
        ({"fault": {"at": "STOP -> nowhere", "kind": "error"}}, "unknown fault point"),
        ({"fault": {"at": "->STOP", "kind": "error"}}, "unknown fault point"),
        ({"fault": {"at": "STOP", "kind": "delay", "delay_ms": 0}}, "greater than 0"),
        ({"fault": {"at": "STOP", "kind": "delay", "delay_ms": float("inf")}}, "finite"),
        ({"fault": {"at": "stream", "kind": "delay", "delay_ms": 1}}, "cannot be at 'stream'"),
        ({"fault": {"at": "STOP", "kind": "delay", "delay_ms": 1, "offset": 0}}, "no offset"),
    ],
)
def test_params_validation_errors_are_clear(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SimulatedParams.model_validate(raw)


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        (
            {"at": "RUNNING->RESUMING", "kind": "error"},
            "fault.at",
            "'RUNNING->RESUMING' is not one arc of the state model: expected one of "
            + ", ".join(FAULT_ARCS),
        ),
        (
            {"at": "RESUMING->STOP", "kind": "delay"},
            "fault.delay_ms",
            "kind = 'delay' needs delay_ms",
        ),
        (
            {"at": "RESUMING->STOP", "kind": "hang", "delay_ms": 5},
            "fault.delay_ms",
            "delay_ms applies only to kind = 'delay', not kind = 'hang'",
        ),
    ],
)
def test_fault_validation_errors_name_the_field(
    raw: dict[str, Any], path: str, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        SimulatedParams.model_validate({"fault": raw})
    [problem] = problems_from_validation(caught.value, "devices[0].destination")
    assert problem.path == f"devices[0].destination.{path}"
    assert message in problem.message


def test_the_fault_arcs_are_every_arc_of_the_state_model() -> None:
    every = {
        arc_name(start, end)
        for flags in range(8)
        if flags & MigrationFlags.STOP_COPY
        for start, ends in arcs(MigrationFlags(flags)).items()
        for end in ends
    }
    assert set(FAULT_ARCS) == every and len(FAULT_ARCS) == len(every)
    assert {"RESUMING->STOP", "STOP->RUNNING_P2P", "RUNNING->STOP"} <= every
    assert not any("ERROR" in arc for arc in FAULT_ARCS)


def test_an_arc_the_device_lacks_is_refused() -> None:
    # RUNNING_P2P->STOP exists only with P2P; RUNNING->STOP only without.
    with pytest.raises(ValidationError, match=r"not an arc of this device \(p2p = false") as caught:
        SimulatedParams.model_validate(
            {"p2p": False, "fault": {"at": "RUNNING_P2P->STOP", "kind": "error"}}
        )
    assert "whose arcs are STOP->RUNNING, " in str(caught.value)
    with pytest.raises(ValidationError, match=r"not an arc of this device \(p2p = true"):
        SimulatedParams.model_validate({"fault": {"at": "RUNNING->STOP", "kind": "error"}})
    assert SimulatedParams.model_validate(
        {"p2p": False, "fault": {"at": "running->stop", "kind": "error"}}
    ).fault == FaultSpec(at="RUNNING->STOP", kind="error")
    # A state stays a state, whatever the device has (as before).
    assert SimulatedParams.model_validate(
        {"p2p": False, "fault": {"at": "RUNNING_P2P", "kind": "error"}}
    )


def test_params_defaults_and_normalisation() -> None:
    params = SimulatedParams()
    assert (params.state_bytes, params.page_bytes) == (MIB, 4 * KIB)
    assert params.capabilities.flags == (
        MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY
    )
    fault = FaultSpec.model_validate({"at": " stop_copy ", "kind": "corrupt"})
    assert (fault.at, fault.state, fault.offset, fault.once) == (
        "STOP_COPY",
        S.STOP_COPY,
        None,
        True,
    )
    assert FaultSpec(at="Stream", kind="error", offset=3).state is None
    arc = FaultSpec.model_validate({"at": " resuming  ->stop", "kind": "delay", "delay_ms": 2})
    assert (arc.at, arc.arc_from, arc.state, arc.delay_ms) == (
        "RESUMING->STOP",
        S.RESUMING,
        S.STOP,
        2,
    )
    assert (fault.arc_from, fault.delay_ms) == (None, None)
    assert SimulatedParams(state_mib=1e-9).state_bytes == 8
    for field in SimulatedParams.model_fields.values():
        assert field.description
    for field in FaultSpec.model_fields.values():
        assert field.description


# --- backend and registry ---------------------------------------------------------------


def test_registry() -> None:
    backend = get_backend("simulated")
    assert isinstance(backend, SimulatedBackend)
    assert isinstance(backend, Backend)
    assert BACKENDS["simulated"] is backend
    with pytest.raises(
        PlanError, match=r"unknown backend 'vfoi' \(available: simulated, vfio, vhost_vdpa\)"
    ):
        get_backend("vfoi")


def test_backend_plan_hooks() -> None:
    backend = SimulatedBackend()
    source = SimulatedParams(
        state_mib=2, page_kib=64, p2p=False, seed=5, dirty_mib_s=9, model="m1", firmware="2.1"
    )
    inherited = backend.destination_defaults(source)
    assert inherited == {
        "state_mib": 2,
        "page_kib": 64,
        "p2p": False,
        "pre_copy": True,
        "seed": 5,
        "model": "m1",
        "firmware": "2.1",
    }
    destination = SimulatedParams.model_validate({**inherited, "transition_ms": 3})
    assert backend.check_pair(source, destination) == []
    assert backend.static_capabilities(destination) == destination.capabilities
    problems = backend.check_pair(source, SimulatedParams(state_mib=1, page_kib=4))
    assert [p.path for p in problems] == ["destination.state_mib", "destination.page_kib"]
    assert "2.0 MiB" in problems[0].message
    device = backend.create("gpu0", Side.DESTINATION, destination)
    assert (device.name, device.side, device.params) == ("gpu0", Side.DESTINATION, destination)
    with pytest.raises(TypeError, match="SimulatedParams"):
        backend.create("x", Side.SOURCE, FaultSpec(at="STOP", kind="error"))


def test_a_discarding_device_is_a_destination_only() -> None:
    backend = SimulatedBackend()
    problems = backend.check_pair(SimulatedParams(discard=True), SimulatedParams())
    assert [p.path for p in problems] == ["source.discard"]
    assert backend.check_pair(SimulatedParams(), SimulatedParams(discard=True)) == []


async def test_a_discarding_device_loads_counts_and_keeps_nothing() -> None:
    made = SimulatedBackend().create(
        "nic0", Side.DESTINATION, SimulatedParams(state_mib=1, discard=True)
    )
    assert isinstance(made, DiscardDevice)
    await made.open()
    with pytest.raises(DeviceError, match="loads only in RESUMING"):
        await made.write(b"early")
    with pytest.raises(DeviceError, match="not one arc"):
        await made.set_state(DeviceState.RESUMING)
    for state in (DeviceState.RUNNING_P2P, DeviceState.STOP, DeviceState.RESUMING):
        await made.set_state(state)
    await made.write(b"x" * 1000)
    writer = made.bulk_writer()
    await trio.to_thread.run_sync(writer.write_from, memoryview(b"y" * 24), threading.Event())
    assert made.loaded == 1024
    with pytest.raises(DeviceError, match="no stream to save"):
        await made.read(10)
    for state in (DeviceState.STOP, DeviceState.RUNNING_P2P, DeviceState.RUNNING):
        await made.set_state(state)
    assert await made.get_state() is DeviceState.RUNNING
    assert await made.state_digest() is None  # it kept nothing to digest
    await made.close()
    with pytest.raises(DeviceError, match="closed"):
        await made.get_state()

"""Persistent simulated devices: state files, reopening, damage, locks, and crash recovery.

A persistent device lives in ``state_dir/simulated/<side>/<name>.sim`` and
survives its process, as hardware survives a daemon crash.  The crash tests
kill a real process (tests/sim_child.py) with SIGKILL, in every phase of a
migration in turn, and recover the migration in this process with
``Migration.recover``, as the restarted daemon would.

Tests that depend on time take pytest-trio's ``autojump_clock``; the crash
tests run on the real clock (the child does).
"""

from __future__ import annotations

import errno
import gc
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from orchestrator.backends import BACKENDS, backends_for, get_backend
from orchestrator.backends.simulated import (
    _H_MUTATIONS,
    _H_STATE,
    _H_UNDO_LEN,
    _H_VERSION,
    FILE_CONTENT_OFFSET,
    FILE_HEADER_SIZE,
    FILE_MAGIC,
    FaultSpec,
    SimulatedBackend,
    SimulatedDevice,
    SimulatedParams,
    _apply_mutations_logged,
    _Layout,
    _mutation_key,
    _StateFile,
    reference_digest,
)
from orchestrator.backends.simulated.stream import full_stream_bound
from orchestrator.engine import Migration
from orchestrator.errors import DeviceError, PlanError
from orchestrator.report import MigrationReport
from orchestrator.resolve import ResolvedPlan, resolve
from orchestrator.states import DeviceState, Side
from tests import sim_child
from tests.helpers import kill_child, make_plan, read_line, sim_device, spawn_child

S = DeviceState
KIB = 1024


def params(**changes: Any) -> SimulatedParams:
    # 64 KiB of state in 4 KiB pages.
    return SimulatedParams.model_validate({"state_mib": 1 / 16, "seed": 3, **changes})


def device(
    state_dir: Path, p: SimulatedParams, side: Side = Side.SOURCE, name: str = "gpu0"
) -> SimulatedDevice:
    made = SimulatedBackend(state_dir).create(name, side, p)
    assert isinstance(made, SimulatedDevice)
    return made


async def opened(
    state_dir: Path, p: SimulatedParams, side: Side = Side.SOURCE, name: str = "gpu0"
) -> SimulatedDevice:
    dev = device(state_dir, p, side, name)
    await dev.open()
    return dev


async def walk(dev: SimulatedDevice, *states: DeviceState) -> None:
    for state in states:
        await dev.set_state(state)
    assert await dev.get_state() is states[-1]


async def drain(dev: SimulatedDevice) -> bytes:
    chunks = []
    while chunk := await dev.read(16 * KIB):
        chunks.append(chunk)
    return b"".join(chunks)


async def snapshot(dev: SimulatedDevice) -> tuple[DeviceState, int, int, str]:
    """State, mutations, resets and digest, as of one instant."""
    digest = await dev.state_digest()
    return dev.state, dev.mutations, dev.resets, digest


async def migrate(src: SimulatedDevice, dst: SimulatedDevice) -> None:
    """src RUNNING -> ... STOP_COPY, dst RUNNING -> ... STOP holding src's state."""
    await walk(dst, S.RUNNING_P2P, S.STOP, S.RESUMING)
    await walk(src, S.PRE_COPY)
    await dst.write(await drain(src))
    await walk(src, S.PRE_COPY_P2P, S.STOP_COPY)
    await dst.write(await drain(src))
    await walk(dst, S.STOP)


# --- files and reopening ----------------------------------------------------------------


async def test_a_device_survives_close_and_reopen(tmp_path: Path, autojump_clock: Any) -> None:
    p = params(dirty_mib_s=1.0)
    dev = await opened(tmp_path, p)
    await walk(dev, S.PRE_COPY)
    await trio.sleep(2)
    before = await snapshot(dev)
    assert before[1] > 0
    await dev.close()
    assert await dev.state_digest() == before[3]  # still answers after close

    path = tmp_path / "simulated" / "source" / "gpu0.sim"
    assert dev.state_file == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in (tmp_path / "simulated", path.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert path.stat().st_size == FILE_CONTENT_OFFSET + p.state_bytes

    again = await opened(tmp_path, p)
    assert await snapshot(again) == before
    assert again.undone == 0
    # Dirtying goes on from the recorded count, on the same content.
    await trio.sleep(1)
    state, mutations, _, digest = await snapshot(again)
    assert (state, mutations > before[1]) == (S.PRE_COPY, True)
    assert digest == reference_digest(p, mutations)
    await again.close()


async def test_a_stopped_device_stays_frozen(tmp_path: Path, autojump_clock: Any) -> None:
    p = params(dirty_mib_s=4.0)
    dev = await opened(tmp_path, p)
    await trio.sleep(1)
    await walk(dev, S.RUNNING_P2P, S.STOP)
    before = await snapshot(dev)
    await dev.close()
    again = await opened(tmp_path, p)
    await trio.sleep(5)
    assert await snapshot(again) == before
    assert before[3] == reference_digest(p, before[1])
    await again.close()


async def test_fresh_content_is_the_in_memory_devices(tmp_path: Path) -> None:
    p = params(seed=77)
    for side in Side:
        memory = SimulatedDevice("gpu0", side, p)
        await memory.open()
        persistent = await opened(tmp_path, p, side)
        assert await persistent.state_digest() == await memory.state_digest()
        await persistent.close()
    assert await (await opened(tmp_path, p)).state_digest() == reference_digest(p, 0)


@pytest.mark.parametrize("dirty_mib_s", [1.0, 64.0])  # 64: one batch of 4 undo-log chunks
async def test_dirtying_matches_the_in_memory_device(
    tmp_path: Path, autojump_clock: Any, dirty_mib_s: float
) -> None:
    p = params(dirty_mib_s=dirty_mib_s)
    memory = SimulatedDevice("gpu0", Side.SOURCE, p)
    await memory.open()
    persistent = await opened(tmp_path, p)
    await trio.sleep(1)
    assert await memory.state_digest() == await persistent.state_digest()
    assert memory.mutations == persistent.mutations == round(dirty_mib_s * 256)
    assert await persistent.state_digest() == reference_digest(p, persistent.mutations)
    await persistent.close()


async def test_a_loaded_destination_survives_reopen(tmp_path: Path, autojump_clock: Any) -> None:
    p = params(dirty_mib_s=2.0, transition_ms=5)
    q = params(transition_ms=5)  # a destination that does not dirty once it runs
    src = await opened(tmp_path, p)
    dst = await opened(tmp_path, q, Side.DESTINATION)
    await trio.sleep(1)
    await migrate(src, dst)
    loaded = await snapshot(dst)
    stopped = await snapshot(src)
    assert loaded[1:] == (stopped[1], 0, stopped[3])
    await src.close()
    await dst.close()

    dst = await opened(tmp_path, q, Side.DESTINATION)
    src = await opened(tmp_path, p)
    assert await snapshot(dst) == loaded
    assert await snapshot(src) == stopped
    # After the commit point: the destination runs, the source is released.
    await walk(dst, S.RUNNING_P2P, S.RUNNING)
    await walk(src, S.STOP)
    assert await dst.state_digest() == stopped[3] == reference_digest(p, stopped[1])
    await src.close()
    await dst.close()


@pytest.mark.parametrize(
    ("route", "rollback"),
    [
        ((S.PRE_COPY,), (S.RUNNING,)),
        ((S.PRE_COPY, S.PRE_COPY_P2P), (S.RUNNING_P2P, S.RUNNING)),
        ((S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY), (S.STOP, S.RUNNING_P2P, S.RUNNING)),
        ((S.RUNNING_P2P, S.STOP, S.STOP_COPY), (S.STOP, S.RUNNING_P2P, S.RUNNING)),
    ],
)
async def test_a_reopened_saving_device_has_no_stream_but_rolls_back(
    tmp_path: Path,
    autojump_clock: Any,
    route: tuple[DeviceState, ...],
    rollback: tuple[DeviceState, ...],
) -> None:
    p = params(dirty_mib_s=1.0)
    dev = await opened(tmp_path, p)
    await walk(dev, *route)
    await dev.read(100)  # the stream had started
    await trio.sleep(1)
    await dev.close()

    dev = await opened(tmp_path, p)
    assert await dev.get_state() is route[-1]
    with pytest.raises(DeviceError, match=r"stream of .* is lost") as info:
        await dev.read(100)
    assert info.value.errno == errno.EBADF
    if route[-1] is not S.STOP_COPY:
        with pytest.raises(DeviceError, match="is lost"):
            await dev.precopy_info()
    assert await dev.stop_copy_size() == full_stream_bound(_Layout.of(p))
    await walk(dev, *rollback)
    await trio.sleep(1)
    _, mutations, _, digest = await snapshot(dev)
    assert digest == reference_digest(p, mutations)
    # Entering a saving state again starts a new stream, from scratch.
    await walk(dev, S.RUNNING_P2P, S.STOP, S.STOP_COPY)
    dst = await opened(tmp_path, p, Side.DESTINATION)
    await walk(dst, S.RUNNING_P2P, S.STOP, S.RESUMING)
    await dst.write(await drain(dev))
    await walk(dst, S.STOP)
    assert await dst.state_digest() == await dev.state_digest()
    await dev.close()
    await dst.close()


async def test_a_destination_reopened_in_resuming_must_be_reset(tmp_path: Path) -> None:
    p = params()
    src = await opened(tmp_path, p)
    dst = await opened(tmp_path, p, Side.DESTINATION)
    await walk(src, S.PRE_COPY)
    await walk(dst, S.RUNNING_P2P, S.STOP, S.RESUMING)
    await dst.write(await src.read(20 * KIB))  # part of the load
    await dst.close()

    dst = await opened(tmp_path, p, Side.DESTINATION)
    assert await dst.get_state() is S.RESUMING
    with pytest.raises(DeviceError, match="partial load is lost"):
        await dst.write(await src.read(4 * KIB))
    with pytest.raises(DeviceError, match="load failed: incomplete stream") as info:
        await dst.set_state(S.STOP)
    assert info.value.errno == errno.EIO
    assert await dst.get_state() is S.ERROR
    await dst.reset()
    reset = await snapshot(dst)
    assert reset == (S.RUNNING, 0, 1, reference_digest(p, 0, reset=True))
    await dst.close()
    dst = await opened(tmp_path, p, Side.DESTINATION)
    assert await snapshot(dst) == reset
    await dst.close()
    await src.close()


async def test_error_and_resets_persist(tmp_path: Path) -> None:
    p = params(fault=FaultSpec(at="PRE_COPY", kind="error_state"))
    dev = await opened(tmp_path, p)
    with pytest.raises(DeviceError, match="injected"):
        await dev.set_state(S.PRE_COPY)
    await dev.close()
    dev = await opened(tmp_path, p)
    assert await dev.get_state() is S.ERROR
    with pytest.raises(DeviceError, match="only a reset leaves it"):
        await dev.set_state(S.RUNNING_P2P)
    await dev.reset()
    await dev.reset()
    await dev.close()
    dev = await opened(tmp_path, params())
    assert await snapshot(dev) == (S.RUNNING, 0, 2, reference_digest(p, 0, reset=True))
    await dev.close()


@pytest.mark.parametrize("kind", ["error", "delay"])
async def test_a_once_fault_fires_once_per_opening(
    tmp_path: Path, autojump_clock: Any, kind: str
) -> None:
    # Faults are behaviour, not state: the file keeps no trace of one that fired,
    # and the device reopened after a restart takes its fault from the plan again.
    fault: dict[str, Any] = {"at": "STOP->RUNNING_P2P", "kind": kind}
    if kind == "delay":
        fault["delay_ms"] = 30
    p = params(fault=fault, transition_ms=1)

    async def arc_fires(dev: SimulatedDevice) -> bool:
        """Take STOP -> RUNNING_P2P (again, after an injected error): did the fault fire?"""
        start = trio.current_time()
        try:
            await dev.set_state(S.RUNNING_P2P)
        except DeviceError:
            await dev.set_state(S.RUNNING_P2P)
            return True
        elapsed = trio.current_time() - start
        assert elapsed in (pytest.approx(0.001, abs=1e-9), pytest.approx(0.031, abs=1e-9))
        return elapsed > 0.002

    dev = await opened(tmp_path, p)
    await walk(dev, S.RUNNING_P2P, S.STOP)
    assert await arc_fires(dev) and dev.fault is None
    await walk(dev, S.STOP)
    assert not await arc_fires(dev)  # once
    await walk(dev, S.STOP)
    await dev.close()
    dev = await opened(tmp_path, p)
    assert await dev.get_state() is S.STOP
    assert await arc_fires(dev)  # a new opening, the fault again
    await walk(dev, S.STOP)
    assert not await arc_fires(dev)
    await dev.close()


async def test_a_device_is_identified_by_side_and_name(tmp_path: Path) -> None:
    p = params()
    a = await opened(tmp_path, p, name="gpu0")
    b = await opened(tmp_path, p, name="gpu1")
    c = await opened(tmp_path, p, Side.DESTINATION, name="gpu0")
    await walk(a, S.RUNNING_P2P, S.STOP)
    for dev in (a, b, c):
        await dev.close()
    states = []
    for side, name in ((Side.SOURCE, "gpu0"), (Side.SOURCE, "gpu1"), (Side.DESTINATION, "gpu0")):
        dev = await opened(tmp_path, p, side, name)
        states.append(await dev.get_state())
        await dev.close()
    assert states == [S.STOP, S.RUNNING, S.RUNNING]
    with pytest.raises(ValueError, match="cannot name a file"):
        SimulatedBackend(tmp_path).device_file("../x", Side.SOURCE)
    with pytest.raises(ValueError, match="in-memory"):
        SimulatedBackend().device_file("gpu0", Side.SOURCE)


# --- a kill in the middle of a mutation batch -------------------------------------------


class Killed(Exception):
    """Stands for SIGKILL: raised by a store, which then does not happen."""


class Dying:
    """A view whose stores (shared count with its siblings) die at the ``at``-th one."""

    def __init__(self, view: memoryview, stores: list[int], at: int) -> None:
        self.view, self.stores, self.at = view, stores, at

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, index: int) -> int:
        return self.view[index]

    def __setitem__(self, index: int, value: int) -> None:
        if self.stores[0] == self.at:
            raise Killed
        self.stores[0] += 1
        self.view[index] = value


async def test_a_kill_at_any_store_of_a_batch_leaves_a_consistent_device(tmp_path: Path) -> None:
    """Every store of a 20-mutation batch in 8-entry chunks, in turn, is the one that
    never happens; reopening must give a device at a committed count, exactly."""
    p = params(dirty_mib_s=1.0)
    layout = _Layout.of(p)
    dev = await opened(tmp_path, p)
    await walk(dev, S.RUNNING_P2P, S.STOP)  # frozen: only the batch below mutates it
    await dev.close()
    path = dev.state_file
    assert path is not None
    pristine = path.read_bytes()
    first = 0

    def run_batch(at: int) -> None:
        file = _StateFile.open(path, Side.SOURCE, p)
        stores = [0]
        words = file.content.cast("Q")
        try:
            _apply_mutations_logged(
                cast(memoryview, Dying(words, stores, at)),
                layout,
                _mutation_key(p.seed),
                first,
                20,
                None,
                bytearray(layout.n_pages),
                cast(memoryview, Dying(file.header, stores, at)),
                cast(memoryview, Dying(file.log[: 2 * 8], stores, at)),
            )
        finally:
            words.release()
            file.close()

    counts, undone = set(), 0
    at = 0
    while True:
        path.write_bytes(pristine)
        try:
            run_batch(at)
        except Killed:
            pass
        else:
            break
        again = await opened(tmp_path, p)
        _, mutations, _, digest = await snapshot(again)
        assert digest == reference_digest(p, mutations), f"killed at store {at}"
        counts.add(mutations)
        undone += again.undone > 0
        await again.close()
        at += 1
    # 1 + 4 per mutation + 2 stores per chunk: 35 + 35 + 19.
    assert at == 89
    # A kill between a chunk's commit and the log's clearing keeps the chunk.
    assert counts == {0, 8, 16, 20}
    # From the first word store to the commit of each chunk: 30 + 30 + 14.
    assert undone == 74
    again = await opened(tmp_path, p)
    assert (again.mutations, again.undone) == (20, 0)
    assert await again.state_digest() == reference_digest(p, 20)
    await again.close()


def test_a_kill_while_dirtying_leaves_the_reference_state(tmp_path: Path) -> None:
    name, p = sim_child.DIRTY_DEVICE
    undone = []
    last = 0
    for _ in range(3):
        proc = spawn_child("tests.sim_child", "dirty", tmp_path)
        try:
            word, count = read_line(proc).split()
            # It goes on from where the last one was killed (and this process closed it).
            assert word == "dirtying" and int(count) >= last
            time.sleep(0.3)
        finally:
            kill_child(proc)

        async def check() -> tuple[int, int]:
            dev = await opened(tmp_path, p, name=name)
            # No await between the digest and the count: no batch in between.
            digest = await dev.state_digest()
            mutations = dev.mutations
            await dev.close()  # at once: it catches up with a clock that runs fast
            assert digest == reference_digest(p, mutations)
            return mutations, dev.undone

        mutations, cut = trio.run(check)
        assert mutations > last
        last = mutations
        undone.append(cut)
    # The child lives inside its batches: the kills cut them.
    assert any(undone), undone


# --- damaged and foreign files ----------------------------------------------------------


async def make_file(tmp_path: Path, p: SimulatedParams, side: Side = Side.SOURCE) -> Path:
    dev = await opened(tmp_path, p, side)
    await dev.close()
    assert dev.state_file is not None
    return dev.state_file


async def open_fails(tmp_path: Path, p: SimulatedParams, side: Side = Side.SOURCE) -> DeviceError:
    dev = device(tmp_path, p, side)
    with pytest.raises(DeviceError) as info:
        await dev.open()
    assert str(dev.state_file) in str(info.value)
    assert info.value.operation == "open"
    # Refused without a trace: the device can still be closed, and the file is unlocked.
    await dev.close()
    return info.value


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"state_mib": 1 / 8}, "state size 65536 bytes in the file, 131072 bytes in the plan"),
        ({"page_kib": 8}, "page size 4096 bytes in the file, 8192 bytes in the plan"),
        ({"seed": 4}, "seed 3 in the file, 4 in the plan"),
        ({"p2p": False}, "capabilities STOP_COPY|P2P|PRE_COPY in the file, STOP_COPY|PRE_COPY"),
        (
            {"pre_copy": False, "seed": -1},
            "seed 3 in the file, -1 in the plan; capabilities STOP_COPY|P2P|PRE_COPY in the "
            "file, STOP_COPY|P2P in the plan",
        ),
    ],
)
async def test_a_file_of_another_shape_is_refused(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    await make_file(tmp_path, params())
    error = await open_fails(tmp_path, params(**change))
    assert "holds another device than the plan describes" in str(error)
    assert message in str(error)
    assert error.errno == errno.EINVAL
    # Behaviour is not shape: another rate, latency or fault is the same device.
    dev = await opened(tmp_path, params(dirty_mib_s=3, transition_ms=1, drain_mib_s=5))
    await dev.close()


async def test_a_file_of_the_other_side_is_refused(tmp_path: Path) -> None:
    path = await make_file(tmp_path, params())
    target = tmp_path / "simulated" / "destination" / "gpu0.sim"
    target.parent.mkdir(mode=0o700)
    target.write_bytes(path.read_bytes())
    error = await open_fails(tmp_path, params(), Side.DESTINATION)
    assert "side source in the file, destination in the plan" in str(error)


def patch_word(path: Path, index: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    with memoryview(data) as view, view[:FILE_HEADER_SIZE].cast("q") as words:
        words[index] = value
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: b"garbage\n" * 10, "is truncated: 80 bytes, less than the 4096-byte header"),
        (lambda d: b"garbage\n" * 1000, "is not a simulated device state file"),
        (lambda d: d[: len(d) - 1], "is truncated: 135167 bytes, a device of 65536 bytes takes"),
        (lambda d: d + b"\0", "is too long: 135169 bytes"),
        (lambda d: d[:FILE_HEADER_SIZE], "is truncated"),
    ],
)
async def test_a_damaged_file_is_refused(
    tmp_path: Path, damage: Callable[[bytes], bytes], message: str
) -> None:
    path = await make_file(tmp_path, params())
    path.write_bytes(damage(path.read_bytes()))
    error = await open_fails(tmp_path, params())
    assert message in str(error)
    assert error.errno == errno.EIO


@pytest.mark.parametrize(
    ("index", "value", "message"),
    [
        (_H_VERSION, 2, "has format version 2; this simulator reads version 1"),
        (_H_VERSION, 1 << 56, "format version 72057594037927936"),  # another byte order
        (_H_STATE, 99, "corrupt header: state 99 is no migration state"),
        (_H_MUTATIONS, -5, "corrupt header: mutation count -5 is negative"),
        (_H_UNDO_LEN, 5000, "corrupt header: undo length 5000 is not in 0..4096"),
    ],
)
async def test_a_damaged_header_is_refused(
    tmp_path: Path, index: int, value: int, message: str
) -> None:
    path = await make_file(tmp_path, params())
    patch_word(path, index, value)
    assert message in str(await open_fails(tmp_path, params()))


async def test_a_creation_cut_short_is_created_again(tmp_path: Path) -> None:
    p = params()
    path = await make_file(tmp_path, p)
    for cut in (b"", bytes(len(path.read_bytes()))):
        path.write_bytes(cut)  # killed before the size was set, or before the magic
        dev = await opened(tmp_path, p)
        assert await dev.state_digest() == reference_digest(p, 0)
        await dev.close()
        assert path.read_bytes()[: len(FILE_MAGIC)] == FILE_MAGIC


# --- locks ------------------------------------------------------------------------------


async def test_a_device_open_elsewhere_is_refused(tmp_path: Path) -> None:
    p = params()
    dev = await opened(tmp_path, p)
    error = await open_fails(tmp_path, p)
    assert "is in use" in str(error)
    assert error.errno == errno.EBUSY
    await dev.close()
    again = await opened(tmp_path, p)  # released on close
    await again.close()


def test_a_device_held_by_another_process_is_refused_until_it_dies(tmp_path: Path) -> None:
    spec = resolve(sim_child.migration_plan()).devices[0]
    p = cast(SimulatedParams, spec.source)
    proc = spawn_child("tests.sim_child", "hold", tmp_path)
    try:
        assert read_line(proc) == "held"
        error = trio.run(open_fails, tmp_path, p)
        assert "is in use" in str(error)
    finally:
        kill_child(proc)

    async def reopen() -> None:
        dev = await opened(tmp_path, p)  # the kernel dropped the dead process's lock
        await dev.close()

    trio.run(reopen)


# --- registry and resolve ---------------------------------------------------------------


def test_backends_for_a_state_dir(tmp_path: Path) -> None:
    assert backends_for(None) is BACKENDS
    backends = backends_for(tmp_path)
    backend = get_backend("simulated", backends)
    assert isinstance(backend, SimulatedBackend)
    assert backend.state_dir == tmp_path
    assert cast(SimulatedBackend, get_backend("simulated")).state_dir is None
    assert get_backend("vfio", backends) is get_backend("vfio")  # no state of its own
    with pytest.raises(
        PlanError, match=r"unknown backend 'vdpa' \(available: simulated, vfio, vhost_vdpa\)"
    ):
        get_backend("vdpa", backends)

    plan = make_plan([sim_device("gpu0")])
    persistent = resolve(plan, backends).devices[0]
    memory = resolve(plan).devices[0]
    created = persistent.backend.create("gpu0", Side.DESTINATION, persistent.destination)
    assert isinstance(created, SimulatedDevice)
    assert created.state_file == tmp_path / "simulated" / "destination" / "gpu0.sim"
    created = memory.backend.create("gpu0", Side.DESTINATION, memory.destination)
    assert isinstance(created, SimulatedDevice)
    assert created.state_file is None


def test_a_persistent_seed_fits_64_bits(tmp_path: Path) -> None:
    plan = make_plan([sim_device("gpu0", seed=1 << 63, destination={"seed": -(1 << 63)})])
    resolve(plan)  # in memory, any integer
    with pytest.raises(PlanError) as info:
        resolve(plan, backends_for(tmp_path))
    assert [p.path for p in info.value.problems] == ["devices[0].source.seed"]
    assert "signed 64-bit" in info.value.problems[0].message


# --- recovery after a real kill, in every phase -----------------------------------------

PHASES = [
    "prepare",
    "precopy",
    "source_grace",
    "stop_copy",
    "destination_grace",
    "commit",  # the decision is still being recorded: it does not count yet
    "resume",
    "release",
    "done",
]
#: (phase, seconds into it): as each phase starts, and well inside the longer ones,
#: where streams are cut mid-drain and loads half done.
KILL_POINTS = [(phase, 0.0) for phase in PHASES] + [
    ("prepare", 0.12),
    ("precopy", 0.2),
    ("stop_copy", 0.1),
    ("stop_copy", 0.2),
    ("destination_grace", 0.1),
    ("commit", 0.15),
    ("resume", 0.04),
]


def run_until_killed(state_dir: Path, phase: str, delay: float) -> tuple[list[str], str, bool]:
    """Run the child's migration and kill it ``delay`` seconds into ``phase``: the lines it
    printed, the phase it was in, and whether it had recorded the commit decision."""
    proc = spawn_child("tests.sim_child", "migrate", state_dir)
    lines = []
    try:
        while (line := read_line(proc)) != f"phase {phase}":
            lines.append(line)
        lines.append(line)
        time.sleep(delay)
    finally:
        lines += kill_child(proc)
    last = [line.split()[1] for line in lines if line.startswith("phase ")][-1]
    return lines, last, "committed" in lines


async def recover(state_dir: Path, phase: str, committed: bool) -> MigrationReport:
    resolved = resolve(sim_child.migration_plan(), backends_for(state_dir))
    return await Migration(resolved).recover(committed=committed, interrupted_phase=phase)


async def device_facts(
    state_dir: Path, resolved: ResolvedPlan
) -> dict[tuple[Side, str], tuple[DeviceState, int, int, str]]:
    facts = {}
    for spec in resolved.devices:
        for side, p in ((Side.SOURCE, spec.source), (Side.DESTINATION, spec.destination)):
            dev = await opened(state_dir, cast(SimulatedParams, p), side, spec.name)
            facts[(side, spec.name)] = await snapshot(dev)
            await dev.close()
    return facts


@pytest.mark.slow
@pytest.mark.parametrize(("phase", "delay"), KILL_POINTS)
def test_recovery_after_a_kill_leaves_one_side_running(
    tmp_path: Path, phase: str, delay: float
) -> None:
    lines, interrupted, committed = run_until_killed(tmp_path, phase, delay)
    assert PHASES.index(interrupted) >= PHASES.index(phase), lines
    assert committed == (PHASES.index(interrupted) > PHASES.index("commit")), lines
    report = trio.run(recover, tmp_path, interrupted, committed)

    resolved = resolve(sim_child.migration_plan(), backends_for(tmp_path))
    facts = trio.run(device_facts, tmp_path, resolved)
    for spec in resolved.devices:
        src_state, src_mutations, _, src_digest = facts[(Side.SOURCE, spec.name)]
        dst_state, dst_mutations, dst_resets, dst_digest = facts[(Side.DESTINATION, spec.name)]
        # The source holds its own state, never written into nor reset.
        assert src_digest == reference_digest(cast(SimulatedParams, spec.source), src_mutations)
        if committed:
            assert (src_state, dst_state) == (S.STOP, S.RUNNING)
            assert (dst_digest, dst_mutations) == (src_digest, src_mutations)
        else:
            assert (src_state, dst_state) == (S.RUNNING, S.RUNNING)
            assert dst_resets == 1
            assert dst_digest == reference_digest(
                cast(SimulatedParams, spec.destination), dst_mutations, reset=True
            )

    if committed:
        assert (report.outcome, report.error) == ("succeeded", None)
        assert any("completed on restart" in note for note in report.notes)
    else:
        # Killed before pre-copy began: refused, every device as it was.
        assert report.outcome == ("refused" if interrupted == "prepare" else "rolled_back")
        assert report.error is not None and report.error.kind == "interrupted"
        assert all(d.destination_reset and not d.source_reset for d in report.devices)


async def test_recovery_reports_a_device_it_cannot_open(tmp_path: Path) -> None:
    backends = backends_for(tmp_path)
    resolved = resolve(sim_child.migration_plan(), backends)
    spec = resolved.devices[1]
    holder = spec.backend.create(spec.name, Side.DESTINATION, spec.destination)
    await holder.open()  # as a process that still had it open would
    try:
        report = await Migration(resolved).recover(committed=False, interrupted_phase="precopy")
    finally:
        await holder.close()
    assert report.outcome == "failed"
    assert report.error is not None and "is in use" in report.error.message


async def test_a_device_dropped_without_close_releases_its_lock(tmp_path: Path) -> None:
    dev = await opened(tmp_path, params())
    del dev
    gc.collect()
    again = await opened(tmp_path, params())
    await again.close()


async def test_a_source_device_that_moved_says_pre_copy_began_whatever_the_journal_says(
    tmp_path: Path,
) -> None:
    """The journal's phase may lag the devices (its writer batches): killed just after a
    source device entered PRE_COPY, the record may still say prepare.  The device is the
    witness: the recovery rolls back, never "refused" (every device as it was)."""
    backends = backends_for(tmp_path)
    resolved = resolve(sim_child.migration_plan(), backends)
    spec = resolved.devices[0]
    dev = await opened(tmp_path, cast(SimulatedParams, spec.source), Side.SOURCE, spec.name)
    await walk(dev, DeviceState.PRE_COPY)
    await dev.close()
    report = await Migration(resolved).recover(committed=False, interrupted_phase="prepare")
    assert report.outcome == "rolled_back", report.error
    assert {d.source_state for d in report.devices} == {"RUNNING"}

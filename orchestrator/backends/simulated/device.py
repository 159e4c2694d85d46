"""A simulated device endpoint: the Device interface over its state, stream and faults.

:class:`SimulatedDevice` ties the pieces together: the content and its page
digests (:mod:`.content`), the stream being saved or loaded (:mod:`.stream`),
the fault to inject (:mod:`.faults`) and, for a persistent device, its file
(:mod:`.statefile`).  It walks the arcs of :mod:`orchestrator.states` with
the latencies its parameters give, and dirties its state while it runs.

Dirtying follows ``trio.current_time()``, so it follows trio's
``MockClock``: ``dirty_mib_s`` of page-sized mutations per second while the
device is in a running state (RUNNING, PRE_COPY, RUNNING_P2P,
PRE_COPY_P2P).  It is lazy: every call first catches up with the clock,
with a fractional carry.  :attr:`SimulatedDevice.mutations` counts the
mutations applied.

Reopened persistent devices
---------------------------

The migration stream is not kept: like a device whose data_fd closed with
the process that opened it, a device reopened in a saving state has no
stream.  ``read`` and ``precopy_info`` fail with EBADF ("the migration
stream of ... is lost"); its arcs all work (STOP_COPY -> STOP ->
RUNNING_P2P -> RUNNING, PRE_COPY_P2P -> RUNNING_P2P -> RUNNING, as a
rollback walks them, or STOP_COPY -> STOP as a release does); an arc
between saving states carries no stream along, and entering a saving
state from one that is not starts a new stream from scratch.  A
destination reopened in RESUMING has lost its partial load: ``write``
fails (EINVAL), RESUMING -> STOP fails as an incomplete load does (EIO,
into ERROR), and a reset recovers it.  Faults, the fractional dirtying
carry and the time a device spent without a process are not kept either:
a reopened device takes its fault from its parameters afresh (a ``once``
fault that fired before fires again, once per opening; see :mod:`.faults`),
and a reopened running device dirties from its recorded count, from the
moment it is opened, so :func:`reference_digest` of its count still holds;
a stopped one stays frozen.  ``close`` brings every page digest up to date
before it unmaps the content, so :meth:`SimulatedDevice.state_digest` still
answers.
File work is done in the calling thread, as an in-memory device builds
its content: it is page-cache work, and a worker thread would let a mock
clock jump past the runner's deadlines.

Invariants
----------

* ``set_state`` takes exactly one arc of :mod:`orchestrator.states` for the
  device's capabilities; anything else is refused with errno EINVAL and the
  state unchanged.  ERROR is left only by :meth:`SimulatedDevice.reset`.
* A call that fails or is cancelled has no effect on the stream: an
  injected error, a hang and a cancelled drain delay leave the bytes it
  would have returned (or consumed) in place for the next call.  Only
  ``error_state`` changes state, into ERROR, which discards the stream.
* Stopped states (STOP, STOP_COPY, RESUMING, ERROR) never mutate the state.
* ``reset`` loses the content (zero-filled), discards any stream, and
  restarts the mutation count from the zeroed content.
* Time is spent only in :func:`~orchestrator.backends.precise_sleep.sleep`
  (``trio.sleep`` under a ``MockClock``, within tens of microseconds on the real
  clock, as a real device's call returns when the kernel is done):
  ``transition_ms`` before each arc (and each reset), lengthened by a
  ``delay`` fault's ``delay_ms`` in the same sleep, ``n / drain_mib_s``
  for a read or write moving ``n`` bytes.  The device serves one call at a
  time, as the runner drives it.
* Every call is a checkpoint once: its sleep when it has one (a refused call
  takes a plain checkpoint before raising), else a plain checkpoint first.
  (A read of a device with a fault configured keeps a checkpoint before its
  drain delay, so the fault fires at a fixed point.)
* The page digests are exact: every page whose stale flag is clear has its
  current content's digest.  Whatever writes the content keeps it so.
* No per-byte Python loops: pages move as memoryview slices, checksums are
  CRC-32 over views (zlib-ng's, as the data channel's: 5 us for a 256 KiB
  read where the standard library's took 64 us), pending and stale pages are
  found with ``bytearray.find``.
"""

from __future__ import annotations

import errno
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Literal, NoReturn, TypeVar, TypeVarTuple

import trio

from orchestrator.backends import precise_sleep
from orchestrator.backends.base import Device, PrecopyInfo, StreamChunk
from orchestrator.backends.simulated.content import (
    _apply_mutations,
    _DirtyClock,
    _initial_content,
    _Layout,
    _mutation_key,
    _PageDigests,
)
from orchestrator.backends.simulated.faults import FaultKind, FaultSpec, _Faults, _flip
from orchestrator.backends.simulated.params import MIB, SimulatedParams
from orchestrator.backends.simulated.statefile import (
    LOST_LOAD,
    _apply_mutations_logged,
    _FileProblem,
    _StateFile,
)
from orchestrator.backends.simulated.stream import _BadStream, _Loader, _Saver, full_stream_bound
from orchestrator.compat import Identity
from orchestrator.errors import DeviceError
from orchestrator.states import (
    RUNNING_STATES,
    SAVING_STATES,
    Capabilities,
    DeviceState,
    Side,
    arcs,
)

_PRE_COPY_STATES = frozenset({DeviceState.PRE_COPY, DeviceState.PRE_COPY_P2P})
_ERROR = DeviceState.ERROR
_RESUMING = DeviceState.RESUMING
_STOP_COPY = DeviceState.STOP_COPY

# Bound once: the hot paths call them on every device call.
_checkpoint = trio.lowlevel.checkpoint
_sleep = precise_sleep.sleep
_current_time = trio.current_time

#: A read on a device with a drain rate returns at most this long's worth of data.
_READ_WINDOW_S = 0.1

#: States larger than this are made (or mapped and hashed) in a worker thread.
_OPEN_IN_THREAD_BYTES = 8 << 20

_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")
_Chunk = TypeVar("_Chunk", bytes, StreamChunk)


class SimulatedDevice(Device):
    """One simulated endpoint; see the module docstring for its behaviour."""

    backend: ClassVar[str] = "simulated"

    def __init__(
        self, name: str, side: Side, params: SimulatedParams, *, state_file: Path | None = None
    ) -> None:
        super().__init__(name, side)
        self.params = params
        #: The file the device lives in (None: in memory, gone with the object).
        self.state_file = state_file
        #: Mutations applied to the content since it was created or reset (a loaded
        #: destination takes the source's count).  Dirtying is lazy: this is the count
        #: as of the device's latest call.
        self.mutations = 0
        #: Resets the device went through.
        self.resets = 0
        self._layout = _Layout.of(params)
        self._capabilities = params.capabilities
        self._arcs: dict[DeviceState, frozenset[DeviceState]] = dict(arcs(self._capabilities.flags))
        self._faults = _Faults(params.fault)
        self._transition_s = params.transition_ms / 1000
        self._drain_bytes_s = None if params.drain_mib_s is None else params.drain_mib_s * MIB
        self._dirty = _DirtyClock(params)
        self._key = _mutation_key(params.seed)
        self._opened = False
        self._closed = False
        self._live = False  # opened and not closed: the one test on the hot paths
        self._state = DeviceState.RUNNING
        self._content: bytearray | memoryview = bytearray()
        self._words = memoryview(b"")
        self._file: _StateFile | None = None
        #: Mutations of a batch cut short by a kill, undone when the device was opened.
        self.undone = 0
        self._pages = _PageDigests(self._layout)
        self._saver: _Saver | None = None
        self._loader: _Loader | None = None
        #: Held while a data channel's I/O thread reads or loads the stream, and
        #: while trio's side changes the content or the stream under it.
        self._stream_lock = threading.RLock()

    # -- introspection for tests (sync; the Device interface is async) --

    @property
    def state(self) -> DeviceState:
        return self._state

    @property
    def fault(self) -> FaultSpec | None:
        """The configured fault still to fire (None once a ``once`` fault fired)."""
        return self._faults.configured

    @property
    def pages_hashed(self) -> int:
        """Page digests the device computed so far (its digest cache's work)."""
        return self._pages.hashed

    # -- Device --

    async def open(self) -> Capabilities:
        await _checkpoint()
        if self._closed:
            raise self._device_error("open", "the device is closed", errno.EBADF)
        if not self._opened:
            # A source hashes its pages now, in the prepare phase; a destination's
            # content is about to be replaced by a load, so it hashes lazily.
            known: Literal["hash", "stale"] = "hash" if self.side is Side.SOURCE else "stale"
            state_file = self.state_file

            def build() -> None:
                if state_file is None:
                    self._set_content(_initial_content(self.params, self.side), known)
                else:
                    self._open_file(state_file, known)

            # Making and hashing a large state takes tens of ms: in a worker
            # thread, as a real backend's blocking open would be, so that
            # other devices (and a daemon's API) go on meanwhile.  Small ones
            # are built in place: cheaper than a thread hop, and it keeps
            # trio's MockClock (which jumps ahead while a thread works) usable.
            if self._layout.size > _OPEN_IN_THREAD_BYTES:
                await trio.to_thread.run_sync(build)
            else:
                build()
            self._dirty.restart(_current_time())
            self._opened = self._live = True
        return self._capabilities

    async def get_state(self) -> DeviceState:
        await _checkpoint()
        self._catch_up("get_state")
        return self._state

    def declared_rate_bytes_s(self) -> float | None:
        return self._drain_bytes_s

    def declared_dirty_bytes(self, seconds: float) -> int | None:
        # Mutations land on pages uniformly: of the pages not pending now, the
        # expected number hit at least once by per_s * seconds more mutations.
        per_s = self._dirty.per_s
        if not per_s or seconds <= 0:
            return 0
        layout = self._layout
        pending = self._saver.pending_count if self._saver is not None else 0
        clean = max(0, layout.n_pages - pending)
        hits = per_s * seconds
        missed = math.exp(hits * math.log1p(-1 / layout.n_pages)) if layout.n_pages > 1 else 0.0
        return int(clean * (1.0 - missed) * layout.page_size)

    def declared_read_bytes(self, max_bytes: int) -> int:
        drain = self._drain_bytes_s
        if drain is None:
            return max_bytes
        return min(max_bytes, max(self._layout.page_size, int(drain * _READ_WINDOW_S)))

    def declared_arc_s(self, source: DeviceState, target: DeviceState) -> float | None:
        # Its transition latency, which every arc takes (an injected delay is
        # exactly what the model must not know of: it is an overrun).
        return self._transition_s

    async def set_state(self, target: DeviceState) -> None:
        faults = self._faults
        # A delay fault lengthens the arc's one sleep, so it is known before the
        # checks (which take a plain checkpoint for a call that does not sleep).
        extra = 0.0 if faults.configured is None else faults.delay_s(self._state, target)
        delay = self._transition_s + extra
        await self._checked(bool(delay), self._check_arc, target)
        current = self._state
        if extra:
            # The delay fires as its sleep begins: a cancelled one is spent, as a hang is.
            faults.entering(current, target)
        if delay:
            await _sleep(delay)
            if self._dirty.per_s:
                self._advance()
        kind = None if extra else faults.entering(current, target)
        if kind is not None:
            where = f"entering {target.name} from {current.name}"
            await self._fire(kind, "set_state", where, target)
        self._enter(target)

    async def read(self, max_bytes: int) -> bytes:
        drain = self._drain_bytes_s
        # The drain delay is the call's checkpoint, unless a fault may fire before it.
        rate = drain if self._faults.quiet else None
        saver = await self._checked(rate is not None, self._saver_to_read, max_bytes)
        if drain is not None:
            # A device hands over what it has produced, not all that was asked
            # for: at most about 100 ms of its drain rate per read, so a slow
            # device answers each call promptly instead of blocking for the
            # whole buffer (and tripping the caller's deadline).
            max_bytes = self.declared_read_bytes(max_bytes)
        start = saver.read_pos
        data = saver.produce(max_bytes, stopped=self._state is _STOP_COPY)
        try:
            if rate is not None:
                if data:
                    await _sleep(len(data) / rate)
                else:
                    await _checkpoint()
                return data
            data = await self._stream_faults("read", start, data)
            if drain is not None and data:
                await _sleep(len(data) / drain)
        except BaseException:
            if self._saver is saver:
                saver.unread(data)
            raise
        return data

    async def write(self, data: StreamChunk) -> None:
        rate = self._drain_bytes_s if data else None  # the drain delay is the checkpoint
        loader = await self._checked(rate is not None, self._loader_to_write)
        if rate is not None:
            await _sleep(len(data) / rate)
        if not self._faults.quiet:
            data = await self._stream_faults("write", loader.received, data)
        try:
            loader.feed(data)
        except _BadStream as exc:
            raise self._device_error("write", str(exc), errno.EINVAL) from None

    def bulk_reader(self) -> _ThreadSide | None:
        # A fault fires on trio's side, where its hang and delays are trio sleeps.
        return _ThreadSide(self) if self._faults.quiet else None

    def bulk_writer(self) -> _ThreadSide | None:
        return _ThreadSide(self) if self._faults.quiet else None

    async def precopy_info(self) -> PrecopyInfo:
        await _checkpoint()
        self._catch_up("precopy_info")
        if self._state not in _PRE_COPY_STATES:
            raise self._device_error(
                "precopy_info",
                f"precopy info exists only in PRE_COPY states, not {self._state.name}",
                errno.EINVAL,
            )
        saver = self._saver
        if saver is None:
            raise self._no_stream("precopy_info")
        info = saver.precopy_info()
        params = self.params
        if info.initial_bytes == 0 and params.reinit_mib and not saver.reinitialised:
            saver.drained_queries += 1
            if saver.drained_queries == params.reinit_after:
                saver.reinit(max(1, params.reinit_bytes // self._layout.page_size))
                info = saver.precopy_info(reinit=True)
        return info

    async def stop_copy_size(self) -> int:
        await _checkpoint()
        self._catch_up("stop_copy_size")
        if self._state is _ERROR:
            raise self._device_error("stop_copy_size", "the device is in ERROR", errno.EINVAL)
        if self._saver is None:
            return full_stream_bound(self._layout)
        return self._saver.stop_copy_size()

    async def reset(self) -> None:
        delay = self._transition_s
        await self._checked(bool(delay), self._catch_up, "reset")
        if delay:
            await _sleep(delay)
        with self._stream_lock:  # a channel thread given up on may still be loading
            self._saver = None
            self._loader = None
            file = self._file
            if file is None:
                self._set_content(bytearray(self._layout.size), "zeros")
            else:
                file.begin_reset()
                self._set_content(file.content, "zeros")
            self._state = DeviceState.RUNNING
        self._faults.armed = None
        self._dirty.restart(_current_time())
        self.resets += 1
        if file is not None:
            file.finish_reset(self.resets)

    async def close(self) -> None:
        await _checkpoint()
        if self._live:
            self._advance()
            if self._file is not None:
                # The content goes with the mapping: every page digest current now,
                # so that state_digest still answers after close.
                self._pages.state_digest()
        with self._stream_lock:  # a channel thread given up on may still be in it
            self._closed = True
            self._live = False
            self._saver = None
            self._loader = None
            file = self._file
            if file is not None:
                self._file = None
                self._words.release()
                self._words = memoryview(b"")
                self._pages.view.release()
                self._pages.view = memoryview(b"")
                self._content = bytearray()
                file.close()

    async def device_identity(self) -> Identity:
        """Its model and firmware, as its table gives them (``SimulatedParams.identity``)."""
        await trio.lowlevel.checkpoint()
        return self.params.identity

    async def state_digest(self) -> str:
        """The state digest (see the module docstring); unlike other calls, still
        answers after close."""
        await _checkpoint()
        if not self._opened:
            raise self._device_error("state_digest", "the device is not open", errno.EBADF)
        if self._live:
            self._advance()
        return self._pages.state_digest().hex()

    # -- internals --

    async def _checked(self, sleeps: bool, checks: Callable[[*_Args], _T], *args: *_Args) -> _T:
        """Run a call's ``checks(*args)`` under the call's one checkpoint.

        A call that ``sleeps`` (a latency, a drain delay) has its sleep, after
        the checks, for its checkpoint; one that does not takes a plain
        checkpoint before them.  Checks that refuse a call that would have
        slept take a plain checkpoint before their DeviceError propagates.
        """
        if not sleeps:
            await _checkpoint()
            return checks(*args)
        try:
            return checks(*args)
        except DeviceError:
            await _checkpoint()
            raise

    def _check_arc(self, target: DeviceState) -> None:
        """set_state's checks: the device is open, and ``target`` one arc away."""
        self._catch_up("set_state")
        current = self._state
        if current is _ERROR:
            raise self._device_error(
                "set_state", "the device is in ERROR; only a reset leaves it", errno.EINVAL, target
            )
        targets = self._arcs.get(current)
        if targets is None or target not in targets:
            raise self._device_error(
                "set_state",
                f"{current.name} -> {target.name} is not one arc of the state model "
                "for this device",
                errno.EINVAL,
                target,
            )

    def _saver_to_read(self, max_bytes: int, *, catch_up: bool = True) -> _Saver:
        """read's checks: the device is open, has a stream, and ``max_bytes`` makes sense.
        Without ``catch_up`` (an I/O thread: the clock is trio's) no dirtying is applied."""
        self._catch_up("read") if catch_up else self._check_live("read")
        saver = self._saver
        if saver is None:
            raise self._no_stream("read")
        if max_bytes <= 0:
            raise self._device_error(
                "read", f"max_bytes must be positive, not {max_bytes}", errno.EINVAL
            )
        return saver

    def _loader_to_write(self, *, catch_up: bool = True) -> _Loader:
        """write's checks: the device is open, loading, and its load not poisoned."""
        self._catch_up("write") if catch_up else self._check_live("write")
        loader = self._loader
        if loader is None:
            raise self._device_error(
                "write", f"the device loads only in RESUMING, not {self._state.name}", errno.EINVAL
            )
        if loader.poison is not None:
            raise self._device_error("write", loader.poison, errno.EINVAL)
        return loader

    async def _stream_faults(self, operation: str, start: int, data: _Chunk) -> _Chunk | bytes:
        """Fire the fault, if any, due on ``data``, the stream's bytes from ``start``:
        the data with a byte flipped, or the fault's failure."""
        fired = self._faults.on_stream(start, len(data))
        if fired is None:
            return data
        kind, offset = fired
        if kind == "corrupt":
            return _flip(data, offset - start)
        await self._fire(kind, operation, f"stream offset {offset}")

    def _catch_up(self, operation: str) -> None:
        """Every call, after its checkpoint: the open check, and catching up with the clock."""
        self._check_live(operation)
        if self._dirty.per_s:
            self._advance()

    def _check_live(self, operation: str) -> None:
        if not self._live:
            message = "the device is not open" if not self._opened else "the device is closed"
            raise self._device_error(operation, message, errno.EBADF)

    def _set_content(
        self,
        content: bytearray | memoryview,
        known: Literal["hash", "stale", "zeros"],
        mutations: int = 0,
    ) -> None:
        self._words.release()
        self._content = content
        self._words = memoryview(content).cast("Q")
        self._pages.track(content, known)
        self.mutations = mutations

    def _open_file(self, path: Path, known: Literal["hash", "stale"]) -> None:
        """Open (or create) the device's file and take up what it holds."""
        try:
            file = _StateFile.open(path, self.side, self.params)
        except _FileProblem as exc:
            raise self._device_error("open", str(exc), exc.err) from None
        except OSError as exc:
            raise self._device_error(
                "open", f"{path}: {exc.strerror or exc}", exc.errno or errno.EIO
            ) from None
        self._file = file
        self.undone = file.undone
        # A file that existed holds content nobody hashed in this process.
        self._set_content(file.content, known if file.created else "hash", file.mutations)
        self.resets = file.resets
        self._state = state = file.state
        # The stream died with the process that had the device open: a saving state
        # has none until it is left and a saving state entered again (_no_stream); a
        # load cannot complete.
        if state is _RESUMING:
            self._loader = _Loader(self._layout, memoryview(self._content), self._pages)
            self._loader.poison = LOST_LOAD

    def _no_stream(self, operation: str) -> DeviceError:
        if self._state in SAVING_STATES:
            return self._device_error(
                operation,
                f"the migration stream of {self._state.name} is lost: the device was reopened "
                "and a stream dies with the process that opened the device; a new one starts "
                "when a saving state is entered again",
                errno.EBADF,
            )
        return self._device_error(
            operation, f"no migration stream in {self._state.name}", errno.EINVAL
        )

    def _advance(self) -> None:
        """Apply the mutations due since the last call, if the device was running."""
        if not self._dirty.per_s:
            return  # nothing ever dirties: the clock does not matter
        count = self._dirty.due(_current_time(), self._state in RUNNING_STATES)
        if count:
            with self._stream_lock:
                self._mutate(count)

    def _mutate(self, count: int) -> None:
        """Apply ``count`` mutations to the content (under the stream lock)."""
        if count:
            saver = self._saver
            file = self._file
            batch = (
                self._words,
                self._layout,
                self._key,
                self.mutations,
                count,
                None if saver is None else saver.pending,
                self._pages.stale,
            )
            if file is None:
                newly = _apply_mutations(*batch)
            else:
                newly = _apply_mutations_logged(*batch, file.header, file.log)
            if saver is not None:
                saver.pending_count += newly
            self.mutations += count

    def _enter(self, target: DeviceState) -> None:
        """Take the arc's effects on the stream, then the state."""
        with self._stream_lock:
            self._enter_locked(target)

    def _enter_locked(self, target: DeviceState) -> None:
        current = self._state
        loader = self._loader
        if current is _RESUMING and loader is not None:
            problem = loader.verdict()
            if problem is not None:
                self._enter_error()
                raise self._device_error("set_state", f"load failed: {problem}", errno.EIO, target)
            if loader.end is not None:  # always, once the verdict is good
                self.mutations = loader.end[0]
            self._dirty.carry = 0.0
            self._loader = None
        if target in SAVING_STATES:
            if current not in SAVING_STATES:
                self._saver = _Saver(
                    self._layout, memoryview(self._content), self._pages, self._end_facts
                )
        else:
            self._saver = None
        if target is _RESUMING:
            self._loader = _Loader(self._layout, memoryview(self._content), self._pages)
        self._state = target
        if self._file is not None:
            self._file.record(target, self.mutations)

    def _enter_error(self) -> None:
        with self._stream_lock:
            self._state = DeviceState.ERROR
            self._saver = None
            self._loader = None
        if self._file is not None:
            self._file.record(DeviceState.ERROR, self.mutations)

    def _end_facts(self) -> tuple[int, bytes]:
        return self.mutations, self._pages.state_digest()

    async def _fire(
        self, kind: FaultKind, operation: str, where: str, target: DeviceState | None = None
    ) -> NoReturn:
        if kind == "hang":
            await trio.sleep_forever()
        if kind == "error_state":
            self._enter_error()
        raise self._device_error(operation, f"injected {kind} fault at {where}", errno.EIO, target)


class _ThreadSide:
    """A simulated device's stream as a data channel's I/O thread reads and loads it.

    What ``read`` and ``write`` do, with the drain delay slept in the thread
    and no dirtying caught up (the clock is trio's: the device's next call on
    trio's side applies the mutations due).  Offered only while no fault is
    configured or armed.
    """

    def __init__(self, device: SimulatedDevice) -> None:
        self._device = device

    def read_into(self, buffer: memoryview, cancel: threading.Event) -> int:
        device = self._device
        drain = device._drain_bytes_s
        want = buffer.nbytes
        if drain is not None:
            want = device.declared_read_bytes(want)
        with device._stream_lock:
            saver = device._saver_to_read(want, catch_up=False)
            data = saver.produce(want, stopped=device._state is _STOP_COPY)
            n = len(data)
            buffer[:n] = data
        if drain is not None and n:
            cancel.wait(n / drain)  # the drain delay; a runner that gave up ends it
        return n

    def write_from(self, data: memoryview, cancel: threading.Event) -> None:
        device = self._device
        drain = device._drain_bytes_s
        if drain is not None and data.nbytes:
            cancel.wait(data.nbytes / drain)
        with device._stream_lock:
            loader = device._loader_to_write(catch_up=False)
            try:
                loader.feed(data)
            except _BadStream as exc:
                raise device._device_error("write", str(exc), errno.EINVAL) from None

"""The file a persistent simulated device lives in, safe against a kill at any point.

``SimulatedBackend(state_dir)`` keeps each device endpoint in its own file,
``state_dir/simulated/<side>/<name>.sim`` (directories mode 0700, file
0600), as hardware outlives the process that drives it: the same name on
the same side is the same device, across plans and restarts.  (Without a
``state_dir``, devices live in memory, as above.)

The file is mapped ``MAP_SHARED``: every store is in the page cache the
moment it happens and survives the process being killed.  There is no
fsync; a crash of the machine is out of scope.  Layout:

* header, 4096 bytes of signed 64-bit words in native byte order:
  ``[0]`` ``FILE_MAGIC`` (``b"SIMDEVST"``), ``[1]`` format version (1),
  then the device's *shape*: ``[2]`` side (0 source, 1 destination), ``[3]``
  state size, ``[4]`` page size, ``[5]`` seed, ``[6]`` capability flags,
  ``[7]`` undo log capacity; then what changes: ``[8]`` migration state,
  ``[9]`` mutation count, ``[10]`` reset count, ``[11]`` undo base, ``[12]``
  undo length; the rest is zero.
* undo log, ``UNDO_ENTRIES`` (4096) entries of two unsigned 64-bit words:
  a content word's index and its value before a mutation.
* the content, ``state size`` bytes, from ``FILE_CONTENT_OFFSET``.

Opening a device locks its file (``flock``, exclusive, non-blocking: a
file another process, or another open in this one, holds is refused with
EBUSY; the lock goes on close, and with a process that dies).  A file that
does not exist is created from the seed, as an in-memory device starts.
One that does is adopted: state, content, mutation and reset counts; its
page digests are rebuilt by hashing the content (it is the prepare phase).
A file whose shape differs from the plan's is refused (EINVAL, naming the
file and each difference; the rates, latency and fault are behaviour, not
shape, and may change); a truncated, overlong or garbage file, or a header
value out of range, is refused with EIO.  The seed of a persistent device
must be a signed 64-bit integer (the backend's ``check_pair`` says so).

Every update that takes several stores is ordered so that a kill between
any two leaves a file the next open can use:

* creation: the file is sized (zeros), the content and header written, the
  magic last; a file that is empty or has no magic is a creation cut short
  (nobody ever used that device) and is created again.
* a mutation batch goes in chunks of at most ``UNDO_ENTRIES``: the undo
  base is set, then for each mutation its undo entry is written, the undo
  length bumped, and only then the word XORed; the chunk is committed by
  the mutation count, then the undo length cleared.  Open undoes a chunk
  whose count was not committed (:attr:`SimulatedDevice.undone` counts the
  entries), so the content always matches the recorded count exactly.
* an arc is one store of the state, once taken (a completed load first
  stores the source's mutation count).  An arc whose latency was being
  slept at the kill has not happened.
* a reset stores ERROR, zeroes the content, then the counts, then RUNNING:
  a reset cut short leaves a device in ERROR, which only a reset leaves.
* a load writes the content while the state says RESUMING.

Invariants: after a kill between any two stores, the next open either
finds no device (and creates it again) or a device whose content matches
its recorded state and mutation count exactly; a file is held by one open
device at a time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from collections.abc import Callable
from pathlib import Path

from orchestrator.backends.simulated.content import (
    _RANDOM_CHUNK,
    _apply_mutations,
    _fill_initial,
    _Layout,
)
from orchestrator.backends.simulated.params import SimulatedParams
from orchestrator.states import DeviceState, MigrationFlags, Side

#: The first 8 bytes of a device state file (not of the stream: that is ``MAGIC``).
FILE_MAGIC = b"SIMDEVST"
FILE_VERSION = 1
#: The header's size: the undo log starts after it.
FILE_HEADER_SIZE = 4096
#: Undo log entries (16 bytes each: word index, old word): the largest mutation chunk.
UNDO_ENTRIES = 4096
#: Where the content starts in the file.
FILE_CONTENT_OFFSET = FILE_HEADER_SIZE + UNDO_ENTRIES * 16

# The header's fields: signed 64-bit words in native byte order, by index.
_H_VERSION = 1  # word 0 is FILE_MAGIC
_H_SIDE = 2  # 0 source, 1 destination
_H_STATE_SIZE = 3
_H_PAGE_SIZE = 4
_H_SEED = 5
_H_FLAGS = 6  # MigrationFlags
_H_UNDO_CAPACITY = 7
_H_STATE = 8  # DeviceState
_H_MUTATIONS = 9
_H_RESETS = 10
_H_UNDO_BASE = 11  # the mutation count the chunk in flight started from
_H_UNDO_LEN = 12  # undo entries valid; 0: no chunk in flight
_H_FIELDS = 13

_SIDE_CODES = {Side.SOURCE: 0, Side.DESTINATION: 1}
_INT64 = (-(1 << 63), (1 << 63) - 1)
_STATE_VALUES = frozenset(int(s) for s in DeviceState)
_ZEROS = memoryview(bytes(_RANDOM_CHUNK))

#: Why a reopened destination in RESUMING refuses to finish its load.
LOST_LOAD = (
    "incomplete stream: the device was reopened in RESUMING and its partial load is lost "
    "(a stream dies with the process that opened the device); only a reset recovers it"
)


def _apply_mutations_logged(
    words: memoryview,
    layout: _Layout,
    key: int,
    first: int,
    count: int,
    pending: bytearray | None,
    stale: bytearray,
    header: memoryview,
    log: memoryview,
) -> int:
    """:func:`_apply_mutations` for a persistent device, safe against a kill at any point.

    The same mutations, in chunks of at most the undo log's capacity.  Before
    each XOR, the word's index and old value go to the undo log and the log's
    length is bumped; after a chunk, the mutation count is committed and the
    log emptied.  A process killed in between leaves a log that
    :meth:`_StateFile.open` undoes, back to the committed count.
    """
    newly_pending = 0
    capacity = len(log) // 2
    end = first + count
    for chunk in range(first, end, capacity):
        stop = min(end, chunk + capacity)
        header[_H_UNDO_BASE] = chunk
        undo = _UndoEntries(header, log)
        newly_pending += _apply_mutations(
            words, layout, key, chunk, stop - chunk, pending, stale, undo.append
        )
        header[_H_MUTATIONS] = stop
        header[_H_UNDO_LEN] = 0
    return newly_pending


class _UndoEntries:
    """Appends to the undo log of one chunk, each entry counted once it is whole."""

    __slots__ = ("header", "log", "slot")

    def __init__(self, header: memoryview, log: memoryview) -> None:
        self.header = header
        self.log = log
        self.slot = 0

    def append(self, index: int, old: int) -> None:
        slot = self.slot
        self.log[slot] = index
        self.log[slot + 1] = old
        self.slot = slot = slot + 2
        self.header[_H_UNDO_LEN] = slot >> 1


def seed_fits_file(seed: int) -> bool:
    """Whether a persistent device can record ``seed`` (a signed 64-bit integer, as in TOML)."""
    return _INT64[0] <= seed <= _INT64[1]


def _flags_text(value: int) -> str:
    names = [flag.name for flag in MigrationFlags if value & flag and flag.name]
    return "|".join(names) if names and value < (1 << len(MigrationFlags)) else str(value)


class _FileProblem(Exception):
    """A state file the device cannot use; becomes a DeviceError of ``open``."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.err = err


def _private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, each with mode 0700."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask


def _allocate(fd: int, size: int) -> None:
    """Give the file ``size`` zero bytes, reserved now: a write through the mapping into
    a hole of a full file system would be a SIGBUS, an ENOSPC here is an error."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


class _StateFile:
    """One persistent device's file, mapped ``MAP_SHARED``: header, undo log, content.

    Every store lands in the page cache at once, so the file holds the
    device as of its last instruction when its process is killed.  What is
    written in several stores is ordered so that a kill between any two of
    them leaves a state :meth:`open` can use (see the module docstring).
    """

    __slots__ = ("base", "content", "created", "fd", "header", "log", "mm", "path", "undone")

    def __init__(self, path: Path, fd: int, mm: mmap.mmap, state_size: int) -> None:
        self.path = path
        self.fd = fd
        self.mm = mm
        self.base = memoryview(mm)
        self.header = self.base[:FILE_HEADER_SIZE].cast("q")
        self.log = self.base[FILE_HEADER_SIZE:FILE_CONTENT_OFFSET].cast("Q")
        self.content = self.base[FILE_CONTENT_OFFSET : FILE_CONTENT_OFFSET + state_size]
        #: The file was created by this open (it did not exist, or its creation was cut).
        self.created = False
        #: Mutations of a chunk cut by a kill, undone by this open.
        self.undone = 0

    @classmethod
    def open(cls, path: Path, side: Side, params: SimulatedParams) -> _StateFile:
        """Lock and map the device's file, creating it from ``params`` if it has none."""
        if not seed_fits_file(params.seed):
            raise _FileProblem(
                f"{path}: seed {params.seed} does not fit the file's signed 64-bit field",
                errno.EINVAL,
            )
        _private_dirs(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _FileProblem(
                    f"{path} is in use: another process (or another open of this device) "
                    "holds its lock",
                    errno.EBUSY,
                ) from None
            size = os.fstat(fd).st_size
            # Until its magic is written, last, a file is a creation that was cut short:
            # nobody ever used that device, so it is created again.
            fresh = size == 0 or os.pread(fd, len(FILE_MAGIC), 0) == bytes(len(FILE_MAGIC))
            if fresh:
                state_size = params.state_bytes
                os.ftruncate(fd, 0)
                _allocate(fd, FILE_CONTENT_OFFSET + state_size)
            else:
                state_size = _check_header(path, fd, size, side, params)
            mm = mmap.mmap(
                fd,
                FILE_CONTENT_OFFSET + state_size,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except BaseException:
            os.close(fd)
            raise
        self = cls(path, fd, mm, state_size)
        try:
            if fresh:
                self._create(side, params)
            else:
                self._undo()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def state(self) -> DeviceState:
        return DeviceState(self.header[_H_STATE])

    @property
    def mutations(self) -> int:
        return self.header[_H_MUTATIONS]

    @property
    def resets(self) -> int:
        return self.header[_H_RESETS]

    def record(self, state: DeviceState, mutations: int) -> None:
        """An arc was taken (a load completed: its mutation count first)."""
        header = self.header
        header[_H_MUTATIONS] = mutations
        header[_H_STATE] = state

    def begin_reset(self) -> None:
        """Zero the content, in ERROR meanwhile: a reset cut short needs another."""
        self.header[_H_STATE] = DeviceState.ERROR
        content = self.content
        size = len(content)
        step = len(_ZEROS)
        for offset in range(0, size, step):
            content[offset : offset + step] = _ZEROS[: min(step, size - offset)]

    def finish_reset(self, resets: int) -> None:
        header = self.header
        header[_H_MUTATIONS] = 0
        header[_H_RESETS] = resets
        header[_H_STATE] = DeviceState.RUNNING

    def __del__(self) -> None:
        # A device dropped without close (cancelled at its checkpoint, say) must not
        # keep its lock for the rest of the process's life.
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        """Unlock, unmap and close.  Safe to call more than once."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)  # mmap holds a dup of the fd
        os.close(self.fd)
        self.fd = -1
        for view in (self.content, self.log, self.header, self.base):
            with contextlib.suppress(BufferError):
                view.release()
        # A view someone still holds keeps the mapping until it is collected; it is no
        # longer written to, and the lock is released already.
        with contextlib.suppress(BufferError):
            self.mm.close()

    def _create(self, side: Side, params: SimulatedParams) -> None:
        _fill_initial(self.content, params, side)
        header = self.header
        header[_H_VERSION] = FILE_VERSION
        header[_H_SIDE] = _SIDE_CODES[side]
        header[_H_STATE_SIZE] = params.state_bytes
        header[_H_PAGE_SIZE] = params.page_bytes
        header[_H_SEED] = params.seed
        header[_H_FLAGS] = params.capabilities.flags
        header[_H_UNDO_CAPACITY] = UNDO_ENTRIES
        header[_H_STATE] = DeviceState.RUNNING
        self.base[: len(FILE_MAGIC)] = FILE_MAGIC  # last: now the file holds a device
        self.created = True

    def _undo(self) -> None:
        """Undo the mutation chunk a kill cut short, if any (see _apply_mutations_logged)."""
        header = self.header
        length = header[_H_UNDO_LEN]
        if not length:
            return
        if header[_H_MUTATIONS] == header[_H_UNDO_BASE]:  # not committed
            log = self.log
            with self.content.cast("Q") as words:
                n_words = len(words)
                entries = [(log[2 * i], log[2 * i + 1]) for i in range(length)]
                bad = [index for index, _ in entries if index >= n_words]
                if bad:
                    raise _FileProblem(
                        f"{self.path} has a corrupt undo log: word {bad[0]} is beyond the "
                        f"{n_words} words of the state",
                        errno.EIO,
                    )
                for index, old in reversed(entries):
                    words[index] = old
            self.undone = length
        header[_H_UNDO_LEN] = 0


def _check_header(path: Path, fd: int, size: int, side: Side, params: SimulatedParams) -> int:
    """Validate an existing file against the device the plan describes; its state size."""
    raw = os.pread(fd, FILE_HEADER_SIZE, 0) if size >= FILE_HEADER_SIZE else b""
    if len(raw) < FILE_HEADER_SIZE:
        raise _FileProblem(
            f"{path} is truncated: {size} bytes, less than the {FILE_HEADER_SIZE}-byte header "
            "of a device state file",
            errno.EIO,
        )
    if raw[: len(FILE_MAGIC)] != FILE_MAGIC:
        raise _FileProblem(
            f"{path} is not a simulated device state file: it starts with "
            f"{raw[: len(FILE_MAGIC)]!r}, not {FILE_MAGIC!r}",
            errno.EIO,
        )
    with memoryview(raw) as view, view.cast("q") as words:
        fields = words[:_H_FIELDS].tolist()
    if fields[_H_VERSION] != FILE_VERSION:
        raise _FileProblem(
            f"{path} has format version {fields[_H_VERSION]}; this simulator reads "
            f"version {FILE_VERSION} (in native byte order)",
            errno.EIO,
        )
    sides = {code: s.value for s, code in _SIDE_CODES.items()}
    shape: list[tuple[str, int, int, Callable[[int], str]]] = [
        ("side", _H_SIDE, _SIDE_CODES[side], lambda v: sides.get(v, str(v))),
        ("state size", _H_STATE_SIZE, params.state_bytes, lambda v: f"{v} bytes"),
        ("page size", _H_PAGE_SIZE, params.page_bytes, lambda v: f"{v} bytes"),
        ("seed", _H_SEED, params.seed, str),
        ("capabilities", _H_FLAGS, params.capabilities.flags, _flags_text),
        ("undo log", _H_UNDO_CAPACITY, UNDO_ENTRIES, lambda v: f"{v} entries"),
    ]
    mismatches = [
        f"{label} {show(fields[slot])} in the file, {show(wanted)} in the plan"
        for label, slot, wanted, show in shape
        if fields[slot] != wanted
    ]
    if mismatches:
        raise _FileProblem(
            f"{path} holds another device than the plan describes: {'; '.join(mismatches)}",
            errno.EINVAL,
        )
    state_size = fields[_H_STATE_SIZE]
    total = FILE_CONTENT_OFFSET + state_size
    if size != total:
        what = "truncated" if size < total else "too long"
        raise _FileProblem(
            f"{path} is {what}: {size} bytes, a device of {state_size} bytes takes {total}",
            errno.EIO,
        )
    problems = []
    if fields[_H_STATE] not in _STATE_VALUES:
        problems.append(f"state {fields[_H_STATE]} is no migration state")
    for label, slot in (
        ("mutation count", _H_MUTATIONS),
        ("reset count", _H_RESETS),
        ("undo base", _H_UNDO_BASE),
    ):
        if fields[slot] < 0:
            problems.append(f"{label} {fields[slot]} is negative")
    if not 0 <= fields[_H_UNDO_LEN] <= UNDO_ENTRIES:
        problems.append(f"undo length {fields[_H_UNDO_LEN]} is not in 0..{UNDO_ENTRIES}")
    if problems:
        raise _FileProblem(f"{path} has a corrupt header: {'; '.join(problems)}", errno.EIO)
    return state_size

"""The simulated backend: a device with real state bytes and injectable faults.

This is the test double of the project, in the spirit of httpx's
``MockTransport``: every test, example plan and benchmark can migrate
simulated devices through the same :class:`~orchestrator.backends.base.Device`
interface the VFIO and vhost-vdpa backends implement, and a test can prove
that the destination ends up holding exactly the bytes the source had.

Theory of operation
-------------------

A device holds ``state_mib`` of state in a ``bytearray`` cut into
``page_kib`` pages (the size is rounded to whole 8-byte words; the last page
may be partial).  A source starts from ``random.Random(seed).randbytes(size)``;
a destination starts from different bytes derived from the seed and its side,
so a load is always visible in its digest.

The *state digest* (what :meth:`SimulatedDevice.state_digest` answers, what
the end record carries and what a load is checked against) is the sha256 of
the concatenated *page digests*, a page's digest being the first 16 bytes of
the page's sha256.  Each device keeps its page digests cached: a mutation
marks its page stale, a page the source sends is rehashed if it was stale,
and a page run a destination loads is rehashed as it lands.  So entering
STOP_COPY and leaving RESUMING hash only what moves in the switchover (the
pages re-sent then), never the whole state: real hardware has no digest to
compute there, and the simulator should not put one in the downtime.

While the device is in a running state (RUNNING, PRE_COPY, RUNNING_P2P,
PRE_COPY_P2P) it dirties its state at ``dirty_mib_s``: page-sized mutations
per second of ``trio.current_time()``, so it follows trio's ``MockClock``.
Dirtying is lazy: every call first catches up with the clock, with a
fractional carry.  Mutation ``k`` (counted by :attr:`SimulatedDevice.mutations`)
is a pure function of ``(seed, k)``: it picks a page and XORs one non-zero
64-bit word into it, so it always changes that page.
:func:`reference_digest` replays mutations ``0..k-1`` on fresh content, which
proves that a device holds its own state and nothing else (a rolled-back
source was neither written into nor reset).

The migration stream
--------------------

The stream is opaque to the orchestrator but checks itself.  All integers
are big-endian.

* header, 20 bytes: ``b"SIMG"``, version ``u16`` (1), flags ``u16`` (0),
  page size ``u32``, state size ``u64``.
* page run, 17 bytes + payload: ``b"P"``, offset ``u64``, length ``u32``,
  crc32 ``u32`` of the tag, offset and length fields followed by the payload.
  A run covers contiguous pages; it starts on a page boundary and ends on one
  or at the end of the state.
* end, 45 bytes: ``b"E"``, mutation count ``u64``, the state digest of the
  source as it was when it stopped (32 bytes), crc32 ``u32`` of the preceding
  41 bytes.

One stream runs from entering a saving state (PRE_COPY, PRE_COPY_P2P or, when
pre-copy is skipped or missing, STOP_COPY) until the device leaves the saving
states; PRE_COPY -> PRE_COPY_P2P -> STOP_COPY keeps the same stream, and a
later saving state starts a new one from scratch.  Pre-copy sends every page
once in index order (the *initial* data), then the pages dirtied since they
were sent.  In a PRE_COPY state ``read`` returns ``b""`` when nothing is
pending right now; in STOP_COPY it sends whatever is pending, the end record,
then ``b""`` for ever.  Reads coalesce contiguous pages up to ``max_bytes``;
a record larger than a read is split across reads.

A destination in RESUMING parses records incrementally (a record may be
split across writes), checks every crc and bound, and applies the pages.  A
bad record poisons the load: that ``write`` and every later one fail naming
the record's stream offset.  RESUMING -> STOP succeeds only when the end
record arrived, nothing was poisoned and the state digest of the loaded
state equals the source's; otherwise the device falls into ERROR.  A loaded
destination continues the source's mutation count, so with the same seed it
dirties exactly as the source would have.

Faults
------

``fault = {at = ..., kind = ..., offset = ..., once = ...}``:

* ``at = "<STATE>"`` without ``offset``: fires when ``set_state`` is asked to
  enter that state (after the arc was validated and its latency slept).
  ``error``: DeviceError, state unchanged.  ``error_state``: DeviceError and
  the device is now in ERROR.  ``hang``: never returns (the runner's deadline
  cancels it; the state is unchanged).  ``corrupt``: the arc succeeds and the
  next stream byte the device produces (source) or consumes (destination)
  is flipped (XOR 0xFF).
* ``at = "stream"``, ``offset = N``: fires on the ``read`` (source) or
  ``write`` (destination) whose byte range covers stream byte ``N``, in every
  stream.  ``error``/``error_state``/``hang`` as above; ``corrupt`` flips
  byte ``N``.
* ``at = "<STATE>"`` with ``offset = N``: entering the state arms the
  ``at = "stream"`` behaviour for byte ``N`` (of the current or a later
  stream).
* ``once = true`` (the default) fires once and clears; ``once = false`` fires
  every time (each entry to the state, or each call covering byte ``N``).

Persistent devices
------------------

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
into ERROR), and a reset recovers it.  Faults, the fractional dirtying carry and the time a device
spent without a process are not kept either: a reopened running device
dirties from its recorded count, from the moment it is opened, so
:func:`reference_digest` of its count still holds; a stopped one stays
frozen.  ``close`` brings every page digest up to date before it unmaps
the content, so :meth:`SimulatedDevice.state_digest` still answers.
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
  ``transition_ms`` before each arc (and each reset), ``n / drain_mib_s``
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

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import random
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn

import trio
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from zlib_ng.zlib_ng import crc32 as _crc32

from orchestrator.backends import precise_sleep
from orchestrator.backends.base import Backend, Device, PrecopyInfo, StreamChunk
from orchestrator.errors import DeviceError, Problem
from orchestrator.states import (
    RUNNING_STATES,
    SAVING_STATES,
    Capabilities,
    DeviceState,
    MigrationFlags,
    Side,
    arcs,
)

__all__ = [
    "END_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "PAGE_DIGEST_SIZE",
    "RUN_HEADER_SIZE",
    "VERSION",
    "FaultSpec",
    "SimulatedBackend",
    "SimulatedDevice",
    "SimulatedParams",
    "reference_digest",
]

MIB = 1 << 20
KIB = 1 << 10

MAGIC = b"SIMG"
VERSION = 1
TAG_RUN = b"P"
TAG_END = b"E"
_HEADER = struct.Struct(">4sHHIQ")  # magic, version, flags, page size, state size
_RUN_FIELDS = struct.Struct(">cQI")  # tag, offset, length: what the run's crc covers first
_RUN = struct.Struct(">cQII")  # the fields above, then crc32
_END = struct.Struct(">cQ32sI")  # tag, mutation count, sha256, crc32 of the rest
HEADER_SIZE = _HEADER.size
RUN_HEADER_SIZE = _RUN.size
END_SIZE = _END.size

FaultKind = Literal["error", "error_state", "hang", "corrupt"]

#: States a fault can be injected at: every one a device can be asked to enter.
FAULT_STATES: tuple[str, ...] = tuple(s.name for s in DeviceState if s is not DeviceState.ERROR)
_PRE_COPY_STATES = frozenset({DeviceState.PRE_COPY, DeviceState.PRE_COPY_P2P})
_ERROR = DeviceState.ERROR
_RESUMING = DeviceState.RESUMING
_STOP_COPY = DeviceState.STOP_COPY

# Bound once: the hot paths call them on every device call.
_checkpoint = trio.lowlevel.checkpoint
_sleep = precise_sleep.sleep
_current_time = trio.current_time


class FaultSpec(BaseModel):
    """One injected fault: where it fires, what it does, how often."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: str = Field(
        description='A device state the fault fires on entering (for example "STOP_COPY"; '
        'case-insensitive), or "stream" to fire at the stream byte `offset`.'
    )
    kind: FaultKind = Field(
        description="error: the call fails, state unchanged; error_state: the call fails and "
        "the device is in ERROR; hang: the call never returns; corrupt: one stream byte is "
        "flipped."
    )
    offset: int | None = Field(
        default=None,
        ge=0,
        description='Stream byte offset the fault fires at; required with at = "stream". '
        "With a state, entering the state arms the fault for this byte.",
    )
    once: bool = Field(
        default=True,
        description="Fire once, then clear; false fires every time the trigger is met.",
    )

    @field_validator("at")
    @classmethod
    def _normalise_at(cls, value: str) -> str:
        name = value.strip()
        if name.lower() == "stream":
            return "stream"
        upper = name.upper()
        if upper == DeviceState.ERROR.name:
            raise ValueError(
                "a fault cannot be injected at ERROR: a device only falls into ERROR; "
                "use kind = 'error_state' at the state whose entry should fail"
            )
        if upper not in FAULT_STATES:
            raise ValueError(
                f"unknown fault point {value!r}: expected 'stream' or one of "
                f"{', '.join(FAULT_STATES)}"
            )
        return upper

    @model_validator(mode="after")
    def _stream_needs_offset(self) -> FaultSpec:
        if self.at == "stream" and self.offset is None:
            raise ValueError('a fault at "stream" needs offset = the stream byte it fires at')
        return self

    @property
    def state(self) -> DeviceState | None:
        """The state whose entry triggers the fault; None for a stream fault."""
        return None if self.at == "stream" else DeviceState[self.at]


class SimulatedParams(BaseModel):
    """The ``source`` or ``destination`` table of a ``backend = "simulated"`` device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_mib: float = Field(
        default=1.0,
        gt=0,
        le=4096,
        allow_inf_nan=False,
        description="Size of the device state in MiB (rounded to whole 8-byte words).",
    )
    page_kib: int = Field(
        default=4,
        ge=1,
        le=1024,
        description="Page size in KiB, a power of two: the unit of dirtying and of transfer.",
    )
    dirty_mib_s: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="MiB per second of pages the running device rewrites (0: never).",
    )
    transition_ms: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="Latency of each state arc (and of a reset), in milliseconds.",
    )
    drain_mib_s: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Rate, in MiB/s, at which the device produces (read) or consumes (write) "
        "stream bytes; unset: unlimited.",
    )
    p2p: bool = Field(default=True, description="The device has the P2P (NDMA) states.")
    pre_copy: bool = Field(default=True, description="The device has the PRE_COPY states.")
    seed: int = Field(default=0, description="Seed of the initial content and of the dirtying.")
    fault: FaultSpec | None = Field(default=None, description="A fault to inject, if any.")

    @field_validator("page_kib")
    @classmethod
    def _page_power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"page_kib must be a power of two (1, 2, 4, ..., 1024), not {value}")
        return value

    @property
    def state_bytes(self) -> int:
        """The state size in bytes: ``state_mib`` rounded to whole 8-byte words."""
        return max(8, round(self.state_mib * MIB / 8) * 8)

    @property
    def page_bytes(self) -> int:
        return self.page_kib * KIB

    @property
    def capabilities(self) -> Capabilities:
        flags = MigrationFlags.STOP_COPY
        if self.p2p:
            flags |= MigrationFlags.P2P
        if self.pre_copy:
            flags |= MigrationFlags.PRE_COPY
        return Capabilities(flags, stop_copy_size=True, dirty_logging=False)


# --- content and dirtying ---------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


@dataclass(frozen=True, slots=True)
class _Layout:
    size: int
    page_size: int
    n_pages: int
    words_per_page: int

    @classmethod
    def of(cls, params: SimulatedParams) -> _Layout:
        size, page = params.state_bytes, params.page_bytes
        return cls(size, page, -(-size // page), page // 8)

    @property
    def full_stream_bound(self) -> int:
        """Upper bound of a whole stream: header, one record per page, end."""
        return HEADER_SIZE + self.size + self.n_pages * RUN_HEADER_SIZE + END_SIZE


#: Bytes of ``randbytes`` drawn at a time: a multiple of 4, so the chunks concatenate to
#: exactly ``randbytes(size)`` (it is ``getrandbits(8 * n)`` in little-endian order, whose
#: 32-bit words come off the generator in order), without building one huge integer.
_RANDOM_CHUNK = 1 << 20


#: A read on a device with a drain rate returns at most this long's worth of data.
_READ_WINDOW_S = 0.1

#: States larger than this are made (or mapped and hashed) in a worker thread.
_OPEN_IN_THREAD_BYTES = 8 << 20


def _initial_content(params: SimulatedParams, side: Side) -> bytearray:
    content = bytearray(params.state_bytes)
    _fill_initial(content, params, side)
    return content


def _fill_initial(content: bytearray | memoryview, params: SimulatedParams, side: Side) -> None:
    """Write a fresh device's content (``params.state_bytes`` long) into ``content``."""
    size = params.state_bytes
    if side is Side.SOURCE:
        rng = random.Random(params.seed)
    else:
        rng = random.Random(f"simulated:{side.name}:{params.seed}")
    for offset in range(0, size, _RANDOM_CHUNK):
        content[offset : offset + _RANDOM_CHUNK] = rng.randbytes(min(_RANDOM_CHUNK, size - offset))


def _mutation_key(seed: int) -> int:
    return (seed * _MIX1 + _GOLDEN) & _MASK64


def _apply_mutations(
    words: memoryview,
    layout: _Layout,
    key: int,
    first: int,
    count: int,
    pending: bytearray | None,
    stale: bytearray,
) -> int:
    """Apply mutations ``first .. first+count-1``; return how many pages became pending.

    Mutation ``k`` is splitmix64 of ``(key, k)``: the value picks the page and
    the word in it, and (made odd, so non-zero) is XORed into that word.  Every
    page touched is flagged in ``stale`` (its cached digest no longer holds).
    """
    n_pages = layout.n_pages
    per_page = layout.words_per_page
    n_words = len(words)
    newly_pending = 0
    for k in range(first, first + count):
        page, index, value = _mutation_site(key, k, n_pages, per_page, n_words)
        words[index] ^= value
        stale[page] = 1
        if pending is not None and not pending[page]:
            pending[page] = 1
            newly_pending += 1
    return newly_pending


def _mutation_site(
    key: int, k: int, n_pages: int, per_page: int, n_words: int
) -> tuple[int, int, int]:
    """Where the k-th mutation lands and what it XORs in: (page, word index, value).

    A splitmix64-style mix of the device's key and k; the value is odd, so
    the word always changes.  Both mutation loops use it, so an in-memory and
    a persistent device dirty exactly the same words.
    """
    x = (key + k * _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    x ^= x >> 31
    page = x % n_pages
    base = page * per_page
    index = base + (x >> 40) % per_page
    if index >= n_words:  # the last page is partial
        index = base + (index - base) % (n_words - base)
    return page, index, x | 1


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

    The same mutations (both place them with :func:`_mutation_site`), in
    chunks of at most the undo log's capacity.  Before each XOR, the word's
    index and old value go to the undo log and the log's length is bumped;
    after a chunk, the mutation count is committed and the log emptied.  A
    process killed in between leaves a log
    that :meth:`_StateFile.open` undoes, back to the committed count.
    """
    n_pages = layout.n_pages
    per_page = layout.words_per_page
    n_words = len(words)
    newly_pending = 0
    capacity = len(log) // 2
    end = first + count
    for chunk in range(first, end, capacity):
        stop = min(end, chunk + capacity)
        header[_H_UNDO_BASE] = chunk
        slot = 0
        for k in range(chunk, stop):
            page, index, value = _mutation_site(key, k, n_pages, per_page, n_words)
            log[slot] = index
            log[slot + 1] = words[index]
            slot += 2
            header[_H_UNDO_LEN] = slot >> 1
            words[index] ^= value
            stale[page] = 1
            if pending is not None and not pending[page]:
                pending[page] = 1
                newly_pending += 1
        header[_H_MUTATIONS] = stop
        header[_H_UNDO_LEN] = 0
    return newly_pending


def reference_digest(params: SimulatedParams, mutations: int, *, reset: bool = False) -> str:
    """The state digest of a source after ``mutations`` mutations, rebuilt from scratch.

    The content is rebuilt and every page hashed afresh: no device's cache is
    involved, so this checks the cache of the device it is compared with.
    ``reset=True``: the content a device holds after a reset (zeros) and then
    ``mutations`` mutations.
    """
    layout = _Layout.of(params)
    content = bytearray(layout.size) if reset else _initial_content(params, Side.SOURCE)
    with memoryview(content) as view, view.cast("Q") as words:
        key = _mutation_key(params.seed)
        _apply_mutations(words, layout, key, 0, mutations, None, bytearray(layout.n_pages))
        page_digests = _hash_pages(view, layout.page_size, 0, layout.n_pages)
    return hashlib.sha256(page_digests).hexdigest()


# --- page digests -----------------------------------------------------------------------

#: Bytes of a page's sha256 its page digest keeps.
PAGE_DIGEST_SIZE = 16


def _hash_pages(view: memoryview, page_size: int, start: int, stop: int) -> bytes:
    """The page digests of pages ``start .. stop-1`` of ``view`` (bytes), concatenated."""
    sha256 = hashlib.sha256
    end = min(stop * page_size, len(view))
    return b"".join(
        [
            sha256(view[offset : offset + page_size]).digest()[:PAGE_DIGEST_SIZE]
            for offset in range(start * page_size, end, page_size)
        ]
    )


class _PageDigests:
    """A device's page digests, kept exact without a full pass.

    ``digests`` holds one page digest per page; a page's entry is its
    content's digest unless its ``stale`` flag is set.  Mutations set the flag
    (:func:`_apply_mutations`), :meth:`rehash` recomputes pages just written,
    :meth:`refresh` the stale ones of a range, and :meth:`state_digest` the
    stale ones left before combining.
    """

    __slots__ = ("_clean", "digests", "hashed", "layout", "stale", "view")

    def __init__(self, layout: _Layout) -> None:
        self.layout = layout
        self.view = memoryview(b"")
        self.digests = bytearray(layout.n_pages * PAGE_DIGEST_SIZE)
        self.stale = bytearray(layout.n_pages)
        self._clean = memoryview(bytes(layout.n_pages))
        #: Page digests computed so far, over the device's life (for tests).
        self.hashed = 0

    def track(
        self, content: bytearray | memoryview, known: Literal["hash", "stale", "zeros"]
    ) -> None:
        """Follow new content: ``hash`` every page now, leave every page ``stale``
        (hashed when first asked for), or take the content as all ``zeros``."""
        layout = self.layout
        self.view.release()
        self.view = memoryview(content)
        if known == "hash":
            self.stale = bytearray(layout.n_pages)
            self.rehash(0, layout.n_pages)
        elif known == "stale":
            self.stale = bytearray(b"\x01") * layout.n_pages
        else:
            full, rest = divmod(layout.size, layout.page_size)
            zeros = bytes(layout.page_size)
            digests = _hash_pages(memoryview(zeros), layout.page_size, 0, 1) * full
            if rest:
                digests += _hash_pages(memoryview(zeros[:rest]), layout.page_size, 0, 1)
            self.digests[:] = digests
            self.stale = bytearray(layout.n_pages)
            self.hashed += 1 + bool(rest)

    def rehash(self, start: int, stop: int) -> None:
        """Hash pages ``start .. stop-1`` now: their content was just written."""
        self.digests[start * PAGE_DIGEST_SIZE : stop * PAGE_DIGEST_SIZE] = _hash_pages(
            self.view, self.layout.page_size, start, stop
        )
        self.stale[start:stop] = self._clean[: stop - start]
        self.hashed += stop - start

    def refresh(self, start: int, stop: int) -> None:
        """Rehash the stale pages among ``start .. stop-1``."""
        stale = self.stale
        first = stale.find(1, start, stop)
        while first >= 0:
            end = stale.find(0, first, stop)
            if end < 0:
                end = stop
            self.rehash(first, end)
            first = stale.find(1, end, stop)

    def state_digest(self) -> bytes:
        """sha256 of the page digests, once the stale pages are rehashed."""
        self.refresh(0, self.layout.n_pages)
        return hashlib.sha256(self.digests).digest()


def _flip(data: StreamChunk, index: int) -> bytes:
    corrupted = bytearray(data)
    corrupted[index] ^= 0xFF
    return bytes(corrupted)


# --- the stream -------------------------------------------------------------------------


class _Saver:
    """The source side of one stream: what is pending, what was built, what was read."""

    def __init__(
        self,
        layout: _Layout,
        content: memoryview,
        pages: _PageDigests,
        finish: Callable[[], tuple[int, bytes]],
    ) -> None:
        self.layout = layout
        self.content = content
        self.pages = pages
        self.finish = finish
        self.pending = bytearray(b"\x01") * layout.n_pages
        self.pending_count = layout.n_pages
        self.zeros = memoryview(bytes(layout.n_pages))
        self.sweep_next = 0  # pages below it were sent by the initial sweep
        self.cursor = 0  # where the search for dirty pages resumes
        self.header_built = False
        self.end_built = False
        self.built = 0  # stream bytes built so far
        self.read_pos = 0  # stream bytes handed to the reader
        self.initial_end = 0  # stream offset just past the last initial record built
        self.leftover: memoryview = memoryview(b"")  # built, not yet read: built - read_pos

    def produce(self, max_bytes: int, stopped: bool) -> bytes:
        """The next up to ``max_bytes`` of the stream (counted as read)."""
        parts: list[bytes | memoryview] = []
        taken = 0
        if self.leftover:
            head = self.leftover[:max_bytes]
            self.leftover = self.leftover[len(head) :]
            parts.append(head)
            taken = len(head)
        page_record = RUN_HEADER_SIZE + self.layout.page_size
        while taken < max_bytes:
            budget = max_bytes - taken
            if taken and budget < page_record:
                break  # rather than split a record just to fill this read
            record = self._next_record(budget, stopped)
            if record is None:
                break
            for part in record:
                parts.append(part)
                taken += len(part)
        data = b"".join(parts)
        if len(data) > max_bytes:
            self.leftover = memoryview(data)[max_bytes:]
            data = data[:max_bytes]
        self.read_pos += len(data)
        return data

    def unread(self, data: bytes) -> None:
        """Give back what ``produce`` returned: the next read starts with it again."""
        if data:
            self.leftover = memoryview(data + bytes(self.leftover))
            self.read_pos -= len(data)

    def _next_record(self, budget: int, stopped: bool) -> list[bytes | memoryview] | None:
        layout = self.layout
        if not self.header_built:
            self.header_built = True
            header = _HEADER.pack(MAGIC, VERSION, 0, layout.page_size, layout.size)
            self.built += len(header)
            self.initial_end = self.built
            return [header]
        fit = max(1, (budget - RUN_HEADER_SIZE) // layout.page_size)
        if self.sweep_next < layout.n_pages:
            start = self.sweep_next
            stop = min(layout.n_pages, start + fit)
            self.sweep_next = stop
            record = self._run(start, stop)
            self.initial_end = self.built
            return record
        if self.pending_count:
            start = self.pending.find(1, self.cursor)
            if start < 0:
                start = self.pending.find(1, 0, self.cursor)
            limit = min(layout.n_pages, start + fit)
            stop = self.pending.find(0, start, limit)
            if stop < 0:
                stop = limit
            self.cursor = stop % layout.n_pages
            return self._run(start, stop)
        if stopped and not self.end_built:
            self.end_built = True
            mutations, digest = self.finish()
            body = _END.pack(TAG_END, mutations, digest, 0)[: END_SIZE - 4]
            end = body + struct.pack(">I", _crc32(body))
            self.built += len(end)
            return [end]
        return None

    def _run(self, start: int, stop: int) -> list[bytes | memoryview]:
        """The record of pages ``start .. stop-1``, which are no longer pending.

        Those that changed since they were hashed are rehashed as they leave, so
        the end record's digest has only the pages sent in stop-copy to hash.
        """
        self.pending[start:stop] = self.zeros[: stop - start]
        self.pending_count -= stop - start
        self.pages.refresh(start, stop)
        page = self.layout.page_size
        offset = start * page
        end = min(stop * page, self.layout.size)
        payload = self.content[offset:end]
        fields = _RUN_FIELDS.pack(TAG_RUN, offset, end - offset)
        header = _RUN.pack(TAG_RUN, offset, end - offset, _crc32(payload, _crc32(fields)))
        self.built += len(header) + len(payload)
        return [header, payload]

    def precopy_info(self) -> PrecopyInfo:
        layout = self.layout
        unswept = layout.n_pages - self.sweep_next
        initial_unread = max(0, self.initial_end - self.read_pos)
        initial = (
            max(0, layout.size - self.sweep_next * layout.page_size)
            + (0 if self.header_built else HEADER_SIZE)
            + initial_unread
        )
        built_unread = self.built - self.read_pos
        dirty = (self.pending_count - unswept) * layout.page_size + built_unread - initial_unread
        return PrecopyInfo(initial_bytes=initial, dirty_bytes=dirty)

    def stop_copy_size(self) -> int:
        """Upper bound of what is left: one record per pending page, then the end."""
        return (
            len(self.leftover)
            + (0 if self.header_built else HEADER_SIZE)
            + min(self.pending_count * self.layout.page_size, self.layout.size)
            + self.pending_count * RUN_HEADER_SIZE
            + (0 if self.end_built else END_SIZE)
        )


class _BadStream(Exception):
    """A record the loader rejects; the message names its stream offset."""


class _Loader:
    """The destination side of one stream: an incremental, checking parser."""

    def __init__(self, layout: _Layout, content: memoryview, pages: _PageDigests) -> None:
        self.layout = layout
        self.content = content
        self.pages = pages
        self.received = 0  # stream bytes written so far
        self.parsed = 0  # stream bytes parsed and applied
        self.inbuf = bytearray()  # received, not yet parsed: a partial record
        self.header_ok = False
        self.end: tuple[int, bytes] | None = None  # (mutation count, state digest)
        self.poison: str | None = None

    def feed(self, data: StreamChunk) -> None:
        if self.poison is not None:
            raise _BadStream(self.poison)
        self.received += len(data)
        source: StreamChunk = data
        if self.inbuf:
            self.inbuf += data
            source = self.inbuf
        with memoryview(source) as view:
            used = self._parse(view)
            if used or source is not self.inbuf:
                self.inbuf = bytearray(view[used:])

    def _reject(self, at: int, reason: str) -> NoReturn:
        self.poison = f"bad record at stream offset {at}: {reason}"
        raise _BadStream(self.poison)

    def _parse(self, view: memoryview) -> int:
        """Apply every complete record in ``view``; return the bytes used."""
        layout = self.layout
        pos = 0
        size = len(view)
        try:
            while pos < size:
                at = self.parsed + pos
                if not self.header_ok:
                    if size - pos < HEADER_SIZE:
                        break
                    magic, version, flags, page, state = _HEADER.unpack_from(view, pos)
                    if magic != MAGIC:
                        self._reject(at, f"bad magic {magic!r}, expected {MAGIC!r}")
                    if version != VERSION or flags != 0:
                        self._reject(at, f"unsupported version {version} flags {flags:#x}")
                    if page != layout.page_size or state != layout.size:
                        self._reject(
                            at,
                            f"stream of {state} bytes in {page}-byte pages, device holds "
                            f"{layout.size} bytes in {layout.page_size}-byte pages",
                        )
                    self.header_ok = True
                    pos += HEADER_SIZE
                    continue
                if self.end is not None:
                    self._reject(at, "data after the end record")
                tag = view[pos : pos + 1]
                if tag == TAG_RUN:
                    if size - pos < RUN_HEADER_SIZE:
                        break
                    _, offset, length, crc = _RUN.unpack_from(view, pos)
                    end = offset + length
                    if (
                        offset % layout.page_size
                        or length <= 0
                        or end > layout.size
                        or (length % layout.page_size and end != layout.size)
                    ):
                        self._reject(at, f"page run [{offset}, {end}) out of bounds")
                    if size - pos < RUN_HEADER_SIZE + length:
                        break
                    body = pos + RUN_HEADER_SIZE
                    payload = view[body : body + length]
                    fields = view[pos : pos + _RUN_FIELDS.size]
                    if _crc32(payload, _crc32(fields)) != crc:
                        self._reject(at, f"crc mismatch in page run [{offset}, {end})")
                    self.content[offset:end] = payload
                    page = layout.page_size
                    self.pages.rehash(offset // page, -(-end // page))
                    pos = body + length
                elif tag == TAG_END:
                    if size - pos < END_SIZE:
                        break
                    _, mutations, digest, crc = _END.unpack_from(view, pos)
                    if _crc32(view[pos : pos + END_SIZE - 4]) != crc:
                        self._reject(at, "crc mismatch in the end record")
                    self.end = (mutations, digest)
                    pos += END_SIZE
                else:
                    self._reject(at, f"unknown record tag {bytes(tag)!r}")
        finally:
            self.parsed += pos
        return pos

    def verdict(self) -> str | None:
        """Why the loaded state cannot be used, or None when it is the source's."""
        if self.poison is not None:
            return self.poison
        if not self.header_ok:
            return f"incomplete stream: no header ({self.received} bytes received)"
        if self.inbuf:
            return f"incomplete stream: it ends inside a record at offset {self.parsed}"
        if self.end is None:
            return f"incomplete stream: no end record ({self.received} bytes received)"
        loaded = self.pages.state_digest()
        if loaded != self.end[1]:
            return (
                f"loaded state digest {loaded.hex()} differs from the source's {self.end[1].hex()}"
            )
        return None


# --- persistence ------------------------------------------------------------------------

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


# --- the device -------------------------------------------------------------------------


@dataclass(slots=True)
class _ArmedFault:
    kind: FaultKind
    offset: int | None  # None: the next stream byte


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
        self._fault = params.fault
        self._armed: _ArmedFault | None = None
        self._transition_s = params.transition_ms / 1000
        self._drain_bytes_s = None if params.drain_mib_s is None else params.drain_mib_s * MIB
        self._dirty_per_s = params.dirty_mib_s * MIB / self._layout.page_size
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
        self._carry = 0.0
        self._last = 0.0
        self._saver: _Saver | None = None
        self._loader: _Loader | None = None

    # -- introspection for tests (sync; the Device interface is async) --

    @property
    def state(self) -> DeviceState:
        return self._state

    @property
    def fault(self) -> FaultSpec | None:
        """The configured fault still to fire (None once a ``once`` fault fired)."""
        return self._fault

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
            self._last = _current_time()
            self._opened = self._live = True
        return self._capabilities

    async def get_state(self) -> DeviceState:
        await _checkpoint()
        self._catch_up("get_state")
        return self._state

    async def set_state(self, target: DeviceState) -> None:
        delay = self._transition_s
        if not delay:
            await _checkpoint()
        try:
            self._catch_up("set_state")
            current = self._state
            if current is _ERROR:
                raise self._device_error(
                    "set_state",
                    "the device is in ERROR; only a reset leaves it",
                    errno.EINVAL,
                    target,
                )
            targets = self._arcs.get(current)
            if targets is None or target not in targets:
                raise self._device_error(
                    "set_state",
                    f"{current.name} -> {target.name} is not one arc of the state model "
                    f"for this device",
                    errno.EINVAL,
                    target,
                )
        except DeviceError:
            if delay:  # refused at once, no latency: still a checkpoint
                await _checkpoint()
            raise
        if delay:
            await _sleep(delay)
            if self._dirty_per_s:
                self._advance()
        fault = self._fault
        if fault is not None and fault.state is target:
            if fault.once:
                self._fault = None
            if fault.offset is None and fault.kind != "corrupt":
                await self._fire(fault.kind, "set_state", f"entering {target.name}", target)
            self._armed = _ArmedFault(fault.kind, fault.offset)
        self._enter(target)

    async def read(self, max_bytes: int) -> bytes:
        drain = self._drain_bytes_s
        # The drain delay is the call's checkpoint, unless a fault may fire before it.
        rate = drain if self._fault is None and self._armed is None else None
        if rate is None:
            await _checkpoint()
        try:
            self._catch_up("read")
            saver = self._saver
            if saver is None:
                raise self._no_stream("read")
            if max_bytes <= 0:
                raise self._device_error(
                    "read", f"max_bytes must be positive, not {max_bytes}", errno.EINVAL
                )
        except DeviceError:
            if rate is not None:
                await _checkpoint()
            raise
        if drain is not None:
            # A device hands over what it has produced, not all that was asked
            # for: at most about 100 ms of its drain rate per read, so a slow
            # device answers each call promptly instead of blocking for the
            # whole buffer (and tripping the caller's deadline).
            max_bytes = min(max_bytes, max(self._layout.page_size, int(drain * _READ_WINDOW_S)))
        start = saver.read_pos
        data = saver.produce(max_bytes, stopped=self._state is _STOP_COPY)
        try:
            if rate is not None:
                if data:
                    await _sleep(len(data) / rate)
                else:
                    await _checkpoint()
                return data
            fired = self._stream_fault(start, len(data))
            if fired is not None:
                kind, offset = fired
                if kind == "corrupt":
                    data = _flip(data, offset - start)
                else:
                    await self._fire(kind, "read", f"stream offset {offset}")
            if drain is not None and data:
                await _sleep(len(data) / drain)
        except BaseException:
            if self._saver is saver:
                saver.unread(data)
            raise
        return data

    async def write(self, data: StreamChunk) -> None:
        rate = self._drain_bytes_s if data else None  # the drain delay is the checkpoint
        if rate is None:
            await _checkpoint()
        try:
            self._catch_up("write")
            loader = self._loader
            if loader is None:
                raise self._device_error(
                    "write",
                    f"the device loads only in RESUMING, not {self._state.name}",
                    errno.EINVAL,
                )
            if loader.poison is not None:
                raise self._device_error("write", loader.poison, errno.EINVAL)
        except DeviceError:
            if rate is not None:
                await _checkpoint()
            raise
        if rate is not None:
            await _sleep(len(data) / rate)
        if self._fault is not None or self._armed is not None:
            fired = self._stream_fault(loader.received, len(data))
            if fired is not None:
                kind, offset = fired
                if kind == "corrupt":
                    data = _flip(data, offset - loader.received)
                else:
                    await self._fire(kind, "write", f"stream offset {offset}")
        try:
            loader.feed(data)
        except _BadStream as exc:
            raise self._device_error("write", str(exc), errno.EINVAL) from None

    async def precopy_info(self) -> PrecopyInfo:
        await _checkpoint()
        self._catch_up("precopy_info")
        if self._state not in _PRE_COPY_STATES:
            raise self._device_error(
                "precopy_info",
                f"precopy info exists only in PRE_COPY states, not {self._state.name}",
                errno.EINVAL,
            )
        if self._saver is None:
            raise self._no_stream("precopy_info")
        return self._saver.precopy_info()

    async def stop_copy_size(self) -> int:
        await _checkpoint()
        self._catch_up("stop_copy_size")
        if self._state is _ERROR:
            raise self._device_error("stop_copy_size", "the device is in ERROR", errno.EINVAL)
        if self._saver is None:
            return self._layout.full_stream_bound
        return self._saver.stop_copy_size()

    async def reset(self) -> None:
        delay = self._transition_s
        if not delay:
            await _checkpoint()
        try:
            self._catch_up("reset")
        except DeviceError:
            if delay:
                await _checkpoint()
            raise
        if delay:
            await _sleep(delay)
        self._saver = None
        self._loader = None
        file = self._file
        if file is None:
            self._set_content(bytearray(self._layout.size), "zeros")
        else:
            file.begin_reset()
            self._set_content(file.content, "zeros")
        self._state = DeviceState.RUNNING
        self._armed = None
        self._carry = 0.0
        self._last = _current_time()
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

    def _catch_up(self, operation: str) -> None:
        """Every call, after its checkpoint: the open check, and catching up with the clock."""
        if not self._live:
            message = "the device is not open" if not self._opened else "the device is closed"
            raise self._device_error(operation, message, errno.EBADF)
        if self._dirty_per_s:
            self._advance()

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
        if not self._dirty_per_s:
            return  # nothing ever dirties: the clock does not matter
        now = _current_time()
        if self._state in RUNNING_STATES:
            due = self._carry + (now - self._last) * self._dirty_per_s
            count = int(due)
            self._carry = due - count
            if count:
                saver = self._saver
                file = self._file
                if file is None:
                    newly = _apply_mutations(
                        self._words,
                        self._layout,
                        self._key,
                        self.mutations,
                        count,
                        None if saver is None else saver.pending,
                        self._pages.stale,
                    )
                else:
                    newly = _apply_mutations_logged(
                        self._words,
                        self._layout,
                        self._key,
                        self.mutations,
                        count,
                        None if saver is None else saver.pending,
                        self._pages.stale,
                        file.header,
                        file.log,
                    )
                if saver is not None:
                    saver.pending_count += newly
                self.mutations += count
        self._last = now

    def _enter(self, target: DeviceState) -> None:
        """Take the arc's effects on the stream, then the state."""
        current = self._state
        loader = self._loader
        if current is _RESUMING and loader is not None:
            problem = loader.verdict()
            if problem is not None:
                self._enter_error()
                raise self._device_error("set_state", f"load failed: {problem}", errno.EIO, target)
            if loader.end is not None:  # always, once the verdict is good
                self.mutations = loader.end[0]
            self._carry = 0.0
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
        self._state = DeviceState.ERROR
        self._saver = None
        self._loader = None
        if self._file is not None:
            self._file.record(DeviceState.ERROR, self.mutations)

    def _end_facts(self) -> tuple[int, bytes]:
        return self.mutations, self._pages.state_digest()

    def _stream_fault(self, start: int, length: int) -> tuple[FaultKind, int] | None:
        """The fault, if any, that fires on a call moving stream bytes [start, start+length)."""
        if not length:
            return None
        armed = self._armed
        if armed is not None:
            offset = start if armed.offset is None else armed.offset
            if start <= offset < start + length:
                self._armed = None
                return armed.kind, offset
        fault = self._fault
        if (
            fault is not None
            and fault.offset is not None
            and fault.at == "stream"
            and start <= fault.offset < start + length
        ):
            if fault.once:
                self._fault = None
            return fault.kind, fault.offset
        return None

    async def _fire(
        self, kind: FaultKind, operation: str, where: str, target: DeviceState | None = None
    ) -> NoReturn:
        if kind == "hang":
            await trio.sleep_forever()
        if kind == "error_state":
            self._enter_error()
        raise self._device_error(operation, f"injected {kind} fault at {where}", errno.EIO, target)


# --- the backend ------------------------------------------------------------------------

#: What a destination table inherits from its source when it omits them.
_INHERITED = ("state_mib", "page_kib", "p2p", "pre_copy", "seed")


def _params(params: BaseModel) -> SimulatedParams:
    if not isinstance(params, SimulatedParams):
        raise TypeError(f"expected SimulatedParams, got {type(params).__name__}")
    return params


class SimulatedBackend(Backend):
    """``backend = "simulated"``: devices for tests, examples and benchmarks.

    Without a ``state_dir`` its devices live in memory and die with their
    objects.  With one, each device endpoint lives in its own file,
    ``state_dir/simulated/<side>/<name>.sim``, and survives its process: the
    same name on the same side is the same device, across plans and restarts.
    """

    name: ClassVar[str] = "simulated"
    params_model: ClassVar[type[BaseModel]] = SimulatedParams

    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = state_dir

    def __repr__(self) -> str:
        where = "in memory" if self.state_dir is None else f"in {self.state_dir}"
        return f"<SimulatedBackend {where}>"

    def device_file(self, name: str, side: Side) -> Path:
        """Where a persistent device lives (only with a ``state_dir``)."""
        if self.state_dir is None:
            raise ValueError("an in-memory simulated backend keeps no device files")
        if not name or name.startswith(".") or "/" in name or "\0" in name:
            raise ValueError(f"device name {name!r} cannot name a file")
        return self.state_dir / "simulated" / side.value / f"{name}.sim"

    def destination_defaults(self, source: BaseModel) -> Mapping[str, Any]:
        params = _params(source)
        return {field: getattr(params, field) for field in _INHERITED}

    def static_capabilities(self, params: BaseModel) -> Capabilities:
        return _params(params).capabilities

    def check_pair(self, source: BaseModel, destination: BaseModel) -> list[Problem]:
        src, dst = _params(source), _params(destination)
        problems = []
        if src.state_bytes != dst.state_bytes:
            problems.append(
                Problem(
                    "destination.state_mib",
                    f"the destination holds {dst.state_mib} MiB of state, the source "
                    f"{src.state_mib} MiB: the stream could not load",
                )
            )
        if src.page_kib != dst.page_kib:
            problems.append(
                Problem(
                    "destination.page_kib",
                    f"the destination uses {dst.page_kib} KiB pages, the source "
                    f"{src.page_kib} KiB: the stream could not load",
                )
            )
        if self.state_dir is not None:
            for where, params in (("source", src), ("destination", dst)):
                if not seed_fits_file(params.seed):
                    problems.append(
                        Problem(
                            f"{where}.seed",
                            f"a persistent simulated device needs a seed in the signed 64-bit "
                            f"range, not {params.seed}",
                        )
                    )
        return problems

    def create(self, name: str, side: Side, params: BaseModel) -> SimulatedDevice:
        state_file = None if self.state_dir is None else self.device_file(name, side)
        return SimulatedDevice(name, side, _params(params), state_file=state_file)

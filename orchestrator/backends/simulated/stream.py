"""The migration stream of a simulated device: its format, its saver and its loader.

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
were sent.  A device with ``reinit_mib`` sends its first pages (that much) once
more as new initial data when a pre-copy information query finds its initial
data drained for the ``reinit_after``-th time; that query says so (``reinit``)
and counts them.  In a PRE_COPY state ``read`` returns ``b""`` when nothing is
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

Invariants:

* A saver hands every byte it built to the reader exactly once, in order:
  what a failed or cancelled call returned goes back (:meth:`_Saver.unread`)
  and is the start of the next read.
* A page is sent only after it is rehashed if stale, so the end record's
  digest costs only the pages sent in stop-copy.
* A loader applies a record only once it is whole and every crc and bound
  checked; after the first bad record it accepts nothing.
* Checksums are CRC-32 over memoryviews (zlib-ng's, as the data channel's:
  5 us for a 256 KiB read where the standard library's took 64 us).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NoReturn

from zlib_ng.zlib_ng import crc32 as _crc32

from orchestrator.backends.base import PrecopyInfo, StreamChunk
from orchestrator.backends.simulated.content import _Layout, _PageDigests

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


def full_stream_bound(layout: _Layout) -> int:
    """Upper bound of a whole stream: header, one record per page, end."""
    return HEADER_SIZE + layout.size + layout.n_pages * RUN_HEADER_SIZE + END_SIZE


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
        self.sweep_stop = layout.n_pages  # where the initial sweep ends
        #: Pre-copy information queries that found the initial data drained.
        self.drained_queries = 0
        self.reinitialised = False
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
        if self.sweep_next < self.sweep_stop:
            start = self.sweep_next
            stop = min(self.sweep_stop, start + fit)
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

    def reinit(self, n_pages: int) -> None:
        """New initial data: the first ``n_pages`` pages are swept again, as initial
        data, before any dirty page (once per stream)."""
        n_pages = min(n_pages, self.layout.n_pages)
        self.pending_count += self.pending.count(0, 0, n_pages)
        self.pending[:n_pages] = b"\x01" * n_pages
        self.sweep_next, self.sweep_stop = 0, n_pages
        self.reinitialised = True

    def precopy_info(self, *, reinit: bool = False) -> PrecopyInfo:
        layout = self.layout
        unswept = self.sweep_stop - self.sweep_next
        initial_unread = max(0, self.initial_end - self.read_pos)
        initial = (
            max(
                0,
                min(layout.size, self.sweep_stop * layout.page_size)
                - self.sweep_next * layout.page_size,
            )
            + (0 if self.header_built else HEADER_SIZE)
            + initial_unread
        )
        built_unread = self.built - self.read_pos
        dirty = (self.pending_count - unswept) * layout.page_size + built_unread - initial_unread
        return PrecopyInfo(initial_bytes=initial, dirty_bytes=dirty, reinit=reinit)

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

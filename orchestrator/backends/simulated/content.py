"""The state a simulated device holds: its bytes, how they change, and their digest.

A device holds ``state_mib`` of state in a ``bytearray`` (or, for a
persistent device, its file's mapping) cut into ``page_kib`` pages (the size
is rounded to whole 8-byte words; the last page may be partial).  A source
starts from ``random.Random(seed).randbytes(size)``; a destination starts
from different bytes derived from the seed and its side, so a load is always
visible in its digest.

The *state digest* (what the device's ``state_digest`` answers, what the
stream's end record carries and what a load is checked against) is the
sha256 of the concatenated *page digests*, a page's digest being the first
16 bytes of the page's sha256.  Each device keeps its page digests cached
(:class:`_PageDigests`): a mutation marks its page stale, a page the source
sends is rehashed if it was stale, and a page run a destination loads is
rehashed as it lands.  So entering STOP_COPY and leaving RESUMING hash only
what moves in the switchover (the pages re-sent then), never the whole
state: real hardware has no digest to compute there, and the simulator
should not put one in the downtime.

While the device is in a running state it dirties its state at
``dirty_mib_s``: page-sized mutations.  Mutation ``k`` is a pure function of
``(seed, k)`` (:func:`_mutation_site`): it picks a page and XORs one non-zero
64-bit word into it, so it always changes that page.
:func:`reference_digest` replays mutations ``0..k-1`` on fresh content, which
proves that a device holds its own state and nothing else (a rolled-back
source was neither written into nor reset).

Invariants:

* The page digests are exact: every page whose stale flag is clear has its
  current content's digest.  Whatever writes the content keeps it so.
* Every mutation changes exactly one word of one page, and flags that page
  stale (and pending, when a stream is saving).
* No per-byte Python loops: pages move as memoryview slices, and stale
  pages are found with ``bytearray.find``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from orchestrator.backends.simulated.params import MIB, SimulatedParams
from orchestrator.states import Side

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


#: Bytes of ``randbytes`` drawn at a time: a multiple of 4, so the chunks concatenate to
#: exactly ``randbytes(size)`` (it is ``getrandbits(8 * n)`` in little-endian order, whose
#: 32-bit words come off the generator in order), without building one huge integer.
_RANDOM_CHUNK = 1 << 20


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


class _DirtyClock:
    """When a running device's mutations fall due: ``per_s`` a second of trio time.

    Dirtying is lazy: each catch-up takes the mutations due since the last,
    whole ones, and carries the fraction over, so that catch-ups at any
    rhythm add up to the rate.  ``per_s`` 0: nothing ever falls due.
    """

    __slots__ = ("carry", "last", "per_s")

    def __init__(self, params: SimulatedParams) -> None:
        self.per_s = params.dirty_mib_s * MIB / params.page_bytes
        self.carry = 0.0
        self.last = 0.0

    def restart(self, now: float) -> None:
        """Start afresh at ``now``: nothing due, no fraction carried."""
        self.carry = 0.0
        self.last = now

    def due(self, now: float, running: bool) -> int:
        """The mutations due by ``now``: none for the time the device was not ``running``."""
        count = 0
        if running:
            due = self.carry + (now - self.last) * self.per_s
            count = int(due)
            self.carry = due - count
        self.last = now
        return count


def _apply_mutations(
    words: memoryview,
    layout: _Layout,
    key: int,
    first: int,
    count: int,
    pending: bytearray | None,
    stale: bytearray,
    before: Callable[[int, int], None] | None = None,
) -> int:
    """Apply mutations ``first .. first+count-1``; return how many pages became pending.

    Mutation ``k`` is splitmix64 of ``(key, k)``: the value picks the page and
    the word in it, and (made odd, so non-zero) is XORed into that word.  Every
    page touched is flagged in ``stale`` (its cached digest no longer holds).
    ``before``, if given, is told each word's index and old value before the
    word changes (a persistent device's undo log).
    """
    n_pages = layout.n_pages
    per_page = layout.words_per_page
    n_words = len(words)
    newly_pending = 0
    for k in range(first, first + count):
        page, index, value = _mutation_site(key, k, n_pages, per_page, n_words)
        if before is not None:
            before(index, words[index])
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
    the word always changes.
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

"""The cross-host data channel: many devices' streams over authenticated TCP connections.

The destination runs a ``ChannelListener``; the prepare call registers each
incoming migration with ``expect(migration_id, secret, devices)`` and hands
the secret to the source, which calls ``open_channel(...)``.  The source
opens ``parallel_connections`` data connections (default: one per device,
at most 4) and one control connection, each authenticated both ways by the
handshake in ``wire.py``; device ``i`` travels on data connection
``i % connections``, CONTROL frames on the control connection.  Each side
gets one stream end per device (the runner's
``StreamSender`` / ``StreamReceiver``), plus acknowledgements (the
destination's "this device's initial data is loaded", QEMU's switchover-ack)
and CONTROL messages (small JSON objects, both ways, for the commit protocol
during the downtime window) and ABORT (either side, with a reason).

Failure is all-or-nothing per migration: the first protocol violation,
authentication failure after the handshake, ABORT, or connection cut fails
the whole channel.  From then on every pending and future operation on it
raises that ``PeerError`` (``PeerProtocolError`` names the device, the frame
and what was wrong); nothing received after the bad frame, nor anything
still queued, reaches a device.  The side that detects a violation tells
the other with an ABORT where it can, then closes every connection.

Threads and copies: once authenticated, each data connection is served by
two threads of its own (``_Link``), so that the copying and checksumming of
every connection run in parallel with the GIL released, and trio's thread
only hands frames over.  The writer sends queued frames, several per
``sendmsg``, straight from the callers' buffers (no join), computing each
trailer there; a send of ``bytes`` returns once queued.  The reader
``recv_into``s each DATA payload into a buffer of the connection's pool
(memory touched before, not fresh pages), checksums it, and posts the
verified frame to trio; the device's consumer borrows that very buffer
(``receive_lent``) and gives it back with its next call.  The bytes a
device loads were copied once, by the kernel.  The control connection
(``_ControlLink``) carries the commit protocol's small messages, on the
switchover's critical path: trio's thread writes and reads it itself,
without those hand-offs.

Order: frames of one device, and CONTROL frames, leave in the order they
were queued.  A device's END alone may overtake other devices' DATA still
in the writer's queue: devices sharing a connection then finish one by one
as their own bytes arrive, and the destination stops and settles each at
once, instead of all of them after the connection's last byte (with 64
devices on 4 connections, bench/downtime_netem.py measured the median
downtime 8-14% lower, two rounds alternated).  For the queue to hold what
is still to be reordered, the kernel is given little unsent data
(TCP_NOTSENT_LOWAT) and a ``sendmsg`` takes at most ``WRITE_BATCH_BYTES``
of payload.

Sockets have TCP_NODELAY (a CONTROL frame during the downtime window must
not wait for Nagle); send and receive buffers are left to the kernel's
autotuning, which setting them would switch off.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import math
import secrets
import socket as stdlib_socket
import sys
import termios
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import trio
from typing_extensions import Buffer

from orchestrator.errors import PeerAuthError, PeerError, PeerProtocolError
from orchestrator.transport import wire
from orchestrator.transport.streams import RateLimiter, StreamReceiver, StreamSender

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
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

log = structlog.get_logger("orchestrator.transport")

DEFAULT_MAX_CONNECTIONS = 4
#: The size of a connection's payload buffers (a DATA payload of up to
#: ``wire.MAX_DATA_PAYLOAD`` fills several).
RECV_PIECE_BYTES = 1 << 20
#: Payload buffers per connection, beyond one per device it carries: what
#: may be received and verified ahead of the devices' consumers.
QUEUED_PIECES = 16
#: Payload buffers kept by the process for the next connections.
SPARE_BUFFER_BYTES = 64 << 20
#: Payload bytes queued to a connection's writer thread before a send waits
#: for room: enough to ride out the trio thread's turns at the GIL.
QUEUED_BYTES = 16 << 20
#: The most frames the writer thread sends in one ``sendmsg``...
WRITE_BATCH = 16
#: ... and the payload bytes after which it takes no more: what is still
#: queued can be reordered (a device's END overtakes other devices' data).
WRITE_BATCH_BYTES = 1 << 20
#: Unsent bytes a connection's kernel send buffer may hold (TCP_NOTSENT_LOWAT):
#: beyond them the writer waits, and frames wait in its queue, where a
#: device's END can still overtake other devices' data.  Without it a slow
#: link's socket takes megabytes, and every END would queue behind them.
UNSENT_BYTES = 1 << 20
#: CONTROL messages received and not yet read before the channel fails.
CONTROL_BACKLOG = 1024
#: How long telling the peer why the channel failed may take.
ABORT_GRACE_S = 1.0


def new_secret() -> bytes:
    """A fresh per-migration secret for the prepare call to hand out."""
    return secrets.token_bytes(32)


def default_connections(devices: int) -> int:
    """One connection per device, at most ``DEFAULT_MAX_CONNECTIONS``."""
    return max(1, min(devices, DEFAULT_MAX_CONNECTIONS))


@dataclass(frozen=True)
class ChannelStatistics:
    """What moved over a channel, for the pre-copy decision and reports.

    ``busy_s`` is the wall time during which at least one send was under way
    (source) or between the first and the latest DATA frame (destination);
    idle time between pre-copy rounds does not dilute the throughput.
    """

    payload_bytes: int
    busy_s: float
    connections: int

    @property
    def throughput_bytes_s(self) -> float | None:
        return self.payload_bytes / self.busy_s if self.busy_s > 0 else None


# -- one connection -----------------------------------------------------------


#: A peer that stops answering (its host died, the link was cut) fails the
#: channel within seconds instead of TCP's quarter of an hour: data unacknowledged
#: for LINK_TIMEOUT_S, or an idle connection whose keepalive probes go unanswered.
LINK_TIMEOUT_S = 10
_KEEPALIVE = (
    (stdlib_socket.TCP_KEEPIDLE, 2),
    (stdlib_socket.TCP_KEEPINTVL, 1),
    (stdlib_socket.TCP_KEEPCNT, 3),
)


def _configure(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
    sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_KEEPALIVE, 1)
    for option, value in _KEEPALIVE:
        sock.setsockopt(stdlib_socket.IPPROTO_TCP, option, value)
    sock.setsockopt(
        stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_USER_TIMEOUT, LINK_TIMEOUT_S * 1000
    )
    sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NOTSENT_LOWAT, UNSENT_BYTES)


async def _send_all(sock: trio.socket.SocketType, buffers: Sequence[Buffer]) -> None:
    """The handshake's writes (the trio socket, before a link's threads own it)."""
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if v.nbytes]
    while views:
        sent = await sock.sendmsg(views)
        _consume(views, sent)


def _consume(views: list[memoryview], sent: int) -> None:
    """Drop ``sent`` bytes from the front of a scatter list."""
    while sent:
        if sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        else:
            views[0] = views[0][sent:]
            sent = 0


async def _receive_exactly(sock: trio.socket.SocketType, nbytes: int) -> bytes:
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    got = 0
    while got < nbytes:
        n = await sock.recv_into(view[got:])
        if n == 0:
            raise PeerAuthError("the peer closed the connection during the handshake")
        got += n
    return bytes(buffer)


class _SpareBuffers:
    """Payload buffers of connections that have closed, kept for the next ones.

    A migration's first megabytes would otherwise land in fresh pages (page
    faults and zeroing, twice the cost of the copy itself); kept, they are
    memory the process touched before.  At most ``limit_bytes`` are kept.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._spare: list[bytearray] = []
        self._bytes = 0

    def take(self, size: int) -> bytearray:
        with self._lock:
            for i, buffer in enumerate(self._spare):
                if len(buffer) == size:
                    self._bytes -= size
                    return self._spare.pop(i)
        return bytearray(size)

    def keep(self, buffers: Sequence[bytearray]) -> None:
        with self._lock:
            for buffer in buffers:
                if self._bytes + len(buffer) > self.limit_bytes:
                    return
                self._spare.append(buffer)
                self._bytes += len(buffer)


_SPARE = _SpareBuffers(SPARE_BUFFER_BYTES)


class _BufferPool:
    """The payload buffers of one connection: its reader fills them, consumers give them back.

    Buffers are taken on demand, up to ``count``, and then reused: memory
    the process has touched once, not fresh pages (an allocating receive
    halves throughput here).  A reader that finds every buffer lent out
    waits, which holds the connection back: the pool is the per-connection
    bound on what is received but not yet loaded.  Once the pool is closed,
    buffers given back go to the spares of the process, for the next pool.
    """

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self._count = count
        self._made = 0
        self._free: list[bytearray] = []
        self._ready = threading.Condition()
        self._closed = False

    def take(self) -> bytearray | None:
        """A free buffer (waiting for one if need be); None once the pool is closed."""
        with self._ready:
            while not self._free and self._made >= self._count and not self._closed:
                self._ready.wait()
            if self._closed:
                return None
            if self._free:
                return self._free.pop()
            self._made += 1
        return _SPARE.take(self.size)

    def give(self, piece: wire.Piece) -> None:
        """Take back the buffer under a lent piece, unless somebody still holds on to it.

        Pieces that are not views of the pool's buffers (``bytes``) are
        nobody's to take back.
        """
        obj = piece.obj if isinstance(piece, memoryview) else None
        if not isinstance(obj, bytearray) or len(obj) != self.size:
            return
        assert isinstance(piece, memoryview)
        buffer: bytearray | None = None
        try:
            piece.release()
            # Resizing fails while any view of the buffer is alive (a worker
            # thread abandoned on cancel, a view kept past the call): then
            # the buffer is left to its holder and the pool makes another.
            obj.append(0)
            del obj[-1]
            buffer = obj
        except BufferError:
            pass
        with self._ready:
            if buffer is None:
                self._made -= 1
            elif self._closed:
                _SPARE.keep([buffer])
            else:
                self._free.append(buffer)
            self._ready.notify()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            free, self._free = self._free, []
            self._ready.notify_all()
        _SPARE.keep(free)


#: What a connection's reader ends with: None at a clean end of stream, else why.
_ReadOutcome = PeerError | None

#: Where a connection's reader hands each verified event (in trio's thread).
_Deliver = Callable[[wire.Event, _BufferPool], None]
#: What the channel does once a connection's reader has ended, while the
#: connection can still send (to tell the peer why).
_OnEnd = Callable[[_ReadOutcome], Awaitable[None]]


class _Connection:
    """What both kinds of connection share: the socket, taken from trio once
    authenticated; the index; how they name a failure; how they close."""

    def __init__(self, sock: trio.socket.SocketType, index: int, *, blocking: bool) -> None:
        self.index = index
        self.encoder = wire.FrameEncoder()
        self.sock = stdlib_socket.socket(fileno=sock.detach())
        self.sock.setblocking(blocking)
        self._write_error: PeerError | None = None
        #: Told of a failed send at once (the channel fails), set by ``run``.
        self._on_write_error: Callable[[PeerError], None] = lambda error: None
        self._closed = False

    def _check_write(self) -> None:
        if self._write_error is not None:
            raise self._write_error
        if self._closed:
            raise self._closed_error()

    def _shut_down(self) -> bool:
        """Refuse further writes and shut the socket down, which ends its reader;
        False if that was done before."""
        if self._closed:
            return False
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(stdlib_socket.SHUT_RDWR)
        return True

    def _closed_error(self) -> PeerError:
        return PeerError(f"connection {self.index} is closed")

    def _error(self, exc: BaseException) -> PeerError:
        if self._closed:
            return self._closed_error()
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return PeerError(f"connection {self.index} failed: {detail}")

    def _cut(self) -> PeerError:
        if self._closed:
            return self._closed_error()
        return PeerError(f"connection {self.index} was cut in mid-frame")


class _Link(_Connection):
    """One authenticated connection, served by two threads of its own.

    After the handshake the descriptor leaves trio: a writer thread sends
    queued frames in order (each whole: header, payload and trailer in
    ``sendmsg`` calls from the caller's buffer, the trailer's CRC-32
    computed there), and a reader thread receives frames into the
    connection's buffer pool (``recv_into``; the checksum computed as the
    bytes land), validates them and posts each event to the trio loop.  So
    the copying and checksumming of every connection run in parallel, with
    the GIL released, instead of taking turns on trio's one thread:
    bench/stream_throughput.py measured one trio thread at a third of a
    four-thread socket copy.

    Closing shuts the socket down, which wakes both threads; the last one
    out closes the descriptor, so its number is never reused under a
    thread still using it.
    """

    def __init__(self, sock: trio.socket.SocketType, index: int) -> None:
        super().__init__(sock, index, blocking=True)
        self.pool = _BufferPool(RECV_PIECE_BYTES, 0)
        self._jobs: collections.deque[_WriteJob | None] = collections.deque()
        self._queued_bytes = 0
        self._queued_lock = threading.Lock()
        self._jobs_ready = threading.Condition(self._queued_lock)
        self._inbox: list[wire.Event] = []
        self._inbox_lock = threading.Lock()
        self._inbox_posted = False
        self._room_wanted: trio.Event | None = None
        self._threads_left = 0
        self._threads_lock = threading.Lock()
        self.read_outcome: _ReadOutcome = None
        self.read_done = trio.Event()

    # Threads ---------------------------------------------------------------

    async def run(
        self,
        validator: wire.InboundValidator,
        deliver: _Deliver,
        on_write_error: Callable[[PeerError], None],
        on_end: _OnEnd,
    ) -> None:
        """Serve the connection until its reader ends, then ``on_end(why)`` (None: a
        clean EOF); the writer thread runs until ``close``."""
        self.start(validator, deliver, len(validator.own), on_write_error)
        await self.read_done.wait()
        await on_end(self.read_outcome)

    def start(
        self,
        validator: wire.InboundValidator,
        deliver: _Deliver,
        devices_here: int,
        on_write_error: Callable[[PeerError], None],
    ) -> None:
        """Start the reader and the writer; events reach ``deliver`` and a failed
        send ``on_write_error``, both in the trio thread."""
        token = trio.lowlevel.current_trio_token()
        self._on_write_error = on_write_error
        self.pool = _BufferPool(RECV_PIECE_BYTES, QUEUED_PIECES + devices_here)
        self._threads_left = 2
        name = f"channel-{self.index}"
        threading.Thread(
            target=self._reader, args=(token, validator, deliver), name=f"{name}-rx", daemon=True
        ).start()
        threading.Thread(target=self._writer, args=(token,), name=f"{name}-tx", daemon=True).start()

    def _thread_done(self) -> None:
        with self._threads_lock:
            self._threads_left -= 1
            if self._threads_left == 0:
                self.sock.close()

    def in_flight_bytes(self) -> int:
        """Bytes queued here or in the kernel and not yet acknowledged by the peer's TCP.

        The kernel's part (``SIOCOUTQ``) can be megabytes on a link with a deep
        queue (netem, bufferbloat): a send returns long before its bytes
        cross, so what was sent overstates what was delivered by this much.
        """
        with self._threads_lock:
            if self._threads_left == 0 or self._closed:
                return 0
            try:
                raw = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
            except OSError:
                return 0
        with self._queued_lock:
            queued = self._queued_bytes
        return queued + int.from_bytes(raw, sys.byteorder, signed=True)

    def _reader(
        self,
        token: trio.lowlevel.TrioToken,
        validator: wire.InboundValidator,
        deliver: _Deliver,
    ) -> None:
        outcome: _ReadOutcome = None
        try:
            self._read_frames(token, validator, deliver)
        except PeerError as exc:
            outcome = exc
        except OSError as exc:
            outcome = self._error(exc)
        except trio.RunFinishedError:
            pass
        finally:
            self.pool.close()
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._read_finished, outcome)
            self._thread_done()

    def _read_finished(self, outcome: _ReadOutcome) -> None:
        self.read_outcome = outcome
        self.read_done.set()

    def _read_frames(
        self,
        token: trio.lowlevel.TrioToken,
        validator: wire.InboundValidator,
        deliver: _Deliver,
    ) -> None:
        """Read, verify and post frames until EOF; raise on any violation.

        A frame is posted only once whole and verified, in order, so nothing
        after a bad frame is ever delivered.  DATA payloads land in pool
        buffers, lent on to the device's consumer; header and trailer bytes
        in the reader's scratch buffer, never more than they are.
        """
        reader = wire.FrameReader(connection=self.index)
        sock, pool = self.sock, self.pool
        while True:
            frame = reader.next_frame()
            if frame is not None:
                self._post(token, deliver, validator.accept(frame))
                continue
            wanted = reader.payload_remaining
            if wanted:
                if reader.payload_kind is wire.Kind.DATA:
                    buffer = pool.take()
                    if buffer is None:
                        raise self._closed_error()
                    piece = memoryview(buffer)[: min(wanted, len(buffer))]
                else:
                    piece = memoryview(bytearray(wanted))
                n = sock.recv_into(piece, 0, stdlib_socket.MSG_WAITALL)
                while 0 < n < piece.nbytes:  # a signal interrupted the wait
                    got = sock.recv_into(piece[n:], 0, stdlib_socket.MSG_WAITALL)
                    n = n + got if got else -1
                if n <= 0:
                    raise self._cut()
                reader.add_payload(piece)
            else:
                n = sock.recv_into(reader.buffer(), reader.prefix_wanted)
                if n == 0:
                    if not reader.at_frame_boundary:
                        raise self._cut()
                    return
                reader.advance(n)

    def _post(
        self,
        token: trio.lowlevel.TrioToken,
        deliver: _Deliver,
        event: wire.Event,
    ) -> None:
        """Hand an event to the trio thread; events that pile up meanwhile share one wake-up."""
        with self._inbox_lock:
            self._inbox.append(event)
            if self._inbox_posted:
                return
            self._inbox_posted = True
        token.run_sync_soon(self._drain_inbox, deliver)

    def _drain_inbox(self, deliver: _Deliver) -> None:
        with self._inbox_lock:
            events, self._inbox = self._inbox, []
            self._inbox_posted = False
        for event in events:
            deliver(event, self.pool)

    def _writer(self, token: trio.lowlevel.TrioToken) -> None:
        try:
            running = True
            while running:
                jobs, running = self._next_batch()
                if jobs:
                    self._send_jobs(token, jobs)
        finally:
            self._thread_done()

    def _next_batch(self) -> tuple[list[_WriteJob], bool]:
        """The frames for the next ``sendmsg``, and False once the link closes.

        Whatever small frames are queued go together: fewer system calls, and
        fewer turns at the GIL against trio's thread.  Payloads stop a batch
        at ``WRITE_BATCH_BYTES``: the rest stays queued, still reorderable.
        """
        jobs: list[_WriteJob] = []
        payload = 0
        with self._jobs_ready:
            while not self._jobs:
                self._jobs_ready.wait()
            while self._jobs and len(jobs) < WRITE_BATCH and payload < WRITE_BATCH_BYTES:
                job = self._jobs.popleft()
                if job is None:
                    return jobs, False
                jobs.append(job)
                payload += job.payload.nbytes
        return jobs, True

    def _send_jobs(self, token: trio.lowlevel.TrioToken, jobs: list[_WriteJob]) -> None:
        error = self._write_error
        if error is None:
            views = [view for job in jobs for view in job.frame()]
            try:
                while views:
                    _consume(views, self.sock.sendmsg(views))
            except OSError as exc:
                error = self._write_error = self._error(exc)
                # Fail the channel now: callers that no longer wait for their
                # frames must not wait for the reader to notice the same cut.
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(self._on_write_error, error)
        # The trio side hears of a frame only if it waits for that one, or for
        # room (once half the queue has gone): a wake-up per frame cost a third
        # of the throughput.
        with self._queued_lock:
            self._queued_bytes -= sum(job.payload.nbytes for job in jobs)
            room = self._room_wanted
            if room is not None and (self._queued_bytes <= QUEUED_BYTES // 2 or error):
                self._room_wanted = None
            else:
                room = None
        with contextlib.suppress(trio.RunFinishedError):
            for job in jobs:
                if job.done is not None:
                    job.error = error
                    token.run_sync_soon(job.done.set)
            if room is not None:
                token.run_sync_soon(room.set)

    # Writing (trio side) ------------------------------------------------------

    async def write(self, kind: wire.Kind, slot: int, payload: Buffer, *, wait: bool) -> None:
        """Queue one frame; with ``wait``, return once it is in the kernel's hands.

        Without ``wait`` the payload must not change (``bytes``): the writer
        thread sends it after this returns, and a failure shows on a later
        write (every write fails once one has).
        """
        view = memoryview(payload).cast("B")
        await self._queue(
            lambda encoder: (encoder.header(kind, slot, view.nbytes), view),
            view.nbytes,
            wait,
            data_of=slot if kind is wire.Kind.DATA else None,
        )

    async def flush(self) -> None:
        """Return once every frame queued so far is in the kernel's hands."""
        await self._queue(lambda encoder: (b"", b""), 0, True)

    async def write_frame(
        self,
        make: Callable[[wire.FrameEncoder], tuple[bytes, Buffer]],
        *,
        wait: bool = False,
        ends: int | None = None,
    ) -> None:
        """A small frame (ACK, END, ABORT): made and queued in order.

        Without ``wait`` it returns once queued: a message on the switchover's
        critical path does not also wait for the writer thread's round trip
        to trio.  A failure shows on a later write, and a clean close sends
        whatever is queued first (``_Channel.aclose``).

        ``ends``: the frame is device ``ends``' END, which overtakes the DATA
        frames of other devices still queued (never a frame of its own device,
        nor any other kind): the destination can stop and settle that device
        as soon as its own bytes are in, instead of after every stream that
        shares its connection.  Sequence numbers are per device, so the
        destination sees each device's frames in order all the same.
        """
        await self._queue(make, 0, wait, ends=ends)

    async def _queue(
        self,
        make: Callable[[wire.FrameEncoder], tuple[bytes, Buffer]],
        nbytes: int,
        wait: bool,
        *,
        data_of: int | None = None,
        ends: int | None = None,
    ) -> None:
        while True:
            self._check_write()
            with self._queued_lock:
                if self._queued_bytes == 0 or self._queued_bytes + nbytes <= QUEUED_BYTES:
                    break
                if self._room_wanted is None:
                    self._room_wanted = trio.Event()
                room = self._room_wanted
            await room.wait()
        # Numbered and queued with no checkpoint between: frames leave in header order.
        header, payload = make(self.encoder)
        job = _WriteJob(header, memoryview(payload).cast("B"), trio.Event() if wait else None)
        job.data_of = data_of
        with self._jobs_ready:
            self._queued_bytes += job.payload.nbytes
            at = len(self._jobs)
            if ends is not None:
                while at and _overtakes(ends, self._jobs[at - 1]):
                    at -= 1
            self._jobs.insert(at, job)
            self._jobs_ready.notify()
        if job.done is not None:
            await job.done.wait()
            if job.error is not None:
                raise job.error
        else:
            await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Stop both threads (the socket is shut down) and refuse further writes."""
        if not self._shut_down():
            return
        self.pool.close()
        with self._jobs_ready:
            self._jobs.append(None)
            self._jobs_ready.notify()
            room, self._room_wanted = self._room_wanted, None
        if room is not None:
            room.set()
        if self._threads_left == 0:
            self.sock.close()


class _WriteJob:
    """One frame for the writer thread: its header and payload; the trailer is made there."""

    __slots__ = ("data_of", "done", "error", "header", "payload")

    def __init__(self, header: bytes, payload: memoryview, done: trio.Event | None) -> None:
        self.header = header
        self.payload = payload
        self.done = done
        self.error: PeerError | None = None
        #: The device of a DATA frame; None for every other kind.
        self.data_of: int | None = None

    def frame(self) -> list[memoryview]:
        """In the writer thread: the whole frame, its trailer's checksum computed here.

        A job without a header is a marker (``flush``): nothing to send.
        """
        if not self.header:
            return []
        trailer = wire.FrameEncoder.trailer(self.header, self.payload)
        views = [memoryview(self.header), self.payload, memoryview(trailer)]
        return [v for v in views if v.nbytes]


def _overtakes(device: int, queued: _WriteJob | None) -> bool:
    """Whether device ``device``'s END may go before ``queued``: another device's DATA."""
    return queued is not None and queued.data_of is not None and queued.data_of != device


def _split(frame: list[Buffer]) -> tuple[bytes, Buffer]:
    """An encoder's [header, payload, trailer] as (header, payload): the writer
    thread makes the trailer."""
    return bytes(memoryview(frame[0])), frame[1]


#: The control connection reads this much per ``recv`` (its frames are small).
CONTROL_RECEIVE_BYTES = 64 << 10


class _ControlLink(_Connection):
    """The control connection: CONTROL frames both ways, on trio's own thread.

    Its messages are the commit protocol's (each destination device's arc
    reports, the vote, the commit, the outcome): tens of bytes each, and on
    the switchover's critical path.  On a data connection a frame crosses a
    writer thread here and a reader thread there, and may queue behind
    megabytes of device state.  So the task that has a message writes it
    with one non-blocking ``send``, and a task of the channel reads each
    frame as it arrives and delivers it at once: a CONTROL round trip
    between two processes over loopback took 369 us (median) on connection
    0 of the data connections, 164 us here, against 88 us for bare trio
    sockets echoing the same bytes.

    A frame the socket cannot take whole (a peer that stopped reading) waits
    in ``_unsent``, and frames after it behind it, for the flushing task:
    a write returns once its frame is queued, or with ``wait`` once it is in
    the kernel's hands, as on a data connection.
    """

    def __init__(self, sock: trio.socket.SocketType, index: int) -> None:
        super().__init__(sock, index, blocking=False)
        self._unsent = bytearray()
        self._unsent_added = trio.Event()
        #: Set while nothing is unsent; replaced by a fresh one when something is.
        self._drained = trio.Event()
        self._drained.set()
        self._running = False

    async def run(
        self,
        validator: wire.InboundValidator,
        deliver: _Deliver,
        on_write_error: Callable[[PeerError], None],
        on_end: _OnEnd,
    ) -> None:
        """Serve the connection until its reader ends, then ``on_end(why)`` (None: a
        clean EOF) while it can still send; then close it."""
        self._on_write_error = on_write_error
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_unsent)
                try:
                    await on_end(await self._read_frames(validator, deliver))
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._running = False
            self.close()

    async def _read_frames(
        self, validator: wire.InboundValidator, deliver: _Deliver
    ) -> _ReadOutcome:
        decoder = wire.FrameDecoder(validator.role, validator.devices, validator=validator)
        buffer = bytearray(CONTROL_RECEIVE_BYTES)
        view = memoryview(buffer)
        # No DATA arrives here, so nothing is ever lent from this pool.
        pool = _BufferPool(0, 0)
        while True:
            try:
                n = self.sock.recv_into(buffer)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except OSError as exc:
                return self._error(exc)
            if n == 0:
                return None if decoder.reader.at_frame_boundary else self._cut()
            try:
                for event in decoder.events(view[:n]):
                    deliver(event, pool)
            except PeerProtocolError as exc:
                return exc

    async def _send_unsent(self) -> None:
        """The flushing task: sends what a write left unsent, in order."""
        while True:
            await self._unsent_added.wait()
            self._unsent_added = trio.Event()
            while self._unsent and self._write_error is None and not self._closed:
                await trio.lowlevel.wait_writable(self.sock)
                if self._closed:
                    break
                try:
                    sent = self.sock.send(self._unsent)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._write_failed(exc)
                    break
                del self._unsent[:sent]
            if not self._unsent or self._write_error is not None or self._closed:
                self._drained.set()

    def _write_failed(self, exc: OSError) -> PeerError:
        error = self._write_error = self._error(exc)
        self._drained.set()
        self._on_write_error(error)
        return error

    async def write_frame(
        self,
        make: Callable[[wire.FrameEncoder], tuple[bytes, Buffer]],
        *,
        wait: bool = False,
        ends: int | None = None,
    ) -> None:
        """A CONTROL (or ABORT) frame, numbered and sent (or queued) in order.

        ``ends`` is for a data connection's END frames and means nothing here.
        """
        self._check_write()
        # Numbered and sent (or queued) with no checkpoint between: in header order.
        header, payload = make(self.encoder)
        frame = memoryview(b"".join((header, payload, wire.FrameEncoder.trailer(header, payload))))
        if not self._unsent:
            try:
                sent = self.sock.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise self._write_failed(exc) from None
            frame = frame[sent:]
        if frame:
            if not self._unsent:
                self._drained = trio.Event()
            self._unsent += frame
            self._unsent_added.set()
            if wait:
                await self.flush()
                return
        await trio.lowlevel.checkpoint()

    async def flush(self) -> None:
        """Return once every frame written so far is in the kernel's hands."""
        await self._drained.wait()
        self._check_write()

    def close(self) -> None:
        """Shut the socket down (its reader sees the end) and refuse further writes;
        the descriptor is closed once no task of ``run`` can use it."""
        if self._shut_down():
            self._unsent_added.set()
            self._drained.set()
        if not self._running:
            self.sock.close()


def _give_back(event: wire.Event, pool: _BufferPool) -> None:
    """Return the pool buffers of an event nobody will consume."""
    if isinstance(event, wire.Data):
        for piece in event.pieces:
            pool.give(piece)


async def _flush_quietly(link: _Link | _ControlLink) -> None:
    with contextlib.suppress(PeerError):
        await link.flush()


async def _tell_abort(link: _Link | _ControlLink, reason: str) -> None:
    with contextlib.suppress(PeerError):
        await link.write_frame(lambda encoder: _split(encoder.abort(reason)), wait=True)


# -- what both ends share -----------------------------------------------------


class _Channel:
    """Failure, control messages and connections: what both ends of a channel share."""

    role: wire.Role

    def __init__(self, migration_id: str, devices: Sequence[str]) -> None:
        if len(devices) > wire.MAX_DEVICES:
            raise ValueError(f"at most {wire.MAX_DEVICES} devices per channel")
        if len(set(devices)) != len(devices):
            raise ValueError("device names must be unique")
        self.migration_id = migration_id
        self.devices = list(devices)
        self._index = {name: i for i, name in enumerate(self.devices)}
        #: The data connections, by index.
        self._links: dict[int, _Link] = {}
        self._control: _ControlLink | None = None
        self.failure: PeerError | None = None
        self._failed = trio.Event()
        # Unbounded, as the connection's reader posts without waiting; a peer
        # that floods CONTROL messages unread fails the channel instead.
        self._control_send, self._control_receive = trio.open_memory_channel[dict[str, Any]](
            math.inf
        )
        self._payload_bytes = 0
        self._busy_s = 0.0

    @property
    def connections(self) -> int:
        """The data connections (the control connection comes on top)."""
        return len(self._links)

    def device_index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no device {name!r} in migration {self.migration_id!r}") from None

    def statistics(self) -> ChannelStatistics:
        return ChannelStatistics(self._payload_bytes, self._busy_s, len(self._links))

    def check(self) -> None:
        """Raise the channel's failure, if it has failed."""
        if self.failure is not None:
            raise self.failure

    def _link_of(self, device: int) -> _Link:
        """The data connection a device's frames travel on."""
        self.check()
        index = wire.connection_of(device, len(self._links))
        link = self._links.get(index)
        if link is None:
            raise PeerError(f"connection {index} of migration {self.migration_id!r} is not open")
        return link

    def _control_link(self) -> _ControlLink:
        self.check()
        if self._control is None:
            raise PeerError(
                f"the control connection of migration {self.migration_id!r} is not open"
            )
        return self._control

    def _every_link(self) -> list[_Link | _ControlLink]:
        links: list[_Link | _ControlLink] = list(self._links.values())
        if self._control is not None:
            links.append(self._control)
        return links

    # Failure ---------------------------------------------------------------

    def _fail(self, error: PeerError, *, closing: bool = False, close_links: bool = True) -> None:
        """Fail the channel: wake every waiter with ``error``; close the connections."""
        if self.failure is not None:
            return
        self.failure = error
        self._failed.set()
        self._control_send.close()
        self._wake_all()
        if close_links:
            self._close_links()
        if not closing:
            log.warning(
                "channel_failed",
                migration=self.migration_id,
                side=self.role.value,
                error=str(error),
            )

    def _close_links(self) -> None:
        for link in self._every_link():
            link.close()

    def _wake_all(self) -> None:
        """Subclasses wake their own waiters."""

    async def _fail_and_tell(self, error: PeerError, reason: str) -> None:
        """Fail at once (this is the reason, whatever the peer does next), tell the
        peer why with an ABORT on every connection, then close them."""
        if self.failure is not None:
            return
        self._fail(error, close_links=False)
        links = self._every_link()
        with trio.CancelScope(shield=True), trio.move_on_after(ABORT_GRACE_S):
            # Queued behind the frames already on their way, each written whole.
            async with trio.open_nursery() as nursery:
                for link in links:
                    nursery.start_soon(_tell_abort, link, reason)
        self._close_links()

    async def abort(self, reason: str) -> None:
        """Fail the migration's channel on both sides; the peer learns ``reason``."""
        await self._fail_and_tell(PeerError(f"the channel was aborted here: {reason}"), reason)

    async def aclose(self) -> None:
        """Send what is queued (for at most ``ABORT_GRACE_S``), then close every
        connection; streams not ended are cut."""
        error = PeerError(f"the channel of migration {self.migration_id!r} is closed")
        try:
            if self.failure is None:
                with trio.CancelScope(shield=True), trio.move_on_after(ABORT_GRACE_S):
                    async with trio.open_nursery() as nursery:
                        for link in self._every_link():
                            nursery.start_soon(_flush_quietly, link)
        finally:
            self._fail(error, closing=True)
        await trio.lowlevel.checkpoint()

    async def _serve_link(
        self, link: _Link | _ControlLink, validator: wire.InboundValidator
    ) -> None:
        """Run one connection to its end, failing the channel on any error."""

        async def ended(outcome: _ReadOutcome) -> None:
            if isinstance(outcome, PeerProtocolError):
                await self._fail_and_tell(outcome, f"protocol violation: {outcome}")
            elif outcome is not None:
                self._fail(outcome)
            else:
                self._link_eof(link, validator)

        try:
            await link.run(validator, self._deliver, self._fail, ended)
        finally:
            link.close()

    def _deliver(self, event: wire.Event, pool: _BufferPool) -> None:
        """In the trio thread, in arrival order: one verified event of a connection."""
        if self.failure is not None:
            _give_back(event, pool)
            return
        if isinstance(event, wire.Abort):
            peer = "destination" if self.role is wire.Role.SOURCE else "source"
            self._fail(PeerError(f"the {peer} aborted the migration: {event.reason}"))
        elif isinstance(event, wire.Control):
            if self._control_send.statistics().current_buffer_used >= CONTROL_BACKLOG:
                unread = f"more than {CONTROL_BACKLOG} CONTROL messages unread"
                self._fail(PeerProtocolError(unread))
                return
            self._control_send.send_nowait(event.message)
        else:
            self._deliver_device_event(event, pool)

    def _deliver_device_event(self, event: wire.Event, pool: _BufferPool) -> None:
        raise NotImplementedError

    def _link_eof(self, link: _Link | _ControlLink, validator: wire.InboundValidator) -> None:
        raise NotImplementedError

    # Control messages ------------------------------------------------------

    async def send_control(self, message: Mapping[str, Any], *, wait: bool = False) -> None:
        """Send a small JSON object to the peer, on the control connection, in order.

        Returns once queued; with ``wait``, once in the kernel's hands, so that
        a shielded caller knows the message survives its scope's cancellation
        (a cancelled channel's connections are shut down, queue and all).
        """
        link = self._control_link()
        await link.write_frame(lambda encoder: _split(encoder.control(dict(message))), wait=wait)

    async def receive_control(self) -> dict[str, Any]:
        """The peer's next CONTROL message; PeerError once the channel failed or closed."""
        self.check()
        try:
            message = await self._control_receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self.check()
            raise PeerError("the peer closed the channel's control stream") from None
        self.check()
        return message


# -- source side -----------------------------------------------------------------


class NetworkStreamSender(StreamSender):
    """The source end of one device's stream over the data channel."""

    def __init__(self, channel: SourceChannel, name: str, index: int) -> None:
        self._channel = channel
        self.name = name
        self.index = index
        self.bytes_sent = 0
        self.ended = False
        self._closed = False

    async def send(self, chunk: Buffer) -> None:
        """Send a chunk (any buffer: bytes, bytearray, memoryview), in frames of at most 4 MiB.

        ``bytes`` (or a view of them) cannot change, so the send returns once
        its frames are queued to the connection's writer; any other buffer
        once its frames are in the kernel's hands.
        """
        if self.ended or self._closed:
            raise trio.ClosedResourceError(f"the stream of device {self.name!r} is closed")
        view = memoryview(chunk).cast("B")
        immutable = isinstance(view.obj, bytes)
        channel = self._channel
        link = channel._link_of(self.index)
        limiter = channel.limiter
        with channel._busy():
            for start in range(0, view.nbytes, wire.MAX_DATA_PAYLOAD):
                part = view[start : start + wire.MAX_DATA_PAYLOAD]
                if limiter is not None:
                    await limiter.consume(part.nbytes)
                await channel._guarded(
                    link.write(wire.Kind.DATA, self.index, part, wait=not immutable)
                )
                self.bytes_sent += part.nbytes
                channel._payload_bytes += part.nbytes

    async def flush(self) -> None:
        """Return once every frame of this device sent so far is in the kernel's hands."""
        await self._channel._guarded(self._channel._link_of(self.index).flush())

    async def end(self) -> None:
        if self.ended or self._closed:
            raise trio.ClosedResourceError(f"the stream of device {self.name!r} is closed")
        link = self._channel._link_of(self.index)
        index, total = self.index, self.bytes_sent
        await self._channel._guarded(
            link.write_frame(lambda encoder: _split(encoder.end(index, total)), ends=index)
        )
        self.ended = True

    async def aclose(self) -> None:
        """After ``end``: nothing.  Before: the stream is cut, which fails the channel."""
        if self.ended or self._closed:
            return
        self._closed = True
        if self._channel.failure is None:
            await self._channel.abort(f"the source closed device {self.name!r}'s stream early")


class SourceChannel(_Channel):
    """The source host's end of one migration's data channel."""

    role = wire.Role.SOURCE

    def __init__(
        self, migration_id: str, devices: Sequence[str], limiter: RateLimiter | None
    ) -> None:
        super().__init__(migration_id, devices)
        self.limiter = limiter
        self.senders = {
            name: NetworkStreamSender(self, name, i) for i, name in enumerate(self.devices)
        }
        self._acked: dict[int, int] = {}
        self._ack_events = {i: trio.Event() for i in range(len(self.devices))}
        self._sending = 0
        self._busy_since = 0.0

    def sender(self, device: str) -> NetworkStreamSender:
        return self.senders[self.devices[self.device_index(device)]]

    @contextlib.contextmanager
    def _busy(self) -> Any:
        if self._sending == 0:
            self._busy_since = trio.current_time()
        self._sending += 1
        try:
            yield
        finally:
            self._sending -= 1
            if self._sending == 0:
                self._busy_s += trio.current_time() - self._busy_since

    async def _guarded(self, operation: Awaitable[None]) -> None:
        """Run a write; if the channel failed meanwhile, its failure is the error to raise.

        A destination that refuses a frame sends an ABORT saying why, then
        closes: a write may see the close before the reader has read the
        ABORT, so give the reader a moment to find the reason.
        """
        try:
            await operation
        except PeerError:
            with trio.move_on_after(ABORT_GRACE_S):
                await self._failed.wait()
            self.check()
            raise

    def is_acknowledged(self, device: str) -> bool:
        return self.device_index(device) in self._acked

    async def acknowledged(self, device: str) -> int:
        """Wait for the destination's acknowledgement that this device's initial data is loaded.

        Returns the byte count the destination had received for the device
        when it acknowledged.  PeerError if the channel fails first.
        """
        index = self.device_index(device)
        self.check()
        await self._ack_events[index].wait()
        if index in self._acked:
            return self._acked[index]
        self.check()
        raise PeerError(f"the destination closed device {device!r}'s connection without an ACK")

    async def all_acknowledged(self) -> None:
        """Wait until every device has been acknowledged (the switchover-ack barrier)."""
        for device in self.devices:
            await self.acknowledged(device)

    def in_flight_bytes(self) -> int:
        """Bytes sent and not yet delivered to the destination host's kernel, over
        every connection: subtract them from what was sent to measure the link."""
        return sum(link.in_flight_bytes() for link in self._links.values())

    def _deliver_device_event(self, event: wire.Event, pool: _BufferPool) -> None:
        assert isinstance(event, wire.Ack)
        self._acked[event.device] = event.loaded_bytes
        self._ack_events[event.device].set()

    def _wake_all(self) -> None:
        for event in self._ack_events.values():
            event.set()

    def _link_eof(self, link: _Link | _ControlLink, validator: wire.InboundValidator) -> None:
        unfinished = [
            self.devices[i]
            for i in sorted(validator.own)
            if not self.senders[self.devices[i]].ended
        ]
        if unfinished:
            self._fail(
                PeerError(
                    f"the destination closed connection {link.index} before the end of "
                    f"{', '.join(unfinished)}"
                )
            )
            return
        for i in validator.own:
            self._ack_events[i].set()
        if validator.control:
            self._control_send.close()


def _make_link(sock: trio.socket.SocketType, index: int, connections: int) -> _Link | _ControlLink:
    """An authenticated socket as the connection its index says: data, or control."""
    return _ControlLink(sock, index) if index == connections else _Link(sock, index)


async def _connect_link(
    address: tuple[str, int],
    migration_id: str,
    secret: bytes,
    index: int,
    connections: int,
) -> _Link | _ControlLink:
    sock = trio.socket.socket(
        stdlib_socket.AF_INET6 if ":" in address[0] else stdlib_socket.AF_INET,
        stdlib_socket.SOCK_STREAM,
    )
    try:
        _configure(sock)
        try:
            await sock.connect(address)
            server_nonce = wire.parse_challenge(await _receive_exactly(sock, wire.CHALLENGE_SIZE))
            client_nonce = secrets.token_bytes(wire.NONCE_SIZE)
            hello_bytes = wire.client_hello(
                secret, server_nonce, migration_id, index, connections, client_nonce
            )
            await _send_all(sock, [hello_bytes])
            prefix = hello_bytes[: wire.HELLO_PREFIX_SIZE]
            hello = wire.parse_hello(prefix, hello_bytes[wire.HELLO_PREFIX_SIZE :])
            try:
                welcome = await _receive_exactly(sock, wire.WELCOME_SIZE)
            except PeerAuthError:
                raise PeerAuthError(
                    f"the destination refused connection {index} of migration {migration_id!r} "
                    "(unknown migration, wrong secret, or a connection already taken)"
                ) from None
            wire.verify_welcome(secret, server_nonce, hello, welcome)
        except OSError as exc:
            raise PeerError(
                f"cannot open connection {index} to {address[0]}:{address[1]}: {exc.strerror}"
            ) from None
    except BaseException:
        sock.close()
        raise
    return _make_link(sock, index, connections)


@contextlib.asynccontextmanager
async def open_channel(
    address: tuple[str, int],
    migration_id: str,
    secret: bytes,
    devices: Sequence[str],
    *,
    parallel_connections: int | None = None,
    limiter: RateLimiter | None = None,
    connect_timeout_s: float = 10.0,
) -> AsyncIterator[SourceChannel]:
    """Open the source's end of a migration's data channel to a destination's listener.

    Opens ``parallel_connections`` data connections (default: one per device,
    at most 4) and the control connection, each authenticated both ways;
    raises PeerAuthError if the
    destination refuses or cannot prove it holds ``secret``, PeerError if it
    cannot be reached within ``connect_timeout_s``.  Leaving the block closes
    the channel: streams not ended by then are cut.
    """
    connections = parallel_connections or default_connections(len(devices))
    if not 1 <= connections <= min(wire.MAX_CONNECTIONS, max(len(devices), 1)):
        raise ValueError(
            f"parallel_connections must be 1..{min(wire.MAX_CONNECTIONS, max(len(devices), 1))}"
        )
    channel = SourceChannel(migration_id, devices, limiter)
    links: dict[int, _Link | _ControlLink] = {}

    async def connect(index: int) -> None:
        links[index] = await _connect_link(address, migration_id, secret, index, connections)

    try:
        with trio.fail_after(connect_timeout_s):
            async with trio.open_nursery() as nursery:
                # The data connections, then the control connection (index ``connections``).
                for index in range(connections + 1):
                    nursery.start_soon(connect, index)
    except trio.TooSlowError:
        for link in links.values():
            link.close()
        raise PeerError(
            f"the destination {address[0]}:{address[1]} did not accept the channel "
            f"within {connect_timeout_s:g} s"
        ) from None
    except BaseException as exc:
        for link in links.values():
            link.close()
        if isinstance(exc, BaseExceptionGroup):
            peer, _ = exc.split(PeerError)
            if peer is not None:
                raise peer.exceptions[0] from None
        raise
    for index, link in sorted(links.items()):
        if isinstance(link, _ControlLink):
            channel._control = link
        else:
            channel._links[index] = link
    async with trio.open_nursery() as nursery:
        for index, link in sorted(links.items()):
            validator = wire.InboundValidator(wire.Role.SOURCE, devices, index, connections)
            nursery.start_soon(channel._serve_link, link, validator)
        try:
            yield channel
        finally:
            await channel.aclose()
            nursery.cancel_scope.cancel()


# -- destination side ----------------------------------------------------------------

#: What a device's queue holds: a verified payload piece and the pool it is
#: lent from, or the end of the stream.
_Item = tuple[wire.Piece, _BufferPool] | None


class NetworkStreamReceiver(StreamReceiver):
    """The destination end of one device's stream over the data channel.

    Pieces are lent: ``receive_lent`` returns a view of the connection's
    pool buffer into which the kernel received the bytes, and takes it back
    at the next call (or ``aclose``); ``receive`` returns a copy of its own.
    """

    def __init__(self, channel: DestinationChannel, name: str, index: int) -> None:
        self._channel = channel
        self.name = name
        self.index = index
        self.bytes_received = 0
        self.ended = False
        # Unbounded: what it holds is bounded by the connection's buffer pool.
        self._send, self._receive = trio.open_memory_channel[_Item](math.inf)
        self._lent: tuple[memoryview, _BufferPool] | None = None

    def _give_back(self) -> None:
        if self._lent is not None:
            view, pool = self._lent
            self._lent = None
            pool.give(view)

    async def receive_lent(self) -> memoryview | None:
        """The next verified piece of payload, lent until the next receive or ``aclose``."""
        self._give_back()
        if self.ended:
            return None
        channel = self._channel
        channel.check()
        try:
            item = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            channel.check()
            raise PeerError(f"the stream of device {self.name!r} was cut before its end") from None
        if channel.failure is not None:
            if item is not None:
                item[1].give(item[0])
            raise channel.failure
        if item is None:
            self.ended = True
            return None
        piece, pool = item
        self.bytes_received += len(piece)
        if isinstance(piece, memoryview):
            self._lent = (piece, pool)
            return piece
        return memoryview(piece)

    async def receive(self) -> bytes | None:
        """The next verified piece of payload, as ``bytes`` of the caller's own (a copy)."""
        view = await self.receive_lent()
        if view is None:
            return None
        data = bytes(view)
        self._give_back()
        return data

    async def aclose(self) -> None:
        """After the end: nothing.  Before: the stream is refused, which fails the channel."""
        self._give_back()
        self._receive.close()
        if not self.ended and self._channel.failure is None:
            await self._channel.abort(f"the destination closed device {self.name!r}'s stream")


class DestinationChannel(_Channel):
    """The destination host's end of one migration's data channel."""

    role = wire.Role.DESTINATION

    def __init__(
        self,
        listener: ChannelListener,
        migration_id: str,
        secret: bytes,
        devices: Sequence[str],
    ) -> None:
        super().__init__(migration_id, devices)
        if len(secret) < wire.MIN_SECRET:
            raise ValueError(f"a channel secret has at least {wire.MIN_SECRET} bytes")
        self._listener = listener
        self.secret = secret
        self.receivers = {
            name: NetworkStreamReceiver(self, name, i) for i, name in enumerate(self.devices)
        }
        self.expected_connections: int | None = None
        self._connected = trio.Event()
        self._first_data_at: float | None = None

    def receiver(self, device: str) -> NetworkStreamReceiver:
        return self.receivers[self.devices[self.device_index(device)]]

    async def wait_connected(self) -> None:
        """Wait until every connection the source announced is authenticated."""
        self.check()
        await self._connected.wait()
        self.check()

    def _admit(self, hello: wire.Hello) -> str | None:
        """Why this connection cannot join the channel, or None if it can."""
        if self.failure is not None:
            return "the channel has failed"
        if hello.connections > max(len(self.devices), 1):
            return f"{hello.connections} connections for {len(self.devices)} devices"
        if self.expected_connections is None:
            self.expected_connections = hello.connections
        elif hello.connections != self.expected_connections:
            return f"{hello.connections} connections announced, {self.expected_connections} before"
        if hello.connection in self._links or (hello.control and self._control is not None):
            return f"connection {hello.connection} is already open"
        return None

    async def _run(self, sock: trio.socket.SocketType, hello: wire.Hello) -> None:
        connections = self.expected_connections
        assert connections is not None
        link = _make_link(sock, hello.connection, connections)
        if isinstance(link, _ControlLink):
            self._control = link
        else:
            self._links[link.index] = link
        if len(self._links) == connections and self._control is not None:
            self._connected.set()
        validator = wire.InboundValidator(
            wire.Role.DESTINATION, self.devices, link.index, connections
        )
        await self._serve_link(link, validator)

    def _deliver_device_event(self, event: wire.Event, pool: _BufferPool) -> None:
        assert isinstance(event, wire.Data | wire.End)
        receiver = self.receivers[self.devices[event.device]]
        if isinstance(event, wire.Data):
            now = trio.current_time()
            if self._first_data_at is None:
                self._first_data_at = now
            self._payload_bytes += event.nbytes
            self._busy_s = now - self._first_data_at
            items: list[_Item] = [(piece, pool) for piece in event.pieces]
        else:
            items = [None]
        try:
            for item in items:
                receiver._send.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            _give_back(event, pool)
            if self.failure is None:
                self._fail(PeerError(f"device {receiver.name!r}'s stream was closed here"))

    def _wake_all(self) -> None:
        self._connected.set()
        for receiver in self.receivers.values():
            receiver._send.close()

    def _link_eof(self, link: _Link | _ControlLink, validator: wire.InboundValidator) -> None:
        unfinished = validator.open_devices
        if unfinished:
            self._fail(
                PeerError(
                    f"stream cut: the source closed connection {link.index} before the end "
                    f"of {', '.join(unfinished)}"
                )
            )
        elif validator.control:
            self._control_send.close()

    async def acknowledge(self, device: str) -> None:
        """Tell the source this device's initial data is loaded (the switchover-ack)."""
        index = self.device_index(device)
        link = self._link_of(index)
        loaded = self.receivers[device].bytes_received
        await link.write_frame(lambda encoder: _split(encoder.ack(index, loaded)))

    async def aclose(self) -> None:
        self._listener.forget(self.migration_id)
        await super().aclose()


class ChannelListener:
    """The destination's listening socket: authenticates connections, routes them.

    Connections that fail the handshake (no HELLO in time, garbage, unknown
    migration, wrong secret, a connection index already taken) are closed
    and recorded in ``rejections``; the listener goes on serving the others.
    """

    def __init__(self, *, handshake_timeout_s: float = 10.0) -> None:
        self.handshake_timeout_s = handshake_timeout_s
        self._expected: dict[str, DestinationChannel] = {}
        self.rejections: list[str] = []
        self.address: tuple[str, int] | None = None
        # Compared against when the migration id is unknown, so that the
        # answer takes as long as for a known one with a wrong secret.
        self._decoy_secret = new_secret()

    def expect(
        self, migration_id: str, secret: bytes, devices: Sequence[str]
    ) -> DestinationChannel:
        """Register a migration's channel: connections proving ``secret`` may join it."""
        if migration_id in self._expected:
            raise ValueError(f"migration {migration_id!r} is already expected")
        channel = DestinationChannel(self, migration_id, secret, devices)
        self._expected[migration_id] = channel
        return channel

    def forget(self, migration_id: str) -> None:
        self._expected.pop(migration_id, None)

    async def serve(
        self,
        host: str,
        port: int = 0,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0: any free port) until cancelled.

        ``await nursery.start(listener.serve, host)`` returns the bound
        address.  Each connection runs in a task of this one's nursery.
        """
        family = stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET
        sock = trio.socket.socket(family, stdlib_socket.SOCK_STREAM)
        with sock:
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
            await sock.bind((host, port))
            sock.listen(128)
            bound = sock.getsockname()
            self.address = (bound[0], bound[1])
            async with trio.open_nursery() as nursery:
                task_status.started(self.address)
                while True:
                    conn, _ = await sock.accept()
                    nursery.start_soon(self._handle, conn)

    async def _handle(self, sock: trio.socket.SocketType) -> None:
        with sock:
            _configure(sock)
            try:
                with trio.fail_after(self.handshake_timeout_s):
                    channel, hello = await self._handshake(sock)
            except (PeerError, OSError, trio.TooSlowError) as exc:
                reason = str(exc) or "no HELLO within the handshake timeout"
                self.rejections.append(reason)
                log.warning("channel_connection_refused", reason=reason)
                return
            try:
                await channel._run(sock, hello)
            except Exception as exc:
                # The channel is failed and its owner told (a PeerError, alone or
                # in a group); one migration's broken connection must never end
                # the listener that every other migration shares.
                log.info("channel_connection_ended", reason=str(exc), exc_info=True)

    async def _handshake(
        self, sock: trio.socket.SocketType
    ) -> tuple[DestinationChannel, wire.Hello]:
        server_nonce = secrets.token_bytes(wire.NONCE_SIZE)
        await _send_all(sock, [wire.make_challenge(server_nonce)])
        prefix = await _receive_exactly(sock, wire.HELLO_PREFIX_SIZE)
        _, _, id_length, _, _ = wire.parse_hello_prefix(prefix)
        hello = wire.parse_hello(prefix, await _receive_exactly(sock, id_length))
        channel = self._expected.get(hello.migration_id)
        secret = channel.secret if channel is not None else self._decoy_secret
        if not wire.verify_hello(secret, server_nonce, hello) or channel is None:
            raise PeerAuthError(
                f"connection for migration {hello.migration_id!r} failed authentication"
            )
        refused = channel._admit(hello)
        if refused is not None:
            raise PeerAuthError(f"migration {hello.migration_id!r}: {refused}")
        await _send_all(sock, [wire.make_welcome(secret, server_nonce, hello)])
        return channel, hello

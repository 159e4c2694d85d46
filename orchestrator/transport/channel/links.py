"""One connection of a data channel once authenticated: a data link or the control link.

Invariants:

* a frame reaches the channel (``deliver``, in trio's thread) only once it
  is whole and verified, and in the order it arrived: nothing after a bad
  frame is ever delivered;
* a DATA payload is received into a buffer of the connection's pool
  (``buffers.py``), and the reader waits while every buffer is lent out:
  what a connection holds received but not loaded is bounded;
* frames of one device, and CONTROL frames, leave in the order they were
  queued (see Order below);
* a socket's descriptor is closed only once no thread or task can use it
  any more, so its number is never reused under one still using it.

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
device loads were copied once, by the kernel.  A device with the blocking
side of its stream needs no trio at all for its bulk bytes (``bulk.py``):
the writer thread reads it into its own buffer and sends, the reader thread
loads each verified payload into it.  The control connection
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
import socket as stdlib_socket
import sys
import termios
import threading
from collections.abc import Awaitable, Callable, Sequence

import trio
from typing_extensions import Buffer

from orchestrator.errors import PeerAuthError, PeerError, PeerProtocolError
from orchestrator.transport import wire
from orchestrator.transport.channel.buffers import ByteBudget, _BufferPool
from orchestrator.transport.channel.bulk import _Backlog, _Pump, _Sink, _view
from orchestrator.transport.channel.tls import Relay

#: The size of a connection's payload buffers (a DATA payload of up to
#: ``wire.MAX_DATA_PAYLOAD`` fills several).
RECV_PIECE_BYTES = 1 << 20
#: Payload buffers per connection, beyond one per device it carries: what
#: may be received and verified ahead of the devices' consumers.
QUEUED_PIECES = 16
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

    def __init__(
        self,
        sock: trio.socket.SocketType,
        index: int,
        *,
        blocking: bool,
        relay: Relay | None = None,
    ) -> None:
        self.index = index
        #: The TLS relay behind the socket, where the connection is TLS.
        self.relay = relay
        #: The migration's budget of bytes received and not yet loaded (destination).
        self.budget: ByteBudget | None = None
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
        return self._relay_failure() or PeerError(f"connection {self.index} was cut in mid-frame")

    def _relay_failure(self) -> PeerError | None:
        """Why the TLS relay cut the connection, if it did: its socket only ends."""
        failure = self.relay.failure if self.relay is not None else None
        return None if failure is None else PeerError(f"connection {self.index}: {failure}")


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

    def __init__(
        self, sock: trio.socket.SocketType, index: int, relay: Relay | None = None
    ) -> None:
        super().__init__(sock, index, blocking=True, relay=relay)
        self.pool = _BufferPool(RECV_PIECE_BYTES, 0)
        #: Devices whose bulk transfers the writer thread reads and sends (source).
        self._pumps: collections.deque[_Pump] = collections.deque()
        #: Devices whose DATA and END the reader thread loads itself (destination).
        self.sinks: dict[int, _Sink] = {}
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
        self.pool = _BufferPool(RECV_PIECE_BYTES, QUEUED_PIECES + devices_here, self.budget)
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
        relayed = self.relay.in_flight_bytes() if self.relay is not None else 0
        return queued + relayed + int.from_bytes(raw, sys.byteorder, signed=True)

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
                event = validator.accept(frame)
                # Hold no view of the payload past the hand-over: a sink loads it
                # inside _post, in this thread, and gives its buffer back there
                # (a view still held here would keep the pool from reusing it).
                del frame
                self._post(token, deliver, event)
                del event
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
                    failure = self._relay_failure()
                    if failure is not None:
                        raise failure
                    return
                reader.advance(n)

    def _post(
        self,
        token: trio.lowlevel.TrioToken,
        deliver: _Deliver,
        event: wire.Event,
    ) -> None:
        """Hand an event to the trio thread; events that pile up meanwhile share one wake-up.

        A device's DATA and END go to its sink instead, where one is attached
        (``attach_sink``): this thread loads them, and trio hears only of the end.
        """
        sink = None
        with self._inbox_lock:
            if self.sinks and isinstance(event, wire.Data | wire.End):
                sink = self.sinks.get(event.device)
            if sink is None:
                self._inbox.append(event)
                if self._inbox_posted:
                    return
                self._inbox_posted = True
        if sink is not None:
            sink.put(event, self.pool)
            return
        token.run_sync_soon(self._drain_inbox, deliver)

    def attach_sink(self, device: int, sink: _Sink, taken: _Backlog) -> None:
        """From now on device ``device``'s DATA and END are loaded by ``sink``, in order:
        ``taken`` (what trio had taken already), then what was posted to trio but
        not yet taken, then what arrives.  In trio's thread."""
        with self._inbox_lock:
            mine = [
                e for e in self._inbox if isinstance(e, wire.Data | wire.End) and e.device == device
            ]
            if mine:
                self._inbox = [e for e in self._inbox if not any(e is m for m in mine)]
            backlog = list(taken)
            for event in mine:
                if isinstance(event, wire.Data):
                    backlog.extend((_view(piece), self.pool) for piece in event.pieces)
                else:
                    backlog.append(None)
            sink.start(backlog)
            self.sinks[device] = sink

    def _drain_inbox(self, deliver: _Deliver) -> None:
        with self._inbox_lock:
            events, self._inbox = self._inbox, []
            self._inbox_posted = False
        for event in events:
            deliver(event, self.pool)

    def _writer(self, token: trio.lowlevel.TrioToken) -> None:
        buffer = memoryview(bytearray(RECV_PIECE_BYTES))
        try:
            running = True
            while running:
                jobs, pump, running = self._next_work()
                if jobs:
                    self._send_jobs(token, jobs)
                elif pump is not None:
                    self._pump_piece(token, pump, buffer)
        finally:
            self._end_pumps()
            self._thread_done()

    def _next_work(self) -> tuple[list[_WriteJob], _Pump | None, bool]:
        """The frames for the next ``sendmsg``, else the pump whose turn it is to
        read a piece; False once the link closes.

        Whatever small frames are queued go together: fewer system calls, and
        fewer turns at the GIL against trio's thread.  Payloads stop a batch
        at ``WRITE_BATCH_BYTES``: the rest stays queued, still reorderable.
        Queued frames go before pumped ones: an END or an ACK does not wait
        for a device's bulk transfer.  Pumps are served first come, first
        served, not in turns.
        """
        jobs: list[_WriteJob] = []
        payload = 0
        with self._jobs_ready:
            while not self._jobs and not self._pumps:
                self._jobs_ready.wait()
            if not self._jobs:
                # One device at a time, in the order they started: each ends as
                # soon as its own bytes are out (its END follows), and the
                # destination settles it while the others are on the wire.
                return jobs, self._pumps[0], True
            while self._jobs and len(jobs) < WRITE_BATCH and payload < WRITE_BATCH_BYTES:
                job = self._jobs.popleft()
                if job is None:
                    return jobs, None, False
                jobs.append(job)
                payload += job.payload.nbytes
        return jobs, None, True

    def _pump_piece(self, token: trio.lowlevel.TrioToken, pump: _Pump, buffer: memoryview) -> None:
        """Read one piece of a pumping device into ``buffer`` and send it as a DATA frame;
        or end the pump's transfer (its limit, a stop, the device's end, an error)."""
        transfer = pump.transfer
        want = pump.wanted(buffer.nbytes) if self._write_error is None else 0
        error: BaseException | None = self._write_error
        n = 0
        if want:
            try:
                n = transfer.device_call(pump.reader.read_into, buffer[:want])
            except BaseException as exc:  # told to trio, which raises it
                error = exc
        if n <= 0 or transfer.abandoned or error is not None:
            exhausted = want > 0 and n <= 0 and error is None and not transfer.abandoned
            if exhausted and pump.end_after is not None:
                # The stream's end: its END at once, not after a round trip to trio.
                total = pump.end_after + transfer.bytes
                with self._jobs_ready:
                    frame = self.encoder.end(pump.slot, total)
                error = self._send_views(token, [memoryview(part).cast("B") for part in frame])
                transfer.ended_stream = error is None
            with self._jobs_ready:
                self._pumps.remove(pump)
            transfer.exhausted = exhausted
            transfer.finish(error)
            return
        piece = buffer[:n]
        with self._jobs_ready:  # numbered under the lock trio's frames are numbered under
            header = self.encoder.header(wire.Kind.DATA, pump.slot, n)
        views = [memoryview(header), piece, memoryview(wire.FrameEncoder.trailer(header, piece))]
        write_error = self._send_views(token, views)
        if write_error is None:
            transfer.moved(n)

    def start_pump(self, pump: _Pump) -> None:
        """Have the writer thread serve ``pump`` (in trio's thread)."""
        with self._jobs_ready:
            error = self._write_error or (self._closed_error() if self._closed else None)
            if error is None:
                self._pumps.append(pump)
                self._jobs_ready.notify()
                return
        pump.transfer.finish(error)

    def _end_pumps(self) -> None:
        with self._jobs_ready:
            pumps = list(self._pumps)
            self._pumps.clear()
        for pump in pumps:
            pump.transfer.finish(self._write_error or self._closed_error())

    def _send_views(
        self, token: trio.lowlevel.TrioToken, views: list[memoryview]
    ) -> PeerError | None:
        """``sendmsg`` every byte of ``views``; a failure fails the channel at once (callers
        that no longer wait for their frames must not wait for the reader to notice
        the same cut) and every later write."""
        try:
            while views:
                _consume(views, self.sock.sendmsg(views))
        except OSError as exc:
            error = self._write_error = self._error(exc)
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._on_write_error, error)
            return error
        return None

    def _send_jobs(self, token: trio.lowlevel.TrioToken, jobs: list[_WriteJob]) -> None:
        error = self._write_error
        if error is None:
            error = self._send_views(token, [view for job in jobs for view in job.frame()])
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
        with self._jobs_ready:
            # Numbered and queued under one lock (pumps queue from their threads):
            # frames leave in header order.
            header, payload = make(self.encoder)
            job = _WriteJob(header, memoryview(payload).cast("B"), trio.Event() if wait else None)
            job.data_of = data_of
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
        if self._threads_left == 0:  # no writer thread to end them
            self._end_pumps()
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

    def __init__(
        self, sock: trio.socket.SocketType, index: int, relay: Relay | None = None
    ) -> None:
        super().__init__(sock, index, blocking=False, relay=relay)
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
                if not decoder.reader.at_frame_boundary:
                    return self._cut()
                return self._relay_failure()
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


async def _flush_quietly(link: _Link | _ControlLink) -> None:
    with contextlib.suppress(PeerError):
        await link.flush()


async def _tell_abort(link: _Link | _ControlLink, reason: str) -> None:
    with contextlib.suppress(PeerError):
        await link.write_frame(lambda encoder: _split(encoder.abort(reason)), wait=True)


def _make_link(
    sock: trio.socket.SocketType, index: int, connections: int, relay: Relay | None = None
) -> _Link | _ControlLink:
    """An authenticated socket as the connection its index says: data, or control."""
    if index == connections:
        return _ControlLink(sock, index, relay)
    return _Link(sock, index, relay)

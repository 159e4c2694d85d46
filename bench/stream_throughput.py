"""Data channel throughput against a plain socket copy of the same bytes.

The destination runs in a second process, like a second host (loopback
TCP).  For each size and connection count, the same bytes in the same
1 MiB chunks go two ways, alternately, in the same run:

* plain: ``sendall`` / ``recv_into`` a reused buffer, one thread per
  connection on each side; no framing, no checksum, no authentication;
* channel: ``open_channel`` with one device per connection, moved as the
  runner moves a device that offers the blocking side of its stream: the
  source's pump thread reads each device (a memfd holding the chunk, read
  with ``preadv`` as a VFIO ``data_fd`` is read: a system call copying into
  the channel's buffer) and the destination's sink thread loads each piece
  into a device that discards it; trio hears of each transfer's end only.
  The destination acknowledges each device after its end.

Each timing starts once the connections are open (authentication is not
counted, as the plain copy has none) and stops when the destination has
confirmed every byte: the plain receiver's one-byte answer, the channel's
acknowledgements.  The table shows the median of ``--repeats`` runs of
each; the target is a channel at least 80% as fast as the plain copy.

``--ceiling`` adds copies to each trial and a second table, to show what
bounds the channel here:

* plain + read: the plain copy, each chunk first read from the device's
  memfd into the sending thread's buffer, as the channel reads it: what
  moving device state costs with no framing at all;
* framed: the plain copy's threads, sending and checking the channel's own
  DATA frames (``wire.FrameEncoder``: header, payload, CRC-32 trailer, and
  on receipt ``wire.parse_header`` and ``wire.frame_checksum``), and
  nothing else: no trio, no queues.  What any design keeping the protocol's
  framing and checksums pays on these two cores;
* framed + trio: the same, with the one hand-off per chunk each way that
  devices driven by trio need, and no more: a trio task per device hands
  its chunks to its sending thread through a bounded queue, and each
  receiving thread posts every checked frame to a trio task
  (``run_sync_soon``, a memory channel) that gives the buffer back;
* channel via trio: the channel with every chunk read from the device
  (``pread``, a fresh ``bytes``) and handed through trio's thread
  (``StreamSender.send``, ``receive_lent``): the runner's path for a
  backend without a blocking side.

``--tls`` adds the channel in mutual TLS (both ends with a certificate of a
CA made for the run) and a table of it against the plain copy, the
cleartext channel and the plain copy through TLS sockets (Python's ssl, a
blocking thread per connection each side: what user-space TLS costs here,
the ceiling for a channel that keeps it), in the same run.

    python bench/stream_throughput.py [--sizes-mib 1,16,256,1024] [--connections 1,4]
                                      [--repeats 3] [--quick] [--ceiling] [--tls]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import math
import multiprocessing
import os
import platform
import queue
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import trio
from typing_extensions import Buffer

from orchestrator import logs
from orchestrator.errors import PeerError
from orchestrator.transport import ChannelListener, new_secret, open_channel, wire
from orchestrator.transport.channel import TlsIdentity, TlsPeer

MIB = 1 << 20
CHUNK = MIB
TARGET = 0.80


def _shares(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# -- destination process ---------------------------------------------------------


def _accept(control: Connection, connections: int) -> list[socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    control.send(listener.getsockname()[1])
    socks = [listener.accept()[0] for _ in range(connections)]
    listener.close()
    return socks


def _in_threads(
    fn: Callable[[socket.socket, int], None], socks: Sequence[socket.socket], total: int
) -> None:
    """``fn(sock, its share of total)`` in a thread per connection; all joined."""
    threads = [
        threading.Thread(target=fn, args=(sock, share))
        for sock, share in zip(socks, _shares(total, len(socks)), strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _plain_destination(
    control: Connection, connections: int, total: int, tls: TlsIdentity | None = None
) -> None:
    socks = _accept(control, connections)
    server = tls.server_context() if tls is not None else None

    def drain(sock: socket.socket, nbytes: int) -> None:
        if server is not None:
            sock = server.wrap_socket(sock, server_side=True)
        buffer = memoryview(bytearray(CHUNK))
        got = 0
        while got < nbytes:
            n = sock.recv_into(buffer)
            if n == 0:
                raise SystemExit("plain copy: the source closed early")
            got += n
        sock.sendall(b"!")
        sock.close()

    _in_threads(drain, socks, total)


class _Discard:
    """A destination device that loads nothing: what the channel costs alone."""

    def write_from(self, data: memoryview, cancel: threading.Event) -> None:
        pass


@functools.cache
def _device_fd(chunk: bytes) -> int:
    """The source's device memory: a memfd holding the chunk (the source process's)."""
    fd = os.memfd_create("bench-device")
    os.write(fd, chunk)
    return fd


class _MemfdDevice:
    """A source device whose stream is the chunk, again and again, read from a memfd
    with ``preadv``: a system call copying into the caller's buffer, GIL released,
    as reading a VFIO ``data_fd`` is."""

    def __init__(self, fd: int, nbytes: int) -> None:
        self._fd = fd
        self._left = nbytes

    def read_into(self, buffer: memoryview, cancel: threading.Event) -> int:
        want = min(len(buffer), self._left, CHUNK)
        if want <= 0:
            return 0
        n = os.preadv(self._fd, [buffer[:want]], 0)
        self._left -= n
        return n


async def _channel_destination(
    control: Connection,
    connections: int,
    secret: bytes,
    tls: TlsIdentity | None = None,
    *,
    via_trio: bool = False,
) -> None:
    devices = [f"dev{i}" for i in range(connections)]
    listener = ChannelListener(tls=tls.server_context() if tls is not None else None)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(listener.serve, "127.0.0.1")
        channel = listener.expect("bench", secret, devices)
        control.send(address[1])

        async def load(device: str) -> None:
            receiver = channel.receiver(device)
            if via_trio:
                while await receiver.receive_lent() is not None:
                    pass
            else:
                transfer = receiver.start_sink(_Discard())
                await transfer.done.wait()
                if transfer.error is not None:
                    raise transfer.error
            await channel.acknowledge(device)

        async with trio.open_nursery() as loaders:
            for device in devices:
                loaders.start_soon(load, device)
        # The source closes the channel once it has every acknowledgement:
        # the control stream ends then.
        with contextlib.suppress(PeerError):
            await channel.receive_control()
        await channel.aclose()
        nursery.cancel_scope.cancel()


def _receive_exactly(sock: socket.socket, view: memoryview) -> None:
    if sock.recv_into(view, view.nbytes, socket.MSG_WAITALL) != view.nbytes:
        raise SystemExit("framed copy: the source closed early")


def _receive_frames(
    sock: socket.socket,
    nbytes: int,
    take: Callable[[], memoryview],
    deliver: Callable[[memoryview], None],
) -> None:
    """DATA frames as the channel's reader takes them: header, payload into a
    buffer, trailer, then the header's and the frame's checksums."""
    header = memoryview(bytearray(wire.HEADER_SIZE))
    trailer = memoryview(bytearray(wire.TRAILER_SIZE))
    got = 0
    while got < nbytes:
        _receive_exactly(sock, header)
        length = wire.parse_header(bytes(header)).length
        payload = take()[:length]
        _receive_exactly(sock, payload)
        _receive_exactly(sock, trailer)
        if int.from_bytes(trailer, "big") != wire.frame_checksum(header, payload):
            raise SystemExit("framed copy: a frame's checksum does not match")
        deliver(payload)
        got += length


def _framed_destination(control: Connection, connections: int, total: int) -> None:
    socks = _accept(control, connections)

    def drain(sock: socket.socket, nbytes: int) -> None:
        buffer = memoryview(bytearray(CHUNK))
        _receive_frames(sock, nbytes, lambda: buffer, lambda payload: None)
        sock.sendall(b"!")

    _in_threads(drain, socks, total)
    for sock in socks:
        sock.close()


async def _framed_trio_destination(control: Connection, connections: int, total: int) -> None:
    # As the channel's pools: a reader waits for a buffer its consumer gave back.
    # Made before the clock starts (16 MiB of fresh pages take milliseconds);
    # the channel's come from those its earlier connections left.
    pools: list[queue.SimpleQueue[memoryview]] = []
    for _ in range(connections):
        pools.append(queue.SimpleQueue())
        for _ in range(16):
            pools[-1].put(memoryview(bytearray(CHUNK)))
    socks = _accept(control, connections)
    token = trio.lowlevel.current_trio_token()

    async def load(sock: socket.socket, nbytes: int, free: queue.SimpleQueue[memoryview]) -> None:
        send, receive = trio.open_memory_channel[memoryview](math.inf)

        def post(payload: memoryview) -> None:
            token.run_sync_soon(send.send_nowait, payload)

        reader = threading.Thread(target=_receive_frames, args=(sock, nbytes, free.get, post))
        reader.start()
        got = 0
        while got < nbytes:
            payload = await receive.receive()
            got += payload.nbytes
            free.put(memoryview(payload.obj))
        await trio.to_thread.run_sync(reader.join)
        sock.sendall(b"!")

    async with trio.open_nursery() as nursery:
        for sock, share, pool in zip(socks, _shares(total, connections), pools, strict=True):
            nursery.start_soon(load, sock, share, pool)
    for sock in socks:
        sock.close()


def destination(control: Connection) -> None:
    logs.configure("error")
    while True:
        trial: tuple[str, int, int, bytes, TlsIdentity | None] | None = control.recv()
        if trial is None:
            return
        kind, connections, total, secret, tls = trial
        if kind == "plain":
            _plain_destination(control, connections, total, tls)
        elif kind == "framed":
            _framed_destination(control, connections, total)
        elif kind == "framed_trio":
            trio.run(_framed_trio_destination, control, connections, total)
        else:
            via_trio = kind == "channel_trio"
            trio.run(
                functools.partial(_channel_destination, via_trio=via_trio),
                control,
                connections,
                secret,
                tls,
            )
        control.send("done")


# -- source process ----------------------------------------------------------------


class Peer:
    """The destination process, seen from the source: a pipe that notices its death."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, theirs = context.Pipe()
        self.process = context.Process(target=destination, args=(theirs,), daemon=True)
        self.process.start()

    def send(self, message: object) -> None:
        self.pipe.send(message)

    def recv(self) -> Any:
        while not self.pipe.poll(1.0):
            if not self.process.is_alive():
                raise SystemExit(f"the destination process died ({self.process.exitcode})")
        return self.pipe.recv()

    def close(self) -> None:
        self.pipe.send(None)
        self.process.join(timeout=10)


def _threaded_copy(
    control: Peer,
    kind: str,
    connections: int,
    total: int,
    pour: Callable[[socket.socket, int], None],
    tls: tuple[TlsIdentity, TlsIdentity] | None = None,
) -> float:
    """A copy whose source is a thread per connection running ``pour(sock, its share)``;
    ``tls``: each connection a TLS socket first (the handshake is timed too: it is
    one round trip and a signature, nothing against the bytes)."""
    control.send((kind, connections, total, b"", tls[0] if tls else None))
    port = control.recv()
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    client = tls[1].client_context() if tls is not None else None

    def pour_and_confirm(sock: socket.socket, nbytes: int) -> None:
        if client is not None:
            sock = client.wrap_socket(sock, server_hostname="127.0.0.1")
        pour(sock, nbytes)
        if sock.recv(1) != b"!":
            raise SystemExit(f"{kind} copy: no confirmation")

    start = time.perf_counter()
    _in_threads(pour_and_confirm, socks, total)
    elapsed = time.perf_counter() - start
    for sock in socks:
        sock.close()
    if control.recv() != "done":
        raise SystemExit(f"{kind} copy: the destination failed")
    return elapsed


def plain_copy(
    control: Peer,
    payload: memoryview,
    connections: int,
    total: int,
    tls: tuple[TlsIdentity, TlsIdentity] | None = None,
) -> float:
    """The plain copy; ``tls``: through TLS sockets (Python's ssl, blocking, a thread
    per connection each side): the ceiling of user-space TLS here."""

    def pour(sock: socket.socket, nbytes: int) -> None:
        sent = 0
        while sent < nbytes:
            n = min(CHUNK, nbytes - sent)
            sock.sendall(payload[:n])
            sent += n

    return _threaded_copy(control, "plain", connections, total, pour, tls)


def read_copy(control: Peer, payload: memoryview, connections: int, total: int) -> float:
    """The plain copy with the device read the channel makes: each chunk read from the
    device's memfd (``preadv``, as the channel's pump does) into a buffer, then sent."""
    memfd = _device_fd(bytes(payload))

    def pour(sock: socket.socket, nbytes: int) -> None:
        buffer = memoryview(bytearray(CHUNK))
        sent = 0
        while sent < nbytes:
            n = os.preadv(memfd, [buffer[: min(CHUNK, nbytes - sent)]], 0)
            sock.sendall(buffer[:n])
            sent += n

    return _threaded_copy(control, "plain", connections, total, pour)


def _send_frame(sock: socket.socket, frame: list[Buffer]) -> None:
    views = [memoryview(part).cast("B") for part in frame]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views.pop(0).nbytes
        if sent:
            views[0] = views[0][sent:]


def framed_copy(control: Peer, payload: memoryview, connections: int, total: int) -> float:
    def pour(sock: socket.socket, nbytes: int) -> None:
        encoder = wire.FrameEncoder()
        sent = 0
        while sent < nbytes:
            n = min(CHUNK, nbytes - sent)
            _send_frame(sock, encoder.data(0, payload[:n]))
            sent += n

    return _threaded_copy(control, "framed", connections, total, pour)


class _ToThread:
    """Chunks from a trio task to a thread, one hand-off each, at most ``depth``
    queued: the channel's writer queue with nothing else."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self._token = trio.lowlevel.current_trio_token()
        self._items: collections.deque[memoryview | None] = collections.deque()
        self._ready = threading.Condition()
        self._room: trio.Event | None = None

    async def put(self, item: memoryview | None) -> None:
        while True:
            with self._ready:
                if len(self._items) < self.depth:
                    self._items.append(item)
                    self._ready.notify()
                    break
                if self._room is None:
                    self._room = trio.Event()
                room = self._room
            await room.wait()
        await trio.lowlevel.checkpoint()

    def get(self) -> memoryview | None:
        with self._ready:
            while not self._items:
                self._ready.wait()
            item = self._items.popleft()
            room = self._room if len(self._items) <= self.depth // 2 else None
            if room is not None:
                self._room = None
        if room is not None:
            self._token.run_sync_soon(room.set)
        return item


def framed_trio_copy(control: Peer, payload: memoryview, connections: int, total: int) -> float:
    control.send(("framed_trio", connections, total, b"", None))
    port = control.recv()
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    elapsed = 0.0

    def send_frames(sock: socket.socket, chunks: _ToThread) -> None:
        encoder = wire.FrameEncoder()
        while (chunk := chunks.get()) is not None:
            _send_frame(sock, encoder.data(0, chunk))
        if sock.recv(1) != b"!":
            raise SystemExit("framed_trio copy: no confirmation")

    async def pour(sock: socket.socket, nbytes: int) -> None:
        chunks = _ToThread(16)
        sender = threading.Thread(target=send_frames, args=(sock, chunks))
        sender.start()
        sent = 0
        while sent < nbytes:
            n = min(CHUNK, nbytes - sent)
            await chunks.put(payload[:n])
            sent += n
        await chunks.put(None)
        await trio.to_thread.run_sync(sender.join)

    async def run() -> None:
        nonlocal elapsed
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for sock, share in zip(socks, _shares(total, connections), strict=True):
                nursery.start_soon(pour, sock, share)
        elapsed = time.perf_counter() - start

    trio.run(run)
    for sock in socks:
        sock.close()
    if control.recv() != "done":
        raise SystemExit("framed_trio copy: the destination failed")
    return elapsed


def channel_copy(
    control: Peer,
    payload: memoryview,
    connections: int,
    total: int,
    tls: tuple[TlsIdentity, TlsIdentity] | None = None,
    *,
    via_trio: bool = False,
) -> float:
    """The channel; ``tls``: (the destination's identity, the source's), mutual TLS;
    ``via_trio``: every chunk through trio's thread instead of pumps and sinks."""
    secret = new_secret()
    kind = "channel_trio" if via_trio else "channel"
    control.send((kind, connections, total, secret, tls[0] if tls else None))
    port = control.recv()
    devices = [f"dev{i}" for i in range(connections)]
    elapsed = 0.0
    memfd = _device_fd(bytes(payload))

    async def run() -> None:
        nonlocal elapsed
        peer = TlsPeer(tls[1].client_context(), "127.0.0.1") if tls else None
        async with open_channel(
            ("127.0.0.1", port),
            "bench",
            secret,
            devices,
            parallel_connections=connections,
            tls=peer,
        ) as channel:

            async def pour(device: str, nbytes: int) -> None:
                sender = channel.sender(device)
                if via_trio:
                    # As the runner reads a device without a blocking side: each
                    # chunk read (a fresh ``bytes``) and sent through trio's thread.
                    sent = 0
                    while sent < nbytes:
                        n = min(CHUNK, nbytes - sent)
                        await sender.send(os.pread(memfd, n, 0))
                        sent += n
                else:
                    transfer = sender.start_pump(_MemfdDevice(memfd, nbytes))
                    await transfer.done.wait()
                    if transfer.error is not None:
                        raise transfer.error
                await sender.end()

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for device, share in zip(devices, _shares(total, connections), strict=True):
                    nursery.start_soon(pour, device, share)
            await channel.all_acknowledged()
            elapsed = time.perf_counter() - start

    trio.run(run)
    if control.recv() != "done":
        raise SystemExit("channel: the destination failed")
    return elapsed


def _throwaway_identities(stack: contextlib.ExitStack) -> tuple[TlsIdentity, TlsIdentity]:
    """The destination's and the source's identities, of a CA made for this run."""
    try:
        import trustme
    except ImportError:
        raise SystemExit(
            "--tls needs the test extra's trustme (pip install -e '.[test]')"
        ) from None
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)  # the tests' helper (python bench/... puts bench/ first)
    from tests.helpers import tls_identity

    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tls-")))
    ca = trustme.CA()
    return (
        tls_identity(ca, folder / "destination", "127.0.0.1"),
        tls_identity(ca, folder / "source", "127.0.0.1"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", default="1,16,256,1024", help="state sizes, comma-separated")
    parser.add_argument("--connections", default="1,4", help="connection counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the median is shown")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 MiB, 1 run each")
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also the framed copies without the channel, in a second table",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also the channel in mutual TLS (certificates of a throw-away CA), in a table "
        "beside the plain copy and the cleartext channel",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes_mib, args.repeats = "1", 1
    sizes = [int(x) for x in args.sizes_mib.split(",")]
    counts = [int(x) for x in args.connections.split(",")]
    logs.configure("error")
    copies: dict[str, Callable[[Peer, memoryview, int, int], float]] = {
        "plain": plain_copy,
        "channel": channel_copy,
    }
    if args.ceiling:
        copies |= {
            "read": read_copy,
            "framed": framed_copy,
            "framed_trio": framed_trio_copy,
            "channel_trio": functools.partial(channel_copy, via_trio=True),
        }
    scratch = contextlib.ExitStack()
    if args.tls:
        identities = _throwaway_identities(scratch)
        copies["tls"] = functools.partial(channel_copy, tls=identities)
        copies["tls_socket"] = functools.partial(plain_copy, tls=identities)

    print(f"command: python bench/stream_throughput.py {' '.join(argv or sys.argv[1:])}".rstrip())
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpu, Python {platform.python_version()}, "
        f"loopback TCP, destination in a second process, {CHUNK // MIB} MiB chunks, "
        f"median of {args.repeats}"
    )
    payload = memoryview(os.urandom(CHUNK))
    ours = Peer()
    ceiling: list[str] = []
    secured: list[str] = []
    try:
        print("| state MiB | connections | plain GB/s | channel GB/s | ratio | target 0.80 |")
        print("|---:|---:|---:|---:|---:|---|")
        for size in sizes:
            total = size * MIB
            for connections in counts:
                seconds: dict[str, list[float]] = {kind: [] for kind in copies}
                for _ in range(args.repeats):
                    for kind, copy in copies.items():
                        seconds[kind].append(copy(ours, payload, connections, total))
                rate = {kind: total / statistics.median(s) / 1e9 for kind, s in seconds.items()}
                ratio = rate["channel"] / rate["plain"]
                print(
                    f"| {size} | {connections} | {rate['plain']:.2f} | {rate['channel']:.2f} "
                    f"| {ratio:.2f} | {'met' if ratio >= TARGET else 'missed'} |",
                    flush=True,
                )
                if args.tls:
                    secured.append(
                        f"| {size} | {connections} | {rate['plain']:.2f} | {rate['channel']:.2f} "
                        f"| {rate['tls_socket']:.2f} | {rate['tls']:.2f} "
                        f"| {rate['tls'] / rate['plain']:.2f} "
                        f"| {rate['tls'] / rate['channel']:.2f} "
                        f"| {rate['tls'] / rate['tls_socket']:.2f} |"
                    )
                if args.ceiling:
                    ceiling.append(
                        f"| {size} | {connections} | {rate['plain']:.2f} "
                        + " ".join(
                            f"| {rate[kind]:.2f} | {rate[kind] / rate['plain']:.2f}"
                            for kind in ("read", "framed", "framed_trio", "channel_trio", "channel")
                        )
                        + " |"
                    )
    finally:
        ours.close()
        scratch.close()
    if secured:
        print()
        print(
            "| state MiB | connections | plain GB/s | channel GB/s | TLS socket copy GB/s "
            "| TLS channel GB/s | TLS of plain | TLS of channel | TLS of TLS socket copy |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print("\n".join(secured))
    if ceiling:
        print()
        print(
            "| state MiB | connections | plain GB/s | plain + read GB/s | ratio "
            "| framed GB/s | ratio | framed + trio GB/s | ratio "
            "| channel via trio GB/s | ratio | channel GB/s | ratio |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print("\n".join(ceiling))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

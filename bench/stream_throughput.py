"""Data channel throughput against a plain socket copy of the same bytes.

The destination runs in a second process, like a second host (loopback
TCP).  For each size and connection count, the same bytes in the same
1 MiB chunks go two ways, alternately, in the same run:

* plain: ``sendall`` / ``recv_into`` a reused buffer, one thread per
  connection on each side; no framing, no checksum, no authentication;
* channel: ``open_channel`` with one device per connection, the source
  sending with ``StreamSender.send`` and ``end``, the destination reading
  with ``receive_lent`` (the pool buffer the kernel received into, as the
  runner's device writes take it), and acknowledging each device after
  its end.

Each timing starts once the connections are open (authentication is not
counted, as the plain copy has none) and stops when the destination has
confirmed every byte: the plain receiver's one-byte answer, the channel's
acknowledgements.  The table shows the median of ``--repeats`` runs of
each; the target is a channel at least 80% as fast as the plain copy.

    python bench/stream_throughput.py [--sizes-mib 1,16,256,1024] [--connections 1,4]
                                      [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import trio

from orchestrator import logs
from orchestrator.errors import PeerError
from orchestrator.transport import ChannelListener, new_secret, open_channel

MIB = 1 << 20
CHUNK = MIB
TARGET = 0.80


def _shares(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# -- destination process ---------------------------------------------------------


def _plain_destination(control: Connection, connections: int, total: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    control.send(listener.getsockname()[1])
    socks = [listener.accept()[0] for _ in range(connections)]
    listener.close()

    def drain(sock: socket.socket, nbytes: int) -> None:
        buffer = memoryview(bytearray(CHUNK))
        got = 0
        while got < nbytes:
            n = sock.recv_into(buffer)
            if n == 0:
                raise SystemExit("plain copy: the source closed early")
            got += n

    threads = [
        threading.Thread(target=drain, args=(sock, share))
        for sock, share in zip(socks, _shares(total, connections), strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sock in socks:
        sock.sendall(b"!")
        sock.close()


async def _channel_destination(control: Connection, connections: int, secret: bytes) -> None:
    devices = [f"dev{i}" for i in range(connections)]
    listener = ChannelListener()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(listener.serve, "127.0.0.1")
        channel = listener.expect("bench", secret, devices)
        control.send(address[1])

        async def load(device: str) -> None:
            receiver = channel.receiver(device)
            while await receiver.receive_lent() is not None:
                pass
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


def destination(control: Connection) -> None:
    logs.configure("error")
    while True:
        trial: tuple[str, int, int, bytes] | None = control.recv()
        if trial is None:
            return
        kind, connections, total, secret = trial
        if kind == "plain":
            _plain_destination(control, connections, total)
        else:
            trio.run(_channel_destination, control, connections, secret)
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


def plain_copy(control: Peer, payload: memoryview, connections: int, total: int) -> float:
    control.send(("plain", connections, total, b""))
    port = control.recv()
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]

    def pour(sock: socket.socket, nbytes: int) -> None:
        sent = 0
        while sent < nbytes:
            n = min(CHUNK, nbytes - sent)
            sock.sendall(payload[:n])
            sent += n
        if sock.recv(1) != b"!":
            raise SystemExit("plain copy: no confirmation")

    start = time.perf_counter()
    threads = [
        threading.Thread(target=pour, args=(sock, share))
        for sock, share in zip(socks, _shares(total, connections), strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    for sock in socks:
        sock.close()
    if control.recv() != "done":
        raise SystemExit("plain copy: the destination failed")
    return elapsed


def channel_copy(control: Peer, payload: memoryview, connections: int, total: int) -> float:
    secret = new_secret()
    control.send(("channel", connections, total, secret))
    port = control.recv()
    devices = [f"dev{i}" for i in range(connections)]
    elapsed = 0.0

    async def run() -> None:
        nonlocal elapsed
        async with open_channel(
            ("127.0.0.1", port), "bench", secret, devices, parallel_connections=connections
        ) as channel:

            async def pour(device: str, nbytes: int) -> None:
                sender = channel.sender(device)
                sent = 0
                while sent < nbytes:
                    n = min(CHUNK, nbytes - sent)
                    await sender.send(payload[:n])
                    sent += n
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", default="1,16,256,1024", help="state sizes, comma-separated")
    parser.add_argument("--connections", default="1,4", help="connection counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the median is shown")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 MiB, 1 run each")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes_mib, args.repeats = "1", 1
    sizes = [int(x) for x in args.sizes_mib.split(",")]
    counts = [int(x) for x in args.connections.split(",")]
    logs.configure("error")

    print(f"command: python bench/stream_throughput.py {' '.join(argv or sys.argv[1:])}".rstrip())
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpu, Python {platform.python_version()}, "
        f"loopback TCP, destination in a second process, {CHUNK // MIB} MiB chunks, "
        f"median of {args.repeats}"
    )
    payload = memoryview(os.urandom(CHUNK))
    ours = Peer()
    rows: list[dict[str, Any]] = []
    try:
        print("| state MiB | connections | plain GB/s | channel GB/s | ratio | target 0.80 |")
        print("|---:|---:|---:|---:|---:|---|")
        for size in sizes:
            total = size * MIB
            for connections in counts:
                plain_s: list[float] = []
                channel_s: list[float] = []
                for _ in range(args.repeats):
                    plain_s.append(plain_copy(ours, payload, connections, total))
                    channel_s.append(channel_copy(ours, payload, connections, total))
                plain = total / statistics.median(plain_s) / 1e9
                chan = total / statistics.median(channel_s) / 1e9
                ratio = chan / plain
                rows.append({"size": size, "connections": connections, "ratio": ratio})
                print(
                    f"| {size} | {connections} | {plain:.2f} | {chan:.2f} | {ratio:.2f} "
                    f"| {'met' if ratio >= TARGET else 'missed'} |",
                    flush=True,
                )
    finally:
        ours.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

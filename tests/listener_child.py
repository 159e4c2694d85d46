"""Processes whose data listener meets what a test process cannot safely undergo itself.

python -m tests.listener_child short-of-descriptors SECRET_HEX SPARE
    A ChannelListener on 127.0.0.1 expecting migration ``mig-emfile`` (device
    gpu0) whose process may open only SPARE more descriptors (RLIMIT_NOFILE).
    Prints {"port": ...} once listening, then, once gpu0's stream has ended,
    {"sha256": ..., "statistics": ...}; exits 0 when its stdin closes.  Logs
    (JSON) on stderr.
python -m tests.listener_child dies ORCHESTRATOR-ARGS...
    ``orchestrator ORCHESTRATOR-ARGS...`` whose data listener breaks on its
    first connection with an error its loop does not expect (a bug).  The
    listener's port is written to the file $LISTENER_CHILD_PORT_FILE.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys

import trio

from orchestrator import cli, logs
from orchestrator.transport.channel import ChannelListener

MIGRATION = "mig-emfile"


async def short_of_descriptors(secret: bytes, spare: int) -> None:
    # Strangers stay until closed to make room: no bound on them but the descriptors.
    listener = ChannelListener(max_handshakes=100_000, handshake_timeout_s=600)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(listener.serve, "127.0.0.1")
        channel = listener.expect(MIGRATION, secret, ["gpu0"])
        # Descriptor numbers are taken lowest first: past the highest one open
        # now, SPARE more, then accept fails with EMFILE.
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + spare, hard))
        print(json.dumps({"port": port}), flush=True)
        digest = hashlib.sha256()
        receiver = channel.receiver("gpu0")
        while (piece := await receiver.receive_lent()) is not None:
            digest.update(piece)
        await channel.acknowledge("gpu0")
        statistics = listener.statistics()
        report = {
            "sha256": digest.hexdigest(),
            "statistics": {
                "handshakes": statistics.handshakes,
                "refused": {kind.value: n for kind, n in statistics.refused.items()},
                "accept_errors": dict(statistics.accept_errors),
            },
        }
        print(json.dumps(report), flush=True)
        await trio.to_thread.run_sync(sys.stdin.buffer.read)
        await channel.aclose()
        nursery.cancel_scope.cancel()


async def _accept_then_break(
    self: ChannelListener, sock: trio.socket.SocketType
) -> tuple[trio.socket.SocketType, object]:
    await trio.Path(os.environ["LISTENER_CHILD_PORT_FILE"]).write_text(str(sock.getsockname()[1]))
    conn, _ = await sock.accept()
    conn.close()
    raise RuntimeError("injected: the data listener's loop broke")


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "short-of-descriptors":
        logs.configure("info", "json")
        secret, spare = args
        trio.run(short_of_descriptors, bytes.fromhex(secret), int(spare))
        return 0
    if command == "dies":
        ChannelListener._accept_connection = _accept_then_break  # type: ignore[method-assign]
        return cli.main(args)
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

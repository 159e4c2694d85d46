"""Telling systemd how the daemon stands (``sd_notify``), where it asked.

A unit of ``Type=notify`` starts the daemon with ``NOTIFY_SOCKET`` set to a
datagram socket; the daemon sends ``READY=1`` once it serves (its API, its
listeners and the migration service all up), and ``STOPPING=1`` as it
begins to shut down.  Without ``NOTIFY_SOCKET`` (anywhere but under such a
unit) nothing is sent.  A failed send is logged and changes nothing: the
daemon serves whether or not its supervisor heard.
"""

from __future__ import annotations

import os
import socket

import structlog

__all__ = ["notify"]

log = structlog.get_logger("orchestrator.daemon")


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) to ``$NOTIFY_SOCKET``; whether
    they were sent (False: no socket was given, or the send failed)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # the abstract namespace
        address = "\0" + address[1:]
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        log.warning("daemon.notify_failed", socket=address, error=exc.strerror or str(exc))
        return False
    return True

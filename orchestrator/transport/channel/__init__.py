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

One module per job:

* ``buffers.py``: the payload buffers a data connection receives into and
  lends to the devices' consumers;
* ``links.py``: one connection once authenticated: a data connection's
  reader and writer threads, the control connection on trio's thread, and
  the order frames leave in;
* ``bulk.py``: bulk transfers, a device read or loaded by its connection's
  own threads (``StreamSender.start_pump``, ``StreamReceiver.start_sink``),
  trio told of each transfer's end only;
* ``ends.py``: one migration's channel as each side holds it
  (``SourceChannel``, ``DestinationChannel``, a stream end per device,
  ``open_channel``): routing, acknowledgements, CONTROL messages, and
  all-or-nothing failure;
* ``listener.py``: the destination's listening socket (``ChannelListener``):
  the handshake, and handing each authenticated connection to its channel.

The wire protocol, frames and handshake alike, is the sans-IO ``wire.py``
beside this package.
"""

from __future__ import annotations

from orchestrator.transport.channel.buffers import SPARE_BUFFER_BYTES
from orchestrator.transport.channel.ends import (
    ABORT_GRACE_S,
    CONTROL_BACKLOG,
    DEFAULT_MAX_CONNECTIONS,
    ChannelStatistics,
    DestinationChannel,
    NetworkStreamReceiver,
    NetworkStreamSender,
    SourceChannel,
    default_connections,
    new_secret,
    open_channel,
)
from orchestrator.transport.channel.links import (
    CONTROL_RECEIVE_BYTES,
    LINK_TIMEOUT_S,
    QUEUED_BYTES,
    QUEUED_PIECES,
    RECV_PIECE_BYTES,
    UNSENT_BYTES,
    WRITE_BATCH,
    WRITE_BATCH_BYTES,
)
from orchestrator.transport.channel.listener import ChannelListener, ListenerStatistics, Refusal
from orchestrator.transport.channel.tls import TlsIdentity, TlsPeer

__all__ = [
    "ABORT_GRACE_S",
    "CONTROL_BACKLOG",
    "CONTROL_RECEIVE_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "LINK_TIMEOUT_S",
    "QUEUED_BYTES",
    "QUEUED_PIECES",
    "RECV_PIECE_BYTES",
    "SPARE_BUFFER_BYTES",
    "UNSENT_BYTES",
    "WRITE_BATCH",
    "WRITE_BATCH_BYTES",
    "ChannelListener",
    "ChannelStatistics",
    "DestinationChannel",
    "ListenerStatistics",
    "NetworkStreamReceiver",
    "NetworkStreamSender",
    "Refusal",
    "SourceChannel",
    "TlsIdentity",
    "TlsPeer",
    "default_connections",
    "new_secret",
    "open_channel",
]

"""The device-state data channel between a source and a destination device.

A stream carries one device's migration data, in order, from the source
device's reads to the destination device's writes (``StreamSender`` and
``StreamReceiver``, in ``streams.py``).  Two implementations:

* ``local_stream``: two devices of one host, through a bounded memory channel.
* the network data channel (the ``channel`` package): the destination's
  ``ChannelListener.expect(...)`` and the source's ``open_channel(...)`` give
  one stream end per device over authenticated TCP connections, with
  acknowledgements, CONTROL messages and ABORT; its wire protocol is the
  sans-IO ``wire.py``.

``RateLimiter`` enforces a plan's ``bandwidth_limit_mib_s`` across every
stream of a migration.
"""

from __future__ import annotations

from orchestrator.transport.channel import (
    ChannelListener,
    ChannelStatistics,
    DestinationChannel,
    NetworkStreamReceiver,
    NetworkStreamSender,
    SourceChannel,
    default_connections,
    new_secret,
    open_channel,
)
from orchestrator.transport.streams import (
    BlockingReader,
    BlockingWriter,
    LocalStreamReceiver,
    LocalStreamSender,
    RateLimiter,
    StreamReceiver,
    StreamSender,
    Transfer,
    local_stream,
)

__all__ = [
    "BlockingReader",
    "BlockingWriter",
    "ChannelListener",
    "ChannelStatistics",
    "DestinationChannel",
    "LocalStreamReceiver",
    "LocalStreamSender",
    "NetworkStreamReceiver",
    "NetworkStreamSender",
    "RateLimiter",
    "SourceChannel",
    "StreamReceiver",
    "StreamSender",
    "Transfer",
    "default_connections",
    "local_stream",
    "new_secret",
    "open_channel",
]

"""Devices by handle: what every backend that takes handed-over devices shares.

A VMM lends the daemon the descriptor of a device it holds over the
handover socket (``orchestrator.handover``); the daemon keeps it in its
``HandleRegistry`` under a *handle*, ``"<vm>/<device>"``, and a plan names
the device by that handle in the backend's parameters (``handle =
"vm1/nic0"``) instead of by path or address.

A backend that accepts handles:

* adds ``handle: str | None`` to its parameter model, checked with
  :func:`check_handle`, as one more mutually exclusive way to name a device;
* is bound to the daemon's registry by ``Backend.with_handles`` (the
  daemon's registry is built by ``backends_for(state_dir, handles=...)``);
  without one (``orchestrator run``, no daemon) it has no handed-over
  devices, and :func:`open_handle` says so;
* opens such a device with :func:`open_handle`, in the trio thread (the
  registry is plain single-threaded code): a duplicate of the handed-over
  descriptor, its own to close, as if the VMM had handed it to the backend
  directly.  The registry and the VMM keep theirs.
* locks it in the service by :func:`handle_key` (``Backend.device_keys``):
  a handle names one device of one VMM, whatever the plan calls it.

``resolve`` checks a plan's handles against the registry before anything
runs (each is handed over, belongs to the plan's VM and is of the backend's
kind); :func:`open_handle` checks again when the device is opened, because
the VMM may have taken its device back between the two.
"""

from __future__ import annotations

import errno
import re
from typing import Final

from orchestrator.errors import DeviceError
from orchestrator.handover import HANDLE_PARAM, HandleRegistry, HandoverError
from orchestrator.plan import NAME_PATTERN

__all__ = ["HANDLE_PARAM", "NEEDS_DAEMON", "check_handle", "handle_key", "open_handle"]

_PART = NAME_PATTERN.removeprefix("^").removesuffix("$")
_HANDLE = re.compile(f"^{_PART}/{_PART}$")

#: Why a process without a handover socket cannot open a device by handle.
NEEDS_DAEMON: Final = (
    "devices by handle need the daemon's handover socket: submit the plan to "
    "`orchestrator serve` (POST /v1/migrations), whose handover_socket the VMM "
    "handed the device to"
)


def check_handle(value: str | None) -> str | None:
    """A parameter model's validator for ``handle``: ``"<vm>/<device>"`` or a ValueError."""
    if value is None:
        return None
    if not _HANDLE.match(value):
        raise ValueError(
            f"{value!r} is not a handle: '<vm>/<device>', each a name of 1 to 128 letters, "
            "digits and _.:@- (the handover socket's reply to hand_over says it)"
        )
    return value


def handle_key(backend: str, handle: str) -> str:
    """The service's lock key of a handed-over device."""
    return f"{backend}:handle:{handle}"


def open_handle(registry: HandleRegistry | None, handle: str, *, kind: str, device: str) -> int:
    """A new descriptor (close-on-exec) of the device handed over as ``handle``; the
    caller owns it and closes it.  A DeviceError naming the handle when there is no
    registry, no such handle any more, or it was handed over as another kind."""

    def refuse(err: int, detail: str) -> DeviceError:
        return DeviceError(
            f"handle {handle!r}: {detail}", device=device, operation="open", errno=err
        )

    if registry is None:
        raise refuse(errno.ENODEV, NEEDS_DAEMON)
    entry = registry.lookup(handle)
    if entry is None:
        raise refuse(
            errno.ENODEV,
            "no device is handed over under this handle (its VMM took it back or "
            "disconnected, or never handed it over)",
        )
    if entry.kind != kind:
        raise refuse(errno.EINVAL, f"it was handed over as a {entry.kind} device, not a {kind} one")
    try:
        return registry.open(handle)
    except HandoverError as exc:
        raise refuse(errno.ENODEV, exc.message) from None
    except OSError as exc:
        err = exc.errno or errno.EBADF
        raise refuse(err, f"cannot duplicate its descriptor: {exc.strerror or err}") from None

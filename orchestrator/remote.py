"""The source daemon's side of a migration between two hosts.

A plan with a ``[destination]`` table is run by the source daemon's runner
exactly as a local plan is, with one difference: its destination devices
are :class:`RemoteDevice` proxies for devices the destination daemon owns
(``orchestrator.incoming``).  :class:`RemoteDestination` is the link to that
daemon for one migration:

* ``prepare``: REST ``POST /v1/incoming`` with the plan (never the token
  file's contents): the destination validates the plan against its own
  backends, opens its devices, and answers with their capabilities, the
  address of its data channel and a secret for this migration only;
* ``session``: the authenticated data channel (``orchestrator.transport``)
  for the whole migration, and the task reading the destination's control
  messages;
* device calls (get_state, set_state, reset) as request/response control
  messages.  The arcs a destination device takes when its stream ends (to
  STOP, then to RUNNING_P2P) are *not* requested: the destination takes
  them on its own the moment the stream is loaded and reports them, so the
  downtime window holds no round trip per arc.  ``RemoteDevice.set_state``
  for those targets waits for the report;
* the switchover acknowledgement (``initial_sent`` out, an ACK frame back);
* ``commit``: sent right after the source journal recorded the decision;
  the destination runs every device at once and records the decision in its
  own journal meanwhile (a restart before that record lands finds the vote
  and waits for the source, which delivers the commit again);
* ``finish``: the outcome, so that both journals agree.

When the channel fails, device calls fall back to REST: the destination
resets its devices by itself when it loses the channel before the commit,
and a commit that could not be sent over the channel is delivered with
``POST /v1/incoming/{id}/decision``.
"""

from __future__ import annotations

import contextlib
import itertools
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
import trio

from orchestrator.backends.base import Device, PrecopyInfo, StreamChunk
from orchestrator.errors import DeviceError, PeerError, PlanError
from orchestrator.plan import Plan
from orchestrator.plan import RemoteDestination as RemoteDestinationSpec
from orchestrator.states import Capabilities, DeviceState, MigrationFlags, Side
from orchestrator.transport import RateLimiter
from orchestrator.transport.channel import SourceChannel, open_channel

log = structlog.get_logger("orchestrator.remote")

__all__ = ["RemoteDestination", "RemoteDevice", "capabilities_from_json", "destination_token"]

#: How often a REST fallback asks the destination where a device stands.
_POLL_S = 0.05


def capabilities_from_json(data: Mapping[str, Any]) -> Capabilities:
    return Capabilities(
        flags=MigrationFlags(int(data["flags"])),
        stop_copy_size=bool(data.get("stop_copy_size", False)),
        dirty_logging=bool(data.get("dirty_logging", False)),
    )


def destination_token(spec: RemoteDestinationSpec) -> str:
    """The first token in the plan's ``destination.token_file``; PlanError if unusable."""
    from orchestrator.settings import SettingsError, read_token_file

    try:
        return read_token_file(spec.token_file, check_mode=False)[0]
    except SettingsError as exc:
        message = "; ".join(p.message for p in exc.problems)
        raise PlanError([_problem("destination.token_file", message)]) from None


def _problem(path: str, message: str) -> Any:
    from orchestrator.errors import Problem

    return Problem(path, message)


@dataclass
class _Arc:
    target: DeviceState
    ok: bool
    state: DeviceState
    error: dict[str, Any] | None


class _DeviceLink:
    """What the source knows of one destination device between messages."""

    def __init__(self) -> None:
        self.loaded = trio.Event()
        self.reported_loaded = False
        self.load_error: dict[str, Any] | None = None
        self.arcs_send, self.arcs = trio.open_memory_channel[_Arc](16)
        #: Targets the destination walks by itself once the stream is loaded.
        self.autonomous: list[DeviceState] = []


class RemoteDestination:
    """The destination daemon of one cross-host migration; see the module docstring."""

    def __init__(self, spec: RemoteDestinationSpec, plan: Plan, migration_id: str) -> None:
        self.spec = spec
        self.plan = plan
        self.id = migration_id
        self.base_url = spec.url.rstrip("/")
        self.log = log.bind(migration=migration_id, destination=self.base_url)
        self.capabilities: dict[str, Capabilities] = {}
        self.channel: SourceChannel | None = None
        self.failure: PeerError | None = None
        self._devices = {d.name: _DeviceLink() for d in plan.devices}
        self._calls: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._ids = itertools.count(1)
        self._data: tuple[str, int] | None = None
        self._secret: bytes | None = None
        self._token: str | None = None
        self.commit_sent = False
        self.committed_remote = trio.Event()
        #: What the report should say about the destination host.
        self.notes: list[str] = []

    # -- REST --------------------------------------------------------------------

    def _client(self, timeout: float | None = None) -> httpx.AsyncClient:
        if self._token is None:
            self._token = destination_token(self.spec)
        verify: ssl.SSLContext | bool = True
        if self.spec.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(self.spec.ca_file))
        return httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self._token}"},
            # Well inside the runner's deadline on the device call it serves,
            # so that an unreachable destination is told apart from a slow one.
            timeout=timeout or self.plan.timeouts.device_call_s / 3,
            verify=verify,
        )

    async def _request(
        self, method: str, path: str, *, http_timeout_s: float | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        try:
            async with self._client(http_timeout_s) as client:
                response = await client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise PeerError(
                f"the destination daemon {self.base_url} did not answer: {exc}"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text[:500]}
        if response.status_code >= 400:
            error = body.get("error", body) if isinstance(body, dict) else {}
            problems = error.get("problems") or []
            if response.status_code == 422 and problems:
                raise PlanError(
                    [
                        _problem(f"destination daemon: {p.get('path', '')}", p.get("message", ""))
                        for p in problems
                    ]
                )
            raise PeerError(
                f"the destination daemon refused {method} {path} "
                f"({response.status_code}): {error.get('message', body)}"
            )
        if not isinstance(body, dict):
            raise PeerError(f"the destination daemon answered {method} {path} with {body!r}")
        return body

    async def prepare(self) -> dict[str, Capabilities]:
        """Ask the destination daemon to prepare its devices; their capabilities."""
        plan = self.plan.model_dump(mode="json", exclude={"destination"})
        body = await self._request(
            "POST",
            "/v1/incoming",
            json={"migration_id": self.id, "plan": plan},
            http_timeout_s=self.plan.timeouts.prepare_s,
        )
        try:
            data = body["data"]
            host = data.get("host") or urlsplit(self.base_url).hostname
            self._data = (str(host), int(data["port"]))
            self._secret = bytes.fromhex(body["secret"])
            self.capabilities = {
                name: capabilities_from_json(info["capabilities"])
                for name, info in body["devices"].items()
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise PeerError(
                f"the destination daemon's prepare answer is malformed: {exc}"
            ) from None
        missing = sorted(set(self._devices) - set(self.capabilities))
        if missing:
            raise PeerError(f"the destination daemon did not prepare {', '.join(missing)}")
        return self.capabilities

    async def fetch_capabilities(self) -> None:
        """The destination devices' capabilities from the destination's status."""
        try:
            status = await self.status()
            for name, info in status["devices"].items():
                if info.get("capabilities"):
                    self.capabilities[name] = capabilities_from_json(info["capabilities"])
        except PeerError as exc:
            raise DeviceError(f"cannot reach the destination daemon: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise DeviceError(f"the destination daemon's status is malformed: {exc}") from None
        missing = sorted(set(self._devices) - set(self.capabilities))
        if missing:
            raise DeviceError(
                f"the destination daemon does not report the capabilities of {', '.join(missing)}"
            )

    async def status(self) -> dict[str, Any]:
        return await self._request("GET", f"/v1/incoming/{self.id}")

    async def decide(self, decision: str) -> dict[str, Any]:
        """Deliver commit or abort over REST (the channel is gone)."""
        return await self._request(
            "POST", f"/v1/incoming/{self.id}/decision", json={"decision": decision}
        )

    # -- the channel -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def session(
        self, limiter: RateLimiter | None, parallel_connections: int | None
    ) -> AsyncIterator[SourceChannel]:
        """The data channel and its control reader, for the whole migration."""
        assert self._data is not None and self._secret is not None, "prepare() first"
        async with open_channel(
            self._data,
            self.id,
            self._secret,
            list(self._devices),
            parallel_connections=parallel_connections,
            limiter=limiter,
            connect_timeout_s=self.plan.timeouts.device_call_s,
        ) as channel:
            self.channel = channel
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_control)
                try:
                    yield channel
                finally:
                    nursery.cancel_scope.cancel()

    async def _read_control(self) -> None:
        assert self.channel is not None
        try:
            while True:
                message = await self.channel.receive_control()
                self._dispatch(message)
        except PeerError as exc:
            self._lost(exc)
        except trio.EndOfChannel:
            self._lost(PeerError("the destination closed the channel"))

    def _lost(self, exc: PeerError) -> None:
        if self.failure is None:
            self.failure = exc
            self.log.warning("remote.channel_lost", reason=str(exc))
        for event, _ in self._calls.values():
            event.set()
        for link in self._devices.values():
            link.loaded.set()
            link.arcs_send.close()

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "result":
            pending = self._calls.get(message.get("id", -1))
            if pending is not None:
                pending[1].append(message)
                pending[0].set()
        elif op == "loaded":
            link = self._link(message)
            if link is not None:
                link.reported_loaded = True
                link.loaded.set()
        elif op == "load_failed":
            link = self._link(message)
            if link is not None:
                link.load_error = message.get("error") or {}
                link.loaded.set()
        elif op == "arc":
            link = self._link(message)
            if link is not None:
                try:
                    arc = _Arc(
                        target=DeviceState[message["to"]],
                        ok=bool(message["ok"]),
                        state=DeviceState[message["state"]],
                        error=message.get("error"),
                    )
                except (KeyError, TypeError):
                    self._lost(PeerError(f"a malformed arc report: {message!r}"))
                    return
                with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                    link.arcs_send.send_nowait(arc)
        elif op == "committed":
            self.committed_remote.set()
        else:
            self._lost(PeerError(f"the destination sent an unknown control message {op!r}"))

    def _link(self, message: dict[str, Any]) -> _DeviceLink | None:
        return self._devices.get(str(message.get("device")))

    async def call(self, device: str, call: str, target: DeviceState | None = None) -> DeviceState:
        """One device call on the destination; its state after it."""
        if self.failure is not None or self.channel is None:
            return await self._call_over_rest(device, call, target)
        call_id = next(self._ids)
        event = trio.Event()
        self._calls[call_id] = (event, [])
        try:
            message: dict[str, Any] = {"op": "call", "id": call_id, "device": device, "call": call}
            if target is not None:
                message["target"] = target.name
            try:
                await self.channel.send_control(message)
            except PeerError as exc:
                self._lost(exc)
                return await self._call_over_rest(device, call, target)
            await event.wait()
            replies = self._calls[call_id][1]
        finally:
            del self._calls[call_id]
        if not replies:
            return await self._call_over_rest(device, call, target)
        reply = replies[0]
        if not reply.get("ok"):
            raise _device_error(reply.get("error") or {}, device, call, target)
        return DeviceState[reply["state"]]

    async def _call_over_rest(
        self, device: str, call: str, target: DeviceState | None
    ) -> DeviceState:
        """A device call once the channel is gone: the destination acts on its own
        (reset before the commit, run after it); wait until it says it did."""
        reason = f"the data channel to {self.base_url} is gone ({self.failure})"
        try:
            if call == "set_state" and target is DeviceState.RUNNING and self.commit_sent:
                await self.decide("commit")
                return await self._wait_state(device, {DeviceState.RUNNING})
            if call == "reset":
                return await self._reset_over_rest(device, reason)
            if call == "get_state":
                return await self._remote_state(device)
        except PeerError as exc:
            raise DeviceError(
                f"{reason}; and over REST: {exc}", device=device, operation=call
            ) from None
        raise DeviceError(
            f"{reason}: {call} {target.name if target else ''} needs the channel",
            device=device,
            operation=call,
            target=target.name if target else None,
        )

    async def _reset_over_rest(self, device: str, reason: str) -> DeviceState:
        """Before the commit the destination resets its devices by itself once it
        loses the channel (that is the protocol); confirm it where the destination
        daemon answers, and say in the report where it cannot be confirmed."""
        try:
            with contextlib.suppress(PeerError):
                await self.decide("abort")
            return await self._wait_state(device, {DeviceState.RUNNING}, reset=True)
        except PeerError as exc:
            if self.commit_sent:
                raise
            self.notes.append(
                f"destination device {device!r}: reset not confirmed ({reason}; {exc}); the "
                "destination daemon resets it by itself when it loses the data channel, "
                "or on its restart"
            )
            return DeviceState.RUNNING

    async def _remote_state(self, device: str) -> DeviceState:
        status = await self.status()
        try:
            return DeviceState[status["devices"][device]["state"]]
        except (KeyError, TypeError):
            raise PeerError(f"the destination daemon does not report device {device!r}") from None

    async def _wait_state(
        self, device: str, wanted: set[DeviceState], *, reset: bool = False
    ) -> DeviceState:
        while True:
            status = await self.status()
            try:
                info = status["devices"][device]
                state = DeviceState[info["state"]]
            except (KeyError, TypeError):
                raise PeerError(f"the destination daemon does not report {device!r}") from None
            if state in wanted and (not reset or info.get("reset") or status.get("outcome")):
                return state
            if status.get("outcome") is not None and state not in wanted:
                raise PeerError(
                    f"the destination ended ({status['outcome']}) with {device!r} in {state.name}"
                )
            await trio.sleep(_POLL_S)

    # -- the steps of the migration ------------------------------------------------

    def expect_autonomous(self, device: str, targets: list[DeviceState]) -> None:
        self._devices[device].autonomous = list(targets)

    async def loaded(self, device: str) -> None:
        link = self._devices[device]
        await link.loaded.wait()
        if link.load_error is not None:
            raise _device_error(link.load_error, device, "write", None)
        if not link.reported_loaded:
            raise self.failure or PeerError(f"the destination never loaded {device!r}")

    async def autonomous_arc(self, device: str, target: DeviceState) -> bool:
        """If ``target`` is the next arc the destination takes by itself, wait for its
        report (DeviceError if it failed) and return True; False otherwise."""
        link = self._devices[device]
        if not link.autonomous or link.autonomous[0] is not target:
            return False
        link.autonomous.pop(0)
        try:
            arc = await link.arcs.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            # The channel is gone: the caller asks again, over REST where that can
            # be answered (running after the commit), or fails.
            link.autonomous.clear()
            return False
        if arc.target is not target:
            raise DeviceError(
                f"the destination reported an arc to {arc.target.name}, expected {target.name}",
                device=device,
                operation="set_state",
                target=target.name,
            )
        if not arc.ok:
            raise _device_error(arc.error or {}, device, "set_state", target)
        return True

    def in_flight_bytes(self) -> int:
        """Channel bytes sent and not yet delivered to the destination host."""
        return self.channel.in_flight_bytes() if self.channel is not None else 0

    async def initial_sent(self, device: str, nbytes: int) -> None:
        assert self.channel is not None
        await self.channel.send_control({"op": "initial_sent", "device": device, "bytes": nbytes})

    async def all_acknowledged(self) -> None:
        assert self.channel is not None
        await self.channel.all_acknowledged()

    async def commit(self) -> None:
        """Tell the destination the decision is recorded; over REST if the channel failed."""
        self.commit_sent = True
        if self.channel is not None and self.failure is None:
            # On the commit the destination runs every device by itself.
            for link in self._devices.values():
                link.autonomous.append(DeviceState.RUNNING)
            try:
                await self.channel.send_control({"op": "commit"}, wait=True)
            except PeerError as exc:
                self._lost(exc)
            else:
                return
        with contextlib.suppress(PeerError):
            await self.decide("commit")

    async def finish(self, outcome: str, error: dict[str, Any] | None) -> None:
        if self.channel is None or self.failure is not None:
            return
        with contextlib.suppress(PeerError):
            await self.channel.send_control(
                {"op": "finish", "outcome": outcome, "error": error}, wait=True
            )

    def device(self, name: str) -> RemoteDevice:
        return RemoteDevice(name, self)


class RemoteDevice(Device):
    """A destination device the destination daemon drives for this source."""

    backend = "remote"

    def __init__(self, name: str, remote: RemoteDestination) -> None:
        super().__init__(name, Side.DESTINATION)
        self.remote = remote

    async def open(self) -> Capabilities:
        if self.name not in self.remote.capabilities:
            # Recovery: no prepare call this time; the destination still knows.
            await self.remote.fetch_capabilities()
        return self.remote.capabilities[self.name]

    async def get_state(self) -> DeviceState:
        return await self.remote.call(self.name, "get_state")

    async def set_state(self, target: DeviceState) -> None:
        if await self.remote.autonomous_arc(self.name, target):
            return
        await self.remote.call(self.name, "set_state", target)

    async def read(self, max_bytes: int) -> bytes:
        raise DeviceError("a destination device is not read", device=self.name, operation="read")

    async def write(self, data: StreamChunk) -> None:
        raise DeviceError(
            "the destination daemon writes its devices itself", device=self.name, operation="write"
        )

    async def precopy_info(self) -> PrecopyInfo:
        raise DeviceError("no pre-copy on a destination", device=self.name)

    async def stop_copy_size(self) -> int:
        raise DeviceError("no stop-copy on a destination", device=self.name)

    async def reset(self) -> None:
        await self.remote.call(self.name, "reset")

    async def close(self) -> None:
        return None


def _device_error(
    error: Mapping[str, Any], device: str, operation: str, target: DeviceState | None
) -> DeviceError:
    errno = error.get("errno")
    return DeviceError(
        f"on the destination host: {error.get('message', 'failed')}",
        device=device,
        operation=str(error.get("operation") or operation),
        target=target.name if target else error.get("target"),
        errno=errno if isinstance(errno, int) else None,
    )

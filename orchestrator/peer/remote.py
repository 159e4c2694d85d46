"""The destination half on another host: a :class:`Destination` over REST and the data channel.

The coordinator (``orchestrator.engine.migration``) drives this exactly as it
drives a local destination; the destination daemon runs the same
destination engine behind its server (``orchestrator.peer.server``).  What
crosses between the two daemons is typed messages (``peer.messages``), and
what they mean is the source's protocol machine (``peer.protocol``): every
message from the destination, and every step of the coordinator's, is fed
to it, and its actions are carried out here.

* ``open``: ``POST /v1/incoming`` with the plan (never a token file's
  contents), the protocol versions this daemon speaks, this daemon's API
  address and a credential that answers for this migration's decision only.
  The destination opens and checks its devices and answers with their
  capabilities, where its data channel listens, and a secret for it;
* ``begin``: the data channel, then ``Begin``: the destination walks its
  devices to RESUMING and reports each arc, which this side's driver takes
  into the coordinator's flow and trace as it arrives;
* the streams, and the switchover acknowledgement (``InitialSent``, ACK);
* ``vote``, ``commit``, ``abort``, ``finish``: the two-phase commit.

When the channel is gone, messages go over REST (``POST
/v1/incoming/{id}/messages``), whose answer carries the destination's
replies.  After the commit this side delivers the commit again, with
backoff, until the destination says how it ended: it never guesses.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
import trio

from orchestrator.compat import Identity
from orchestrator.engine import (
    Completion,
    Destination,
    DeviceDriver,
    DeviceFailure,
    LeftInDoubt,
    OverBudget,
    Share,
)
from orchestrator.errors import OrchestratorError, PeerError, PlanError, Problem, ProtocolViolation
from orchestrator.peer import protocol as p
from orchestrator.peer.backoff import FIRST_S, backoff
from orchestrator.peer.messages import (
    IDENTITIES_VERSION,
    ORDERED_VERSION,
    PROTOCOL_VERSIONS,
    decode,
    encode,
)
from orchestrator.plan import Plan
from orchestrator.plan import RemoteDestination as RemoteDestinationSpec
from orchestrator.report import ErrorInfo, Outcome
from orchestrator.states import Capabilities, DeviceState, MigrationFlags, Side
from orchestrator.transport import (
    BlockingReader,
    RateLimiter,
    SourceChannel,
    StreamSender,
    Transfer,
    open_channel,
)
from orchestrator.transport.channel import TlsIdentity, TlsPeer

log = structlog.get_logger("orchestrator.peer.remote")

__all__ = [
    "RemoteDestination",
    "SourceContact",
    "Unsettled",
    "capabilities_from_json",
    "destination_token",
]

DESTINATION = Side.DESTINATION


def capabilities_from_json(data: Mapping[str, Any]) -> Capabilities:
    return Capabilities(
        flags=MigrationFlags(int(data["flags"])),
        stop_copy_size=bool(data.get("stop_copy_size", False)),
        dirty_logging=bool(data.get("dirty_logging", False)),
        precopy_reinit=bool(data.get("precopy_reinit", False)),
    )


#: How long the source waits on an open channel with no news before it asks over REST.
QUIET_S = 2.0


def _arcs(figures: Mapping[str, Any] | None) -> dict[tuple[DeviceState, DeviceState], float]:
    """``{"FROM->TO": ms}`` as states and seconds (KeyError or ValueError if malformed)."""
    out = {}
    for text, ms in (figures or {}).items():
        source, target = text.split("->")
        out[(DeviceState[source], DeviceState[target])] = float(ms) / 1000
    return out


def destination_token(spec: RemoteDestinationSpec) -> str:
    """The first token in the plan's ``destination.token_file``; PlanError if unusable."""
    from orchestrator.settings import SettingsError, read_token_file

    try:
        return read_token_file(spec.token_file, check_mode=False)[0]
    except SettingsError as exc:
        message = "; ".join(problem.message for problem in exc.problems)
        raise PlanError([Problem("destination.token_file", message)]) from None


@dataclass(frozen=True)
class SourceContact:
    """How the destination reaches this daemon to ask for a migration's decision."""

    api: str
    token: str


@dataclass
class _DeviceLink:
    """What this side knows of one destination device between reports."""

    #: Reached its transfer state (RESUMING).
    transfer: trio.Event = field(default_factory=trio.Event)
    loaded: bool = False
    #: Loaded and standing in its grace state (or STOP without P2P).
    ready: trio.Event = field(default_factory=trio.Event)
    #: The destination reported this device failed.
    failure: ErrorInfo | None = None

    def fail(self, info: ErrorInfo) -> None:
        if self.failure is None:
            self.failure = info
        self.transfer.set()
        self.ready.set()


class Unsettled(OrchestratorError):
    """An operator's settle refused: the migration is not in doubt, or its peer answers."""

    status_hint = 409


class RemoteDestination(Destination):
    """The destination daemon of one migration; see the module docstring."""

    on_this_host = False

    def __init__(
        self,
        spec: RemoteDestinationSpec,
        plan: Plan,
        migration_id: str,
        driver: DeviceDriver,
        limiter: RateLimiter | None,
        contact: SourceContact,
        *,
        recovering: bool = False,
        committed: bool = False,
        tls: TlsIdentity | None = None,
    ) -> None:
        self.spec = spec
        #: This host's TLS identity: the data channel is mutual TLS, and the
        #: destination API's certificate is checked against its CA.
        self.tls = tls
        self._tls_peer: TlsPeer | None = None
        self.plan = plan
        self.id = migration_id
        self.driver = driver
        self.ctx = driver.ctx
        self.contact = contact
        self.base_url = spec.url.rstrip("/")
        self.log = log.bind(migration=migration_id, destination=self.base_url)
        self.notes = []
        if spec.ca_file is not None:
            why = "destination.ca_file is deprecated: set the daemon's [tls] ca_file" + (
                " (which this daemon uses instead)" if tls is not None else ""
            )
            self.notes.append(why)
            self.log.warning("remote.deprecated_ca_file", hint=why)
        self.machine = p.SourceMachine()
        self._first: p.Step | None = None
        if recovering:
            # From the journal at once: the destination may ask before anything else.
            self.machine, self._first = p.SourceMachine.restarted(committed=committed, outcome=None)
        self.names = [d.name for d in plan.devices]
        self._limiter = limiter
        self._links = {name: _DeviceLink() for name in self.names}
        self._recovering = recovering
        self._data: tuple[str, int] | None = None
        self._secret: bytes | None = None
        #: Per device, the arcs its backend declares, from the prepare answer.
        self._declared_arcs: dict[str, dict[tuple[DeviceState, DeviceState], float]] = {}
        self._history_arcs: dict[str, dict[tuple[DeviceState, DeviceState], float]] = {}
        self._declared_rates: dict[str, float] = {}
        #: Per device, its identity from the prepare answer (None: a destination
        #: daemon of a protocol before identities).
        self._identities: dict[str, Identity] | None = None
        self._token: str | None = None
        self.version: int | None = None
        self.channel: SourceChannel | None = None
        self._nursery: trio.Nursery | None = None
        self._channel_done = trio.Event()
        #: Why the channel is gone (None while it is up, or before it opened).
        self.failure: str | None = None
        self._voted = trio.Event()
        #: The destination refused a step of its budget share.
        self._over_budget: p.OverBudget | None = None
        #: Each device's initial data, in bytes, as announced (InitialSent).
        self._initial: dict[str, int] = {}
        #: Set while a device's announcement stands (not since its initial data came back).
        self._announced = {name: trio.Event() for name in self.names}
        self._completed: p.Completed | None = None
        self._rolled_back: p.RolledBack | None = None
        #: The destination cannot be reached after the commit: the outcome waits on it.
        self.in_doubt = False
        self._vcpus: dict[str, Any] = {}
        #: Messages the machine sent, not yet carried to the destination.
        self._outbox: list[p.Message] = []
        self._flushing = trio.Lock()
        #: Set and replaced on every report and on the channel's loss: wakes waiters.
        self._news = trio.Event()
        self._prepare_sent = False
        self._last_post_reached = False
        self._given_up = False

    # -- REST ------------------------------------------------------------------------

    def _client(self, timeout: float | None = None) -> httpx.AsyncClient:
        if self._token is None:
            self._token = destination_token(self.spec)
        verify: ssl.SSLContext | bool = True
        if self.tls is not None:
            verify = ssl.create_default_context(cafile=str(self.tls.ca_file))
        elif self.spec.ca_file is not None:
            # Deprecated (the settings' [tls] ca_file replaces it); warned of at submit.
            verify = ssl.create_default_context(cafile=str(self.spec.ca_file))
        return httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self._token}"},
            # Well inside the deadline of the step it serves, so that an
            # unreachable destination is told apart from a slow one.
            timeout=timeout or self.plan.timeouts.device_call_s / 3,
            verify=verify,
        )

    def _data_tls(self, required: bool) -> TlsPeer | None:
        """How the data channel is secured, as both ends' settings agree; PeerError
        (before anything changes) when they do not."""
        if required and self.tls is None:
            raise PeerError(
                "the destination daemon's data channel requires TLS, and this daemon has no "
                "[tls] identity (cert_file, key_file, ca_file)"
            )
        if self.tls is None:
            return None
        if not required:
            raise PeerError(
                "the destination daemon's data channel is not encrypted, and this daemon has a "
                "[tls] identity: device state will not cross the network in cleartext (set "
                "[tls] on the destination)"
            )
        hostname = urlsplit(self.base_url).hostname
        assert hostname is not None  # a validated URL
        try:
            return TlsPeer(self.tls.client_context(), hostname)
        except (OSError, ssl.SSLError) as exc:  # a rotation half done
            raise PeerError(f"cannot load this daemon's [tls] identity: {exc}") from None

    async def _request(
        self, method: str, path: str, *, http_timeout_s: float | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        try:
            async with self._client(http_timeout_s) as client:
                response = await client.request(method, path, **kwargs)
        except (httpx.HTTPError, OSError) as exc:  # OSError: a CA file that does not load
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
                        Problem(f"destination daemon: {pr.get('path', '')}", pr.get("message", ""))
                        for pr in problems
                    ]
                )
            raise PeerError(
                f"the destination daemon refused {method} {path} "
                f"({response.status_code}): {error.get('message', body)}"
            )
        if not isinstance(body, dict):
            raise PeerError(f"the destination daemon answered {method} {path} with {body!r}")
        return body

    # -- opening -----------------------------------------------------------------------

    async def open(self, *, check: bool = True) -> Mapping[str, Capabilities]:
        if not check:
            return await self._recovered_capabilities()
        if self.tls is not None and urlsplit(self.base_url).scheme != "https":
            # The bearer token and the migration's secret would cross in cleartext.
            raise self.ctx.abort(
                "plan_error",
                f"destination.url {self.base_url!r} is not https, and this daemon has a [tls] "
                "identity: the prepare call carries the migration's secret",
            )
        # The plan without what only this side reads (accept_differences: the source
        # compares), so that a destination predating a field is still asked.
        local_only: dict[str, Any] = {
            "destination": True,
            "devices": {"__all__": {"accept_differences"}},
        }
        plan = self.plan.model_dump(mode="json", exclude=local_only)
        request = {
            "migration_id": self.id,
            "plan": plan,
            "protocol": [min(PROTOCOL_VERSIONS), max(PROTOCOL_VERSIONS)],
            "source": {"api": self.contact.api, "token": self.contact.token},
        }
        self._prepare_sent = True
        try:
            body = await self._request(
                "POST", "/v1/incoming", json=request, http_timeout_s=self.plan.timeouts.prepare_s
            )
            capabilities = self._prepared(body)
        except PlanError as exc:
            message = f"the destination daemon refused the plan: {exc}"
            raise self.ctx.abort("plan_error", message) from None
        except PeerError as exc:
            message = f"the destination daemon did not prepare: {exc}"
            raise self.ctx.abort("peer_error", message) from None
        self._feed(p.PrepareAnswered())
        return capabilities

    def _prepared(self, body: Mapping[str, Any]) -> dict[str, Capabilities]:
        try:
            data = body["data"]
            host = data.get("host") or urlsplit(self.base_url).hostname
            self._data = (str(host), int(data["port"]))
            self._tls_peer = self._data_tls(bool(data.get("tls", False)))
            self._secret = bytes.fromhex(body["secret"])
            self.version = int(body["protocol"])
            capabilities = {
                name: capabilities_from_json(info["capabilities"])
                for name, info in body["devices"].items()
            }
            self._declared_arcs = {
                name: _arcs(info.get("arcs_ms")) for name, info in body["devices"].items()
            }
            self._history_arcs = {
                name: _arcs(info.get("history_arcs_ms")) for name, info in body["devices"].items()
            }
            self._declared_rates = {
                name: float(info["rate_bytes_s"])
                for name, info in body["devices"].items()
                if info.get("rate_bytes_s") is not None
            }
            if int(body["protocol"]) >= IDENTITIES_VERSION:
                self._identities = {
                    name: Identity.from_json(info["identity"])
                    for name, info in body["devices"].items()
                    if info["identity"] is not None
                }
        except (KeyError, TypeError, ValueError) as exc:
            raise PeerError(
                f"the destination daemon's prepare answer is malformed: {exc}"
            ) from None
        if self.version not in PROTOCOL_VERSIONS:
            raise PeerError(f"the destination daemon chose protocol {self.version}, not offered")
        missing = sorted(set(self.names) - set(capabilities))
        if missing:
            raise PeerError(f"the destination daemon did not prepare {', '.join(missing)}")
        return capabilities

    def identities(self) -> Mapping[str, Identity] | None:
        return self._identities

    def declared_arc_s(self, name: str, source: DeviceState, target: DeviceState) -> float | None:
        return self._declared_arcs.get(name, {}).get((source, target))

    def declared_rate_bytes_s(self, name: str) -> float | None:
        return self._declared_rates.get(name)

    def history_arc_s(self, name: str, source: DeviceState, target: DeviceState) -> float | None:
        return self._history_arcs.get(name, {}).get((source, target))

    async def _recovered_capabilities(self) -> dict[str, Capabilities]:
        """After this daemon restarted: nothing asked of the destination (readiness
        never waits on a peer); the coordinator takes the source's capabilities for
        its view of the destination's devices (their P2P states must agree anyway)."""
        await trio.lowlevel.checkpoint()
        return {}

    async def adopt(self) -> None:
        # The destination's devices are its own to recover; this side learns of
        # them through the protocol (the commit delivered again, or the abort).
        return None

    # -- the channel ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
                self._nursery = None

    async def begin(self) -> None:
        assert self._nursery is not None, "begin() inside session()"
        opening = trio.current_time()
        self.channel = await self._nursery.start(self._run_channel)
        # Each connection's handshake is a challenge and an answer, in parallel:
        # about two round trips.
        self.rtt_s = (trio.current_time() - opening) / 2
        await self._flush()  # the machine's Begin
        for name, link in self._links.items():
            await link.transfer.wait()
            if link.failure is not None:
                raise self._device_failure(name, link.failure)

    async def _run_channel(self, *, task_status: trio.TaskStatus[SourceChannel]) -> None:
        assert self._data is not None and self._secret is not None, "open() first"
        try:
            async with open_channel(
                self._data,
                self.id,
                self._secret,
                self.names,
                parallel_connections=self.plan.parallel_connections,
                limiter=self._limiter,
                connect_timeout_s=self.plan.timeouts.device_call_s,
                tls=self._tls_peer,
            ) as channel:
                task_status.started(channel)
                await self._read(channel)
        except PeerError as exc:
            if self.channel is None:
                raise  # begin() fails: the channel never opened
            self._lost(str(exc))
        finally:
            # Closed with its block: every message from now on goes over REST.
            self._lost("the data channel is closed")

    async def _read(self, channel: SourceChannel) -> None:
        while True:
            try:
                data = await channel.receive_control()
            except PeerError as exc:
                self._lost(str(exc))
                return
            try:
                message = decode(data)
            except ProtocolViolation as exc:
                self._lost(f"the destination sent a malformed message: {exc}")
                await channel.abort(str(exc))
                return
            self._feed(message)
            if self._outbox:
                self._nursery_or_none_flush()

    def _lost(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason or "the data channel was lost"
        self.log.info("remote.channel_lost", reason=self.failure)
        self._feed(p.LinkLost(self.failure))
        self._wake(self.failure)
        self._notify()

    def _nursery_or_none_flush(self) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._flush)

    async def _news_or(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._news.wait()

    def _notify(self) -> None:
        self._news.set()
        self._news = trio.Event()

    def _wake(self, reason: str) -> None:
        """Every waiter for the destination wakes and finds this failure."""
        info = self._info(None, f"the destination daemon: {reason}")
        for link in self._links.values():
            link.fail(info)
        self._voted.set()

    # -- the protocol machine ------------------------------------------------------------

    def _feed(self, event: p.Event, replies: list[p.Message] | None = None) -> p.Step:
        step = self.machine.handle(event)
        if step.verdict == "refused":
            self.log.warning("remote.refused", received=type(event).__name__, reason=step.reason)
        for action in step.actions:
            self._act(action, replies)
        return step

    def _act(self, action: p.Action, replies: list[p.Message] | None) -> None:
        if isinstance(action, p.Send):
            self._outbox.append(action.message)
            if self._nursery is not None and self.channel is not None:
                self._nursery.start_soon(self._flush)
        elif isinstance(action, p.Reply):
            if replies is not None:
                replies.append(action.message)
        elif isinstance(action, p.Deliver):
            self._deliver(action.message)
        elif action is p.Do.ROLL_BACK:
            self._wake(f"aborted: {self.machine.state.value}")
        # RECORD_COMMIT, COMPLETE_SOURCE and RecordOutcome are the coordinator's and
        # the service's, which take those steps themselves.

    async def _flush(self) -> None:
        """Send what the machine sent, in order, one flusher at a time.  A message
        leaves the outbox once sent: one cut short is sent again (the peer's machine
        takes a duplicate as one)."""
        async with self._flushing:
            while self._outbox:
                await self._send(self._outbox[0])
                self._outbox.pop(0)

    def _deliver(self, message: p.Message) -> None:
        if isinstance(message, p.ArcReport):
            self._arc(message)
        elif isinstance(message, p.Loaded):
            self._links[message.device].loaded = True
        elif isinstance(message, p.LoadFailed):
            self._links[message.device].fail(message.error)
        elif isinstance(message, p.OverBudget):
            if self._over_budget is None:
                self._over_budget = message
                self._wake("over its share of the downtime budget")
        elif isinstance(message, p.Vote):
            self._voted.set()
        elif isinstance(message, p.VcpusReport):
            self._vcpus_reported(message)
        elif isinstance(message, p.Completed):
            self._completed = message
            self.completed_outcome = message.outcome
        elif isinstance(message, p.RolledBack):
            self._rolled_back = message
        self._notify()

    def _arc(self, report: p.ArcReport) -> None:
        name = report.device
        link = self._links.get(name)
        flow = self.driver.flow
        if link is None or flow is None:
            self._lost(f"an arc report for unknown device {name!r}")
            return
        try:
            self.driver.reported_arc(
                DESTINATION,
                name,
                report.from_state,
                report.to_state,
                ok=report.ok,
                now=report.state,
                duration_s=report.duration_s,
            )
        except ProtocolViolation as exc:
            # A report the invariants forbid: this side will not go on with it.
            link.fail(self.ctx.keep(self._info(name, f"{exc}")))
            self._lost(f"the destination reported an arc the flow forbids: {exc}")
            return
        if not report.ok:
            error = report.error or self._info(name, "the arc failed")
            link.fail(error)
            return
        route = flow.endpoint(DESTINATION, name).route
        if report.to_state is route.transfer:
            link.transfer.set()
        if link.loaded and report.to_state is (route.grace or route.settle):
            link.ready.set()

    def _vcpus_reported(self, report: p.VcpusReport) -> None:
        """The destination's vCPU call, in this side's trace as it is learned of."""
        trace = self.ctx.trace
        detail = {"action": report.action, "reported": True}
        trace.emit("vmm_begin", DESTINATION, detail=detail)
        if report.ok:
            trace.emit("vmm_end", DESTINATION, detail={**detail, "status": report.status})
            self._vcpus = {
                "resume_ms": round(report.duration_s * 1000, 3),
                "status": report.status,
            }
        else:
            error = report.error.message if report.error else "failed"
            trace.emit("vmm_failed", DESTINATION, detail={**detail, "error": error})

    async def _send(self, message: p.Message) -> None:
        """Over the channel while it is up, else over REST; replies are fed back."""
        channel = self.channel
        if channel is not None and self.failure is None:
            try:
                await channel.send_control(encode(message), wait=True)
            except PeerError as exc:
                self._lost(str(exc))
            else:
                return
        await self._post(message)

    async def _post(self, message: p.Message) -> bool:
        """One REST delivery; the destination's replies are fed.  False if it failed."""
        try:
            body = await self._request(
                "POST", f"/v1/incoming/{self.id}/messages", json=encode(message)
            )
            replies = [decode(r) for r in body.get("replies", [])]
        except (PeerError, PlanError, ProtocolViolation) as exc:
            self.log.info("remote.post_failed", op=message.OP, error=str(exc))
            self._last_post_reached = False
            return False
        self._last_post_reached = True
        for reply in replies:
            self._feed(reply)
        return True

    def _info(self, device: str | None, message: str) -> ErrorInfo:
        return self.ctx.info("peer_error", message, side=DESTINATION, device=device)

    def _restart_steps(self) -> None:
        """After a restart: the first steps the journal called for (the commit to
        deliver again, or the abort), once the coordinator goes on."""
        if self._first is not None:
            first, self._first = self._first, None
            for action in first.actions:
                self._act(action, None)

    def _device_failure(self, name: str, info: ErrorInfo) -> DeviceFailure:
        self.ctx.keep(info)
        return DeviceFailure(info)

    # -- the transfer ---------------------------------------------------------------------

    def stream(self, name: str) -> StreamSender:
        assert self.channel is not None
        return _KeepChannel(self.channel.sender(name))

    def orders_devices(self) -> bool:
        # A destination daemon before protocol 3 runs every device at once after the
        # commit: a device without P2P could be stopped while its peers run.
        return self.version is not None and self.version >= ORDERED_VERSION

    def grant(self, share: Share) -> bool:
        if self.version is None or self.version < 2:
            return False  # a daemon of protocol 1 knows no share: the source's checks guard it
        self._outbox.append(p.Budget(share.left_s, share.settle_s))
        self._nursery_or_none_flush()
        return True

    def _refused_step(self) -> None:
        over = self._over_budget
        if over is not None:
            raise OverBudget(
                step=over.step,
                device=over.device,
                elapsed_s=over.elapsed_s,
                need_s=over.need_s,
                left_s=over.left_s,
            )

    async def loaded(self, name: str) -> None:
        link = self._links[name]
        await link.ready.wait()
        self._refused_step()
        if link.failure is not None:
            raise self._device_failure(name, link.failure)

    async def initial_sent(self, name: str, nbytes: int) -> None:
        assert self.channel is not None
        self._initial[name] = nbytes
        self._announced[name].set()
        # Sent again when new initial data came back: the destination answers
        # each with an ACK once that much is loaded.
        await self.channel.send_control(encode(p.InitialSent(name, nbytes)))

    def initial_back(self, name: str) -> None:
        if self._announced[name].is_set():
            self._announced[name] = trio.Event()

    def unacknowledged_bytes(self) -> dict[str, int]:
        # At most: how much of it the destination still loads, this side cannot
        # tell (the model counts no more than the last piece read).
        channel = self.channel
        if channel is None:
            return {}
        return {
            n: b for n, b in self._initial.items() if not channel.is_acknowledged(n, at_least=b)
        }

    async def acknowledged(self) -> None:
        channel = self.channel
        assert channel is not None
        # Every device's latest announcement, acknowledged: an ACK of less (the
        # initial data before it came back) does not count.  A device not yet
        # announced is announced once the decision is taken (a round cut short).
        for name in channel.devices:
            await self._announced[name].wait()
            await channel.acknowledged(name, at_least=self._initial[name])

    def in_flight_bytes(self) -> int:
        return self.channel.in_flight_bytes() if self.channel is not None else 0

    async def vote(self) -> None:
        await self._voted.wait()
        self._refused_step()
        if self.machine.state is not p.SourceState.VOTED:
            reason = self.failure or f"the destination did not vote ({self.machine.state.value})"
            raise self._device_failure(
                self.names[0], self._info(None, f"the destination daemon: {reason}")
            )

    # -- the decision -----------------------------------------------------------------------

    def deciding(self) -> bool:
        return self._feed(p.Deciding()).verdict == "accepted"

    def committed(self) -> None:
        self._feed(p.CommitRecorded())

    def commit_failed(self, reason: str) -> None:
        self._feed(p.CommitRecordFailed(reason))

    async def commit(self) -> Completion:
        """Wait for the destination's ``Completed``; once the channel is gone, deliver
        the commit again over REST, with backoff, until it answers how it ended."""
        self._restart_steps()
        await self._flush()
        delays = backoff()
        while self._completed is None:
            if self._given_up:
                raise LeftInDoubt(
                    f"migration {self.id}: the destination daemon {self.base_url} did not "
                    "say how it ended; the restart asks again"
                )
            if self.failure is None and self.channel is not None:
                # The channel carries the answer.  One lost on the way (a
                # destination whose last message never left) is asked for over
                # REST after a quiet while: a commit is idempotent there, and
                # answered with how it ended once it has.
                with trio.move_on_after(QUIET_S) as quiet:
                    await self._news.wait()
                if quiet.cancelled_caught and self._completed is None:
                    await self._post(p.Commit())
                continue
            reached = await self._post(p.Commit())
            self.in_doubt = not reached
            if self._completed is not None:
                break
            if reached:
                # The destination runs its devices: its answer will say so.
                await self._news_or(FIRST_S)
                continue
            delay = next(delays)
            self.log.warning("remote.in_doubt", retry_s=delay)
            await self._news_or(delay)  # an operator may settle it meanwhile
        self.in_doubt = False
        completed = self._completed
        errors = list(completed.errors)
        if completed.outcome != "succeeded" and not errors:
            errors.append(
                ErrorInfo(
                    kind="peer_error",
                    message=f"the destination ended {completed.outcome}",
                    phase=self.ctx.phase,
                    side="destination",
                )
            )
        return Completion(errors)

    async def abort(self, reason: str) -> list[ErrorInfo]:
        """Tell the destination to reset what moved; what it says failed.  Unconfirmed
        (it cannot be reached) is a note: before its vote it resets by itself, after it
        it asks this daemon, which answers abort."""
        if self.machine.state is p.SourceState.DONE or not (self._prepare_sent or self._recovering):
            return []
        self._restart_steps()
        answered = self.machine.state is not p.SourceState.PREPARING or self._recovering
        if self.machine.state is not p.SourceState.ABORTING:
            self._feed(p.LocalFailure(reason))
        if self.channel is None:
            # Refused before begin() (an identity or budget check after the prepare):
            # the destination never began, so its Begin is not sent after all, or it
            # would walk its devices to RESUMING only to reset them.
            self._outbox = [m for m in self._outbox if not isinstance(m, p.Begin)]
        reached = True
        if self.failure is not None or self.channel is None:
            sent = len(self._outbox)
            await self._flush()
            reached = sent == 0 or self._last_post_reached
        if not answered or not reached:
            # Never prepared, or out of reach: nothing to wait for.
            if answered:
                self.notes.append(
                    "the destination's reset not confirmed (out of reach): it resets by "
                    "itself before its vote, and asks this daemon for the decision after it"
                )
            return []
        with trio.move_on_after(self.plan.timeouts.rollback_s / 2):
            delays = backoff()
            while self._rolled_back is None:
                if self.failure is None and self.channel is not None:
                    await self._news.wait()
                    continue
                # Over REST: ask again (the destination repeats its RolledBack
                # once its reset is done), with backoff.
                await self._news_or(next(delays))
                if self._rolled_back is None:
                    await self._post(p.Abort(reason))
        if self._rolled_back is None:
            self.notes.append("the destination's reset not confirmed in time")
            return []
        return list(self._rolled_back.errors)

    async def finish(self, outcome: Outcome) -> None:
        if self.machine.state is p.SourceState.ABORTING:
            self._feed(p.Finished(outcome))  # sends FinalOutcome
        await self._flush()

    async def settle(self, outcome: Outcome, *, force: bool) -> None:
        """An operator says how the destination ended, the migration being in doubt.

        Refused (Unsettled) while the destination can still be asked, unless
        ``force``: its own answer is the one that counts.
        """
        if not self.machine.committed or self._completed is not None:
            raise Unsettled(
                f"migration {self.id!r} is not in doubt: it waits on nothing an operator "
                "could tell it"
            )
        if not force and await self._post(p.Commit()):
            raise Unsettled(
                f"the destination daemon {self.base_url} answers: it says how migration "
                f"{self.id!r} ended by itself (settle --force to overrule it)"
            )
        if self._completed is None:
            self.log.warning("remote.settled", outcome=outcome, force=force)
            self.notes.append(
                f"settled by an operator as {outcome}: the destination was out of reach"
            )
            self._feed(p.Completed(outcome))

    def give_up(self) -> None:
        self._given_up = True
        self._notify()

    def answer_query(self) -> p.DecisionAnswer:
        """The destination asks for the decision (``GET .../decision``)."""
        replies: list[p.Message] = []
        self._feed(p.DecisionQuery(), replies)
        answer = next((r for r in replies if isinstance(r, p.DecisionAnswer)), None)
        return answer or p.DecisionAnswer("pending")

    def vcpus_report(self) -> Mapping[str, Any]:
        return self._vcpus

    async def close(self) -> None:
        return None


class _KeepChannel(StreamSender):
    """A device's stream to the destination daemon whose early close leaves the
    channel up: a rollback still needs it to reach the destination."""

    def __init__(self, sender: StreamSender) -> None:
        self._sender = sender

    @property
    def pumps(self) -> bool:  # type: ignore[override]
        return self._sender.pumps

    @property
    def bytes_sent(self) -> int:  # type: ignore[override]
        return self._sender.bytes_sent

    def start_pump(
        self, reader: BlockingReader, *, limit: int | None = None, end: bool = False
    ) -> Transfer:
        return self._sender.start_pump(reader, limit=limit, end=end)

    @property
    def ended(self) -> bool:  # type: ignore[override]
        return self._sender.ended

    async def send(self, chunk: bytes) -> None:
        await self._sender.send(chunk)

    async def flush(self) -> None:
        await self._sender.flush()

    async def end(self) -> None:
        await self._sender.end()

    async def aclose(self) -> None:
        return None

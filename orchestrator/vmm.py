"""The VMM beside the orchestrator: pausing and resuming a VM's vCPUs.

In production the VMM (QEMU, cloud-hypervisor) owns the vCPUs; only it can
stop them.  A plan's ``[vmm]`` section names, for each side, how to reach
it (``orchestrator.plan.VmmEndpoint``), and ``open_vmm`` builds one of:

* ``QmpVmm``: QEMU's machine protocol over a Unix socket.  It reads the
  greeting, leaves capabilities negotiation with ``qmp_capabilities``, then
  runs commands one at a time, each with its own ``id``: a reply whose id is
  not the one awaited is dropped (the late answer to a call whose deadline
  passed), asynchronous events (``STOP``, ``RESUME``, ...) are skipped
  wherever they come, and an error reply becomes a ``VmmError`` naming the
  command and QMP's error class and description.  The connection opens on
  first use and stays open until ``aclose``: a pause inside the downtime
  window must not pay for a connect and a negotiation.
* ``CommandVmm``: any other VMM, through a command run as
  ``argv + [verb]`` (``pause``, ``resume``, ``status``; see ``VmmEndpoint``).

Both verify what they did: ``pause`` returns only once the VMM reports the
vCPUs stopped (QMP ``query-status``: ``running`` false), ``resume`` only
once it reports them running, and anything else is a ``VmmError``.

Invariants it keeps:

* Every failure is a ``VmmError`` (``VmmTimeout`` for deadlines, which the
  runner sets: like a backend, this module never sleeps on a deadline of its
  own).  The runner alone turns it into a migration failure.
* A read never buffers more than ``MAX_MESSAGE_BYTES`` of one message: a
  VMM that floods the socket fails the call instead of the daemon.
"""

from __future__ import annotations

import abc
import json
import os
from dataclasses import dataclass
from typing import Any, Final

import trio

from orchestrator.errors import OrchestratorError
from orchestrator.plan import VmmEndpoint

#: The largest QMP message read (query-status answers are ~100 bytes; a
#: greeting is under 1 KiB; some events carry a little more).
MAX_MESSAGE_BYTES: Final = 1 << 20
#: Output of a VMM command kept for error messages and ``status``.
MAX_OUTPUT_BYTES: Final = 64 * 1024


class VmmError(OrchestratorError):
    """The VMM refused or failed a call, or could not be reached."""

    status_hint = 502

    def __init__(self, message: str, *, action: str | None = None) -> None:
        self.action = action
        self.message = message
        super().__init__(message)


class VmmTimeout(VmmError):
    """A VMM call did not answer within its deadline."""


@dataclass(frozen=True)
class VcpuStatus:
    """What the VMM says of the VM's vCPUs."""

    running: bool
    #: The VMM's own word for it: QEMU's RunState ("running", "paused",
    #: "prelaunch", "inmigrate", ...) or what a command printed.
    status: str


class Vmm(abc.ABC):
    """One side's VMM, as the runner drives it."""

    def __init__(self, endpoint: VmmEndpoint) -> None:
        self.endpoint = endpoint
        self.description = endpoint.describe()

    @abc.abstractmethod
    async def status(self) -> VcpuStatus:
        """Where the vCPUs stand."""

    @abc.abstractmethod
    async def pause(self) -> VcpuStatus:
        """Stop the vCPUs and check that they stopped."""

    @abc.abstractmethod
    async def resume(self) -> VcpuStatus:
        """Start the vCPUs and check that they run."""

    async def aclose(self) -> None:  # noqa: B027 - a command holds nothing open
        """Release the connection, if any.  Safe to call more than once."""


def open_vmm(endpoint: VmmEndpoint) -> Vmm:
    """The VMM an endpoint names; nothing is connected or run yet."""
    if endpoint.qmp is not None:
        return QmpVmm(endpoint)
    return CommandVmm(endpoint)


# -- QMP ---------------------------------------------------------------------------


class QmpVmm(Vmm):
    """QEMU over QMP; see the module docstring."""

    def __init__(self, endpoint: VmmEndpoint) -> None:
        super().__init__(endpoint)
        assert endpoint.qmp is not None
        self.path = endpoint.qmp
        self.greeting: dict[str, Any] | None = None
        self._stream: trio.SocketStream | None = None
        self._buffer = bytearray()
        self._next_id = 0
        self._lock = trio.Lock()

    async def status(self) -> VcpuStatus:
        return await self._query_status("query-status")

    async def pause(self) -> VcpuStatus:
        await self.execute("stop")
        status = await self._query_status("stop")
        if status.running:
            raise VmmError(
                f"QMP stop returned but query-status still says running (status "
                f"{status.status!r}) on {self.path}",
                action="pause",
            )
        return status

    async def resume(self) -> VcpuStatus:
        await self.execute("cont")
        status = await self._query_status("cont")
        if not status.running:
            raise VmmError(
                f"QMP cont returned but query-status says not running (status "
                f"{status.status!r}) on {self.path}",
                action="resume",
            )
        return status

    async def _query_status(self, after: str) -> VcpuStatus:
        answer = await self.execute("query-status")
        running, status = (
            (answer.get("running"), answer.get("status")) if isinstance(answer, dict) else (0, 0)
        )
        if not isinstance(running, bool) or not isinstance(status, str):
            raise VmmError(
                f"query-status (after {after}) answered {_clip(answer)}: no boolean "
                f"'running' and string 'status' in it ({self.path})"
            )
        return VcpuStatus(running=running, status=status)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command and return its ``return`` value."""
        async with self._lock:
            stream = await self._connected()
            return await self._execute(stream, command, arguments)

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        self._buffer.clear()
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _connected(self) -> trio.SocketStream:
        if self._stream is not None:
            return self._stream
        try:
            stream = await trio.open_unix_socket(os.fspath(self.path))
        except OSError as exc:
            raise VmmError(
                f"cannot connect to the QMP socket {self.path}: {exc.strerror or exc}",
                action="connect",
            ) from None
        self._buffer.clear()
        try:
            await self._negotiate(stream)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        self._stream = stream
        return stream

    async def _negotiate(self, stream: trio.SocketStream) -> None:
        """The greeting, then out of capabilities negotiation into command mode."""
        greeting = await self._receive(stream, "the greeting")
        if not isinstance(greeting.get("QMP"), dict):
            raise VmmError(
                f"{self.path} is not a QMP monitor: its first message was {_clip(greeting)}",
                action="connect",
            )
        self.greeting = greeting["QMP"]
        await self._execute(stream, "qmp_capabilities", None)

    async def _execute(
        self, stream: trio.SocketStream, command: str, arguments: dict[str, Any] | None
    ) -> Any:
        self._next_id += 1
        call_id = f"orchestrator-{self._next_id}"
        request: dict[str, Any] = {"execute": command, "id": call_id}
        if arguments:
            request["arguments"] = arguments
        ok = False  # the stream is in step with QEMU again
        try:
            try:
                await stream.send_all(json.dumps(request).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise VmmError(
                    f"QMP {command}: the connection to {self.path} broke: {exc}"
                ) from None
            while True:
                message = await self._receive(stream, f"the answer to {command}")
                if "event" in message:
                    continue  # asynchronous events may come at any time
                if "id" not in message and "error" in message:
                    # QEMU could not read our request far enough to find its id.
                    raise self._error(command, message["error"])
                if message.get("id") != call_id:
                    continue  # the late answer to a call whose deadline passed
                if "error" in message:
                    ok = True  # a refusal: the connection is still in step
                    raise self._error(command, message["error"])
                if "return" not in message:
                    raise VmmError(
                        f"QMP {command}: an answer with neither return nor error: "
                        f"{_clip(message)} ({self.path})"
                    )
                ok = True
                return message["return"]
        finally:
            if not ok:
                # A cancelled or failed call leaves the stream mid-message or
                # the monitor's state unknown: start over on the next call.
                await self._drop(stream)

    async def _drop(self, stream: trio.SocketStream) -> None:
        if self._stream is stream:
            self._stream = None
        self._buffer.clear()
        with trio.CancelScope(shield=True):
            await stream.aclose()

    def _error(self, command: str, error: Any) -> VmmError:
        if isinstance(error, dict):
            cls, desc = error.get("class", "?"), error.get("desc", "?")
            return VmmError(f"QMP {command} failed: {cls}: {desc} ({self.path})")
        return VmmError(f"QMP {command} failed: {_clip(error)} ({self.path})")

    async def _receive(self, stream: trio.SocketStream, what: str) -> dict[str, Any]:
        """The next JSON object (QEMU ends each with CRLF)."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end]).strip()
                del self._buffer[: end + 1]
                if not line:
                    continue
                try:
                    message = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise VmmError(
                        f"{self.path} sent something that is not JSON while waiting for "
                        f"{what}: {line[:200]!r}"
                    ) from None
                if not isinstance(message, dict):
                    raise VmmError(f"{self.path} sent {_clip(message)}, not a JSON object")
                return message
            if len(self._buffer) > MAX_MESSAGE_BYTES:
                raise VmmError(
                    f"{self.path} sent over {MAX_MESSAGE_BYTES} bytes without a line end "
                    f"while waiting for {what}"
                )
            try:
                chunk = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise VmmError(f"the QMP connection {self.path} broke: {exc}") from None
            if not chunk:
                raise VmmError(
                    f"the VMM closed the QMP connection {self.path} while waiting for {what}"
                )
            self._buffer += chunk


# -- a command ------------------------------------------------------------------------


class CommandVmm(Vmm):
    """Any VMM, through ``argv + [verb]``; see ``VmmEndpoint``."""

    def __init__(self, endpoint: VmmEndpoint) -> None:
        super().__init__(endpoint)
        assert endpoint.command is not None
        self.argv = list(endpoint.command)

    async def status(self) -> VcpuStatus:
        out = await self._run("status")
        return _parse_status(out, self.argv)

    async def pause(self) -> VcpuStatus:
        await self._run("pause")
        status = await self.status()
        if status.running:
            raise VmmError(
                f"{self._name('pause')} exited 0 but {self._name('status')} still says "
                f"{status.status!r}",
                action="pause",
            )
        return status

    async def resume(self) -> VcpuStatus:
        await self._run("resume")
        status = await self.status()
        if not status.running:
            raise VmmError(
                f"{self._name('resume')} exited 0 but {self._name('status')} says "
                f"{status.status!r}",
                action="resume",
            )
        return status

    def _name(self, verb: str) -> str:
        return " ".join([*self.argv, verb])

    async def _run(self, verb: str) -> str:
        try:
            # Cancelled (the runner's deadline): trio kills the process.
            done = await trio.run_process(
                [*self.argv, verb],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                stdin=b"",
            )
        except OSError as exc:
            raise VmmError(
                f"cannot run {self._name(verb)!r}: {exc.strerror or exc}", action=verb
            ) from None
        stdout = done.stdout[:MAX_OUTPUT_BYTES].decode("utf-8", "replace")
        if done.returncode != 0:
            stderr = done.stderr[-MAX_OUTPUT_BYTES:].decode("utf-8", "replace").strip()
            last = stderr.splitlines()[-1] if stderr else "no message on stderr"
            how = (
                f"was killed by signal {-done.returncode}"
                if done.returncode < 0
                else f"exited {done.returncode}"
            )
            raise VmmError(f"{self._name(verb)!r} {how}: {last}", action=verb)
        return stdout


def _parse_status(out: str, argv: list[str]) -> VcpuStatus:
    text = out.strip()
    word: Any = None
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            word = data.get("state", data.get("status"))
    elif text:
        word = text.split()[0]
    if not isinstance(word, str) or not word:
        raise VmmError(
            f"{' '.join([*argv, 'status'])!r} printed {text[:200]!r}: expected a word such as "
            "'running' or 'paused', or a JSON object with a 'state' member",
            action="status",
        )
    return VcpuStatus(running=word.lower() == "running", status=word)


def _clip(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:200] + "..."

"""The orchestrator's error hierarchy.

Three families, by whose fault it is (the h11 split of local and remote
protocol errors, widened to the parties a migration has):

* ``PlanError``: the input was wrong: a plan that cannot succeed, a field out
  of range, a request the state model forbids.  Nothing was changed.  The
  REST layer maps it to a 4xx.
* ``DeviceError``: a device (the hardware, the kernel driver, or the
  simulator standing in for them) refused or failed an operation.  Only
  backends raise it; only the runner turns it into a migration failure.
* ``PeerError``: the other host said no or went away.

``ProtocolViolation`` is a bug guard: the runner asked the pure flow for a
step its invariants forbid (for example a source device stopping before the
P2P barrier was met).  It must never reach a user in a correct build.
"""

from __future__ import annotations

from dataclasses import dataclass


class OrchestratorError(Exception):
    """Base class of every error the orchestrator raises on purpose."""

    #: HTTP status the REST layer uses for this error family.
    status_hint: int = 500


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input, located by its field path."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class PlanError(OrchestratorError):
    """The input cannot succeed; carries every problem found, not just the first."""

    status_hint = 422

    def __init__(self, problems: list[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        self.problems: list[Problem] = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


class TransitionError(PlanError):
    """A state change the migration state model does not allow."""

    status_hint = 409


class DeviceError(OrchestratorError):
    """A device refused or failed an operation.

    ``operation`` names what was attempted (``set_state``, ``read``, an ioctl
    name, ...), ``target`` the state asked for where there was one, and
    ``errno`` the kernel's answer where there was one.
    """

    status_hint = 502

    def __init__(
        self,
        message: str,
        *,
        device: str | None = None,
        operation: str | None = None,
        target: str | None = None,
        errno: int | None = None,
    ) -> None:
        self.device = device
        self.operation = operation
        self.target = target
        self.errno = errno
        self.message = message
        super().__init__(self._describe())

    def _describe(self) -> str:
        parts = []
        if self.device:
            parts.append(f"device {self.device!r}")
        if self.operation:
            parts.append(self.operation)
        if self.target:
            parts.append(f"to {self.target}")
        where = " ".join(parts)
        tail = f" (errno {self.errno})" if self.errno is not None else ""
        return f"{where}: {self.message}{tail}" if where else f"{self.message}{tail}"


class DeviceTimeout(DeviceError):
    """A device call did not answer within its deadline."""


class PeerError(OrchestratorError):
    """The other host refused a step or went away."""

    status_hint = 502


class PeerAuthError(PeerError):
    """A data-channel peer could not prove it holds the migration's secret."""


class PeerProtocolError(PeerError):
    """The peer sent the data channel something its protocol forbids.

    A corrupted, unknown, out-of-order or duplicated frame: the channel is
    failed as a whole and nothing after the bad frame reaches a device.
    ``device`` and ``seq`` locate the frame where they are known.
    """

    def __init__(
        self,
        problem: str,
        *,
        device: str | None = None,
        seq: int | None = None,
        connection: int | None = None,
    ) -> None:
        self.problem = problem
        self.device = device
        self.seq = seq
        self.connection = connection
        where = []
        if device is not None:
            where.append(f"device {device!r}")
        if seq is not None:
            where.append(f"frame {seq}")
        if connection is not None:
            where.append(f"on connection {connection}")
        super().__init__(f"{' '.join(where)}: {problem}" if where else problem)


class ProtocolViolation(OrchestratorError):
    """The runner asked the pure flow for a step its invariants forbid (a bug)."""

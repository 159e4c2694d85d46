"""A small synchronous client of the REST API, for the CLI's submit, status, watch, cancel,
set and switchover.

It reaches the daemon over its Unix socket by default, or over TCP (``url``),
and sends the bearer token on every request.  It raises two errors, which
the CLI turns into exit statuses:

* ``Unreachable``: no answer at all (no socket, connection refused, TLS
  failure, timeout, a connection cut short);
* ``ApiError``: an HTTP error, with the error body's kind, message and
  problems (or the raw text when the body is not ours, say from a proxy).
"""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from orchestrator import __version__
from orchestrator.errors import Problem
from orchestrator.status import DeviceStatus, MigrationList, MigrationStatus

from .models import MigrationEvent

#: Connecting and each answer but the event stream, which may be quiet for long.
DEFAULT_TIMEOUT_S = 30.0


class Unreachable(Exception):
    """The daemon did not answer."""


class ApiError(Exception):
    """The daemon answered with an HTTP error."""

    def __init__(
        self, status: int, kind: str, message: str, problems: list[Problem] | None = None
    ) -> None:
        self.status = status
        self.kind = kind
        self.message = message
        self.problems = problems or []
        super().__init__(f"{status} {kind}: {message}")


@dataclass
class ServerSentEvent:
    id: str | None = None
    event: str = "message"
    data_lines: list[str] = field(default_factory=list)

    @property
    def data(self) -> str:
        return "\n".join(self.data_lines)


def parse_sse(lines: Iterator[str]) -> Iterator[ServerSentEvent]:
    """Events from the lines of a text/event-stream (the WHATWG rules we need)."""
    event = ServerSentEvent()
    for line in lines:
        if not line:
            if event.data_lines:
                yield event
            event = ServerSentEvent()
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            event.id = value
        elif name == "event":
            event.event = value
        elif name == "data":
            event.data_lines.append(value)
    if event.data_lines:
        yield event


class Client:
    """The API at ``url`` (TCP), else on the Unix socket ``socket_path``."""

    def __init__(
        self,
        *,
        token: str,
        socket_path: Path | None = None,
        url: str | None = None,
        cacert: Path | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if url is None and socket_path is None:
            raise ValueError("a Client needs a url or a socket_path")
        headers = {
            "authorization": f"Bearer {token}",
            "user-agent": f"orchestrator-cli/{__version__}",
        }
        self._timeout = httpx.Timeout(timeout_s)
        if url is not None:
            self.where = url
            verify: ssl.SSLContext | bool = True
            if cacert is not None:
                verify = ssl.create_default_context(cafile=cacert)
            self._http = httpx.Client(
                base_url=url, headers=headers, verify=verify, timeout=self._timeout
            )
        else:
            assert socket_path is not None
            self.where = f"unix:{socket_path}"
            self._http = httpx.Client(
                base_url="http://orchestrator",
                headers=headers,
                transport=httpx.HTTPTransport(uds=str(socket_path)),
                timeout=self._timeout,
            )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- requests --------------------------------------------------------------

    def submit(self, plan: Any, idempotency_key: str | None = None) -> tuple[MigrationStatus, bool]:
        """POST the plan data; (status, True) when it started a new migration."""
        headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
        response = self._request("POST", "/v1/migrations", json=plan, headers=headers)
        return MigrationStatus.model_validate(response.json()), response.status_code == 201

    def status(self, migration_id: str) -> MigrationStatus:
        response = self._request("GET", f"/v1/migrations/{_quote(migration_id)}")
        return MigrationStatus.model_validate(response.json())

    def page(self, params: Mapping[str, str | int]) -> MigrationList:
        """One page of ``GET /v1/migrations`` (its query: filters, limit, cursor, view)."""
        response = self._request("GET", "/v1/migrations", params=dict(params))
        return MigrationList.model_validate(response.json())

    def devices(self) -> list[DeviceStatus]:
        response = self._request("GET", "/v1/devices")
        return [DeviceStatus.model_validate(d) for d in response.json()]

    def cancel(self, migration_id: str) -> MigrationStatus:
        response = self._request("POST", f"/v1/migrations/{_quote(migration_id)}/cancel")
        return MigrationStatus.model_validate(response.json())

    def control(self, migration_id: str, changes: dict[str, float | None]) -> MigrationStatus:
        """Change the limits of a migration in pre-copy (``None``: remove the cap)."""
        path = f"/v1/migrations/{_quote(migration_id)}"
        response = self._request("PATCH", path, json=changes)
        return MigrationStatus.model_validate(response.json())

    def switchover(self, migration_id: str) -> MigrationStatus:
        """Force the switchover of a migration in pre-copy."""
        response = self._request("POST", f"/v1/migrations/{_quote(migration_id)}/switchover")
        return MigrationStatus.model_validate(response.json())

    def settle(self, migration_id: str, verdict: str, *, force: bool) -> dict[str, Any]:
        """Settle a migration in doubt: ``succeeded``/``failed`` for one this daemon runs
        (its destination out of reach), ``commit``/``abort`` for one it receives."""
        quoted = _quote(migration_id)
        if verdict in ("commit", "abort"):
            path, body = f"/v1/incoming/{quoted}/settle", {"decision": verdict, "force": force}
        else:
            path, body = f"/v1/migrations/{quoted}/settle", {"outcome": verdict, "force": force}
        answer: dict[str, Any] = self._request("POST", path, json=body).json()
        return answer

    def events(self, migration_id: str, after_seq: int = 0) -> Iterator[MigrationEvent]:
        """The migration's events until it ends (the SSE stream, parsed)."""
        headers = {"last-event-id": str(after_seq)} if after_seq else {}
        path = f"/v1/migrations/{_quote(migration_id)}/events"
        # No read timeout: pre-copy can be quiet for a long time between events.
        timeout = httpx.Timeout(self._timeout.connect, read=None)
        try:
            with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _api_error(response)
                for event in parse_sse(response.iter_lines()):
                    yield MigrationEvent.model_validate_json(event.data)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    # -- internals -------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise _api_error(response)
        return response

    def _unreachable(self, exc: httpx.TransportError) -> Unreachable:
        reason = str(exc) or type(exc).__name__
        return Unreachable(f"cannot reach the orchestrator at {self.where}: {reason}")


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _api_error(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        problems = [Problem(p["path"], p["message"]) for p in error.get("problems", [])]
        return ApiError(response.status_code, error["kind"], error["message"], problems)
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:500] or response.reason_phrase
        return ApiError(response.status_code, "http_error", text)

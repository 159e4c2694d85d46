"""The ASGI middlewares that stand before the routes: crash guard, authentication, body limit.

They are plain ASGI (no ``BaseHTTPMiddleware``: it would put every request
through an extra task and a memory stream) and they answer with the same
error body as the routes (``errors.send_error``).  Outermost first:

* ``CrashGuard``: an exception no handler took is logged with its traceback
  and answered with a 500 ``internal_error``; the client never sees the
  traceback and the server keeps serving.
* ``BearerAuth``: every path but the open ones (``/healthz``) needs
  ``Authorization: Bearer <token>``: 401 with ``WWW-Authenticate: Bearer``
  without one, 403 with a token that is in no token file, or whose role does
  not allow the request (``required_role``: a read token reads, a peer token
  reaches the routes another host's daemon calls, an operate token does
  everything).  It runs before any route is matched, so an unauthenticated
  client learns nothing, not even which paths exist, and before the body is
  read.
* ``BodySizeLimit``: a request body over the limit is refused with 413,
  whether it declares its length (refused before a byte is read) or comes
  chunked (refused as soon as the count passes the limit).
"""

from __future__ import annotations

import hmac
import re
import traceback
from collections.abc import Callable, Collection, Sequence

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import send_error

log = structlog.get_logger("orchestrator.api")

OPEN_PATHS = frozenset({"/healthz"})

#: What each role's tokens may do.  ``operate`` covers every route; ``read``
#: the GET routes (statuses, event streams, /metrics); ``peer`` the routes a
#: source daemon calls on its destination, nothing else.
ROLES = ("read", "operate", "peer")
#: The roles whose tokens a request of each required role accepts.
ACCEPTED = {
    "read": frozenset({"read", "operate"}),
    "operate": frozenset({"operate"}),
    "peer": frozenset({"peer", "operate"}),
}
_PEER_PATHS = re.compile(r"/v1/incoming(/[A-Za-z0-9_-]{1,128}/messages)?")


def required_role(method: str, path: str) -> str:
    """The role a request needs: peer for the incoming routes a source daemon posts to,
    read for any other GET (or HEAD), operate for the rest."""
    if method == "POST" and _PEER_PATHS.fullmatch(path):
        return "peer"
    if method in ("GET", "HEAD"):
        return "read"
    return "operate"


class CrashGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            # The traceback as a field, so that the JSON log format carries it too.
            log.error(  # noqa: TRY400
                "api.unhandled_exception",
                method=scope.get("method"),
                path=scope.get("path"),
                error=repr(exc),
                traceback=traceback.format_exc(),
            )
            if started:
                raise  # too late for an answer: let the server drop the connection
            await send_error(
                send, 500, "internal_error", "internal error: the daemon's log has the details"
            )


class BearerAuth:
    """``tokens`` maps each role (``ROLES``) to its tokens.  ``scoped(path,
    credentials)``, when given, may accept a credential that is valid for that one
    path only (a migration's decision credential)."""

    def __init__(
        self,
        app: ASGIApp,
        tokens: dict[str, Sequence[str]],
        open_paths: Collection[str] = OPEN_PATHS,
        scoped: Callable[[str, bytes], bool] | None = None,
    ) -> None:
        if not tokens.get("operate"):
            raise ValueError("BearerAuth needs at least one operate token")
        unknown = set(tokens) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}")
        self.app = app
        self._tokens = tuple(
            (role, token.encode("utf-8")) for role, some in tokens.items() for token in some
        )
        self._open_paths = frozenset(open_paths)
        self._scoped = scoped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open_paths:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        scheme, _, credentials = (header or b"").partition(b" ")
        credentials = credentials.strip()
        if header is None or scheme.lower() != b"bearer" or not credentials:
            what = "no Authorization header" if header is None else "not a Bearer token"
            await send_error(
                send,
                401,
                "unauthorized",
                f"{what}: this API needs 'Authorization: Bearer <token>'",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        path = scope["path"]
        roles = self._roles(credentials)
        if not roles:
            scoped = self._scoped
            if (
                scoped is not None
                and scope["method"] in ("GET", "HEAD")
                and scoped(path, credentials)
            ):
                await self.app(scope, receive, send)
                return
            await send_error(send, 403, "forbidden", "the bearer token is not valid")
            return
        needed = required_role(scope["method"], path)
        if not roles & ACCEPTED[needed]:
            held = ", ".join(sorted(roles))
            await send_error(
                send,
                403,
                "forbidden",
                f"a {held} token may not {scope['method']} {path}: it needs a {needed} token"
                + (" (or an operate one)" if needed != "operate" else ""),
            )
            return
        await self.app(scope, receive, send)

    def _roles(self, credentials: bytes) -> frozenset[str]:
        # Compare with every token, in constant time each, whatever matched.
        found: set[str] = set()
        for role, token in self._tokens:
            if hmac.compare_digest(token, credentials):
                found.add(role)
        return frozenset(found)


class _BodyTooLarge(Exception):
    """Raised into the app from ``receive`` once the body passed the limit."""


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await self._refuse(send)
            return

        received = 0
        started = False
        refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not started and not refused:
                        refused = True
                        await self._refuse(send)
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                # The app's own answer to a body cut short: the 413 went instead.
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            if not refused:
                raise

    async def _refuse(self, send: Send) -> None:
        await send_error(
            send,
            413,
            "body_too_large",
            f"the request body exceeds the limit of {self.max_body_bytes} bytes",
        )

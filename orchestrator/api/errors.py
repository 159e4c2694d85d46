"""Every failure as one JSON error body: ``{"error": {"kind", "message", "problems"}}``.

The mapping from exception to answer lives here and nowhere else (the httpx
practice: translate at the boundary):

* an ``OrchestratorError`` answers with its ``status_hint`` and a kind made
  from its class name (``DeviceBusy`` -> ``device_busy``), and a
  ``PlanError``'s problems with their field paths;
* FastAPI's request validation becomes the same problems: a body error is
  a plan error whose paths are those of ``orchestrator validate``
  (``devices[0].name``), a query or header error keeps where it came from
  (``query.outcome``);
* Starlette's own HTTP errors (404, 405, ...) keep their status and headers;
* the middlewares, which answer before any route is found, use ``send_error``.

Nothing here puts a traceback in an answer: an unexpected exception is
logged with one and answered with ``internal_error`` (``middleware.CrashGuard``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import Send

from orchestrator.errors import OrchestratorError, PlanError, Problem
from orchestrator.plan import problems_from_errors

from .models import error_body

log = structlog.get_logger("orchestrator.api")

#: Kinds of the HTTP errors that have no exception class of ours.
STATUS_KINDS: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    500: "internal_error",
    503: "unavailable",
}


def kind_of_status(status: int) -> str:
    if status in STATUS_KINDS:
        return STATUS_KINDS[status]
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def kind_of_exception(exc: BaseException) -> str:
    """``DeviceBusy`` -> ``device_busy``: the class names are the vocabulary."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def error_response(
    status: int,
    kind: str,
    message: str,
    problems: Iterable[Problem] = (),
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(kind, message, list(problems)), status_code=status, headers=headers
    )


async def send_error(
    send: Send,
    status: int,
    kind: str,
    message: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer at the ASGI level, for the middlewares that stand before the routes."""
    response = error_response(status, kind, message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*response.raw_headers, *headers],
        }
    )
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


def problems_of_request(errors: Iterable[Mapping[str, Any]]) -> tuple[list[Problem], bool]:
    """FastAPI's validation errors as problems; and whether all of them are in the body."""
    problems: list[Problem] = []
    all_in_body = True
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if loc[:1] != ("body",):
            all_in_body = False
            if error.get("type") == "value_error":  # a validator's own words, unprefixed
                error = {**error, "msg": str(error.get("msg", "")).removeprefix("Value error, ")}
            problems.extend(problems_from_errors([error]))
            continue
        rest = loc[1:]
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "not valid JSON")
            where = f" at character {rest[0]}" if rest else ""
            problems.append(Problem("", f"the body is not valid JSON{where}: {reason}"))
        elif error.get("type") == "missing" and not rest:
            problems.append(Problem("", "the request needs a JSON plan as its body"))
        else:
            problems.extend(problems_from_errors([{**error, "loc": rest}]))
    return problems, all_in_body


async def _orchestrator_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OrchestratorError)
    status = exc.status_hint
    problems = exc.problems if isinstance(exc, PlanError) else []
    if status >= 500:
        log.error("api.error", path=request.url.path, kind=kind_of_exception(exc), error=str(exc))
    return error_response(status, kind_of_exception(exc), str(exc), problems)


#: The routes whose body is a plan.
_PLAN_ROUTES = frozenset({"/v1/migrations", "/v1/incoming"})


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems, in_body = problems_of_request(exc.errors())
    # Only these routes take a plan; another body (a change of limits) is a request.
    a_plan = request.url.path in _PLAN_ROUTES
    kind, what = (
        ("plan_error", "invalid plan")
        if in_body and a_plan
        else ("invalid_request", "invalid request")
    )
    message = f"{what}: " + "; ".join(str(p) for p in problems)
    return error_response(422, kind, message, problems)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    if status == 404 and detail == "Not Found":
        detail = f"no route {request.url.path!r}"
    headers = dict(exc.headers or {})
    if status == 405:
        if detail == "Method Not Allowed":
            detail = f"{request.method} is not allowed on {request.url.path!r}"
        # Starlette names the methods of the first route on the path; there may be more.
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return error_response(status, kind_of_status(status), detail, headers=headers)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes on this path (asked of the routes, whatever their nesting)."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OrchestratorError, _orchestrator_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)

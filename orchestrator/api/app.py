"""The REST API: a thin FastAPI shell over ``MigrationService``.

Each route translates one request into one service call and the service's
answer (or its exception, through ``errors``) into JSON; there is no
migration logic here.  Every endpoint is ``async def``: a sync one would run
in a worker thread and triple the tail latency.

Routes (all but ``/healthz`` need a bearer token, see ``middleware``):

    POST /v1/migrations                 a plan in, its MigrationStatus out (201 accepted: it may
                                        still end refused; 200 when the Idempotency-Key
                                        repeats; 422 an invalid plan, nothing recorded)
    GET  /v1/migrations                 filter by ?outcome= (succeeded, refused, rolled_back,
                                        failed) and ?phase=
    GET  /v1/migrations/{id}            report + phase + live progress
    PATCH /v1/migrations/{id}           new downtime limit / bandwidth cap, until the pre-copy
                                        decision (200; 409 after it)
    POST /v1/migrations/{id}/switchover 202: the pre-copy decision is a switchover, now
    POST /v1/migrations/{id}/cancel     202 when it will roll back, 409 past the commit point
    GET  /v1/migrations/{id}/events     Server-Sent Events until the migration ends
    GET  /v1/devices
    GET  /healthz  /readyz  /metrics  /openapi.json

The app holds the service and the metrics registry in ``app.state``; it
does not run the service: the daemon's nursery does (``daemon.serve``), so
the app has no lifespan work of its own.
"""

from __future__ import annotations

import contextlib
import hmac
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import BaseModel, Field

from orchestrator import __version__
from orchestrator.control import ControlRequest
from orchestrator.errors import OrchestratorError
from orchestrator.flow import Phase
from orchestrator.journal import JournalEvent
from orchestrator.peer.incoming_models import (
    IncomingReady,
    IncomingReplies,
    IncomingRequest,
    IncomingStatus,
)
from orchestrator.peer.messages import encode
from orchestrator.plan import Plan
from orchestrator.report import Outcome
from orchestrator.service import DeviceStatus, MigrationService, MigrationStatus

from .errors import install_error_handlers
from .middleware import BearerAuth, BodySizeLimit, CrashGuard
from .models import ErrorBody, Health, MigrationEvent, Readiness

#: The Prometheus text format the registry is exposed in.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SettleMigration(BaseModel):
    """How the destination of a migration in doubt ended, as the operator knows it."""

    outcome: Literal["succeeded", "failed"]
    force: bool = Field(False, description="Settle even if the destination answers.")


class SettleIncoming(BaseModel):
    """The decision for an incoming migration in doubt, as the operator knows it."""

    decision: Literal["commit", "abort"]
    force: bool = Field(False, description="Settle even if the source answers.")


class Forbidden(OrchestratorError):
    status_hint = 403


class NotReady(OrchestratorError):
    """The service is still recovering what the journal holds unfinished, or is stopping."""

    status_hint = 503


@dataclass(frozen=True)
class ApiContext:
    service: MigrationService
    registry: CollectorRegistry


async def _context(request: Request) -> ApiContext:
    return cast(ApiContext, request.app.state.orchestrator)


async def _service(request: Request) -> MigrationService:
    return (await _context(request)).service


Service = Annotated[MigrationService, Depends(_service)]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        401: "No bearer token (the answer has `WWW-Authenticate: Bearer`).",
        403: "The bearer token is not valid.",
        404: "No migration with this id.",
        409: "Conflict: see the error's kind.",
        413: "The request body is larger than api.max_body_bytes.",
        422: "Invalid request: every problem with its field path.",
        503: "The daemon is starting or shutting down.",
    }
    return {s: {"model": ErrorBody, "description": descriptions[s]} for s in statuses}


open_router = APIRouter(tags=["probes"])
router = APIRouter(responses=_errors(401, 403))


@open_router.get(
    "/healthz",
    summary="Liveness: 200 while the process answers (no token needed).",
    openapi_extra={"security": []},
)
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    tags=["probes"],
    summary="Readiness: 200 once recovery is done, 503 while starting or shutting down.",
    responses=_errors(503),
)
async def readyz(service: Service) -> Readiness:
    if not service.ready:
        raise NotReady(
            "the orchestrator is shutting down"
            if not service.accepting
            else "the orchestrator is recovering unfinished migrations"
        )
    return Readiness(ready=True)


@router.get(
    "/metrics",
    tags=["probes"],
    summary="Prometheus metrics of this daemon, in the text exposition format 0.0.4.",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    registry = (await _context(request)).registry
    return Response(generate_latest(registry), headers={"content-type": METRICS_CONTENT_TYPE})


@router.post(
    "/v1/migrations",
    tags=["migrations"],
    status_code=201,
    summary="Start a migration.",
    description=(
        "The body is a plan, the same model as a plan file.  201 with the new migration and "
        "`Location: /v1/migrations/{id}`: the plan was accepted, which says nothing yet of "
        "how the migration ends.  It may still end `refused` (before pre-copy began: checks, "
        "prepare, a busy or missing device, a destination that said no or could not be "
        "reached, a cancel; every device as it was), as well as `succeeded`, `rolled_back` "
        "or `failed`: follow it to its outcome.  200 with the first migration when the "
        "`Idempotency-Key` was used before (nothing new is started).  The plan is checked "
        "completely first: 422 lists every problem with its field path, as "
        "`orchestrator validate` does, and records nothing."
    ),
    responses={
        200: {"model": MigrationStatus, "description": "The Idempotency-Key was seen before."},
        **_errors(409, 413, 422, 503),
    },
)
async def submit_migration(
    plan: Plan,
    response: Response,
    service: Service,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Repeat a request safely: the same key returns the first migration.",
        ),
    ] = None,
) -> MigrationStatus:
    if service.accepting and not service.ready:
        raise NotReady("the orchestrator is recovering unfinished migrations; try again shortly")
    status, created = await service.submit(plan, idempotency_key)
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/migrations/{status.id}"
    return status


@router.post(
    "/v1/incoming",
    tags=["incoming"],
    status_code=201,
    summary="Prepare the destination half of a migration from another host.",
    description=(
        "Called by the source host's daemon, never by people.  The destination validates "
        "the plan against its own backends (422 with field paths), locks its devices (409), "
        "opens them and answers with their capabilities, the data channel's port and a "
        "secret for this migration only.  503 when this daemon has no `[data] listen`."
    ),
    responses=_errors(409, 413, 422, 503),
)
async def prepare_incoming(request: IncomingRequest, service: Service) -> IncomingReady:
    if not service.accepting or not service.ready:
        raise NotReady("the orchestrator is not ready to receive a migration")
    return await service.incoming.prepare(request)


@router.get(
    "/v1/incoming/{migration_id}",
    tags=["incoming"],
    summary="Where an incoming migration stands on this (destination) host.",
    responses=_errors(404, 422),
)
async def get_incoming(migration_id: str, service: Service) -> IncomingStatus:
    return await service.incoming.status(migration_id)


@router.post(
    "/v1/incoming/{migration_id}/settle",
    tags=["incoming"],
    summary="An operator decides for an incoming migration in doubt.",
    description=(
        "For a migration this (destination) host voted for and whose source daemon cannot "
        "be reached: commit runs its devices, abort resets them.  409 while the source can "
        "still be asked (its answer counts), unless force; 409 for a migration not in doubt."
    ),
    responses=_errors(404, 409, 422),
)
async def settle_incoming(
    migration_id: str, body: SettleIncoming, service: Service
) -> IncomingStatus:
    return await service.incoming.settle(migration_id, body.decision, force=body.force)


@router.post(
    "/v1/incoming/{migration_id}/messages",
    tags=["incoming"],
    summary="A protocol message from the source daemon, when the data channel is gone.",
    description=(
        "Called by the source host's daemon, never by people: one typed message of the "
        "commit protocol (commit, abort, outcome...).  The answer is this side's status "
        "and the messages it answers with.  422 for a message that does not decode."
    ),
    responses=_errors(404, 422),
)
async def message_incoming(
    migration_id: str, message: dict[str, Any], service: Service
) -> IncomingReplies:
    return await service.incoming.deliver(migration_id, message)


@router.post(
    "/v1/migrations/{migration_id}/settle",
    tags=["migrations"],
    summary="An operator says how the destination of a migration in doubt ended.",
    description=(
        "For a migration to another host that committed and whose destination daemon "
        "cannot be reached to say how it ended.  409 while the destination can still be "
        "asked (its answer counts), unless force; 409 for a migration not in doubt."
    ),
    responses=_errors(404, 409, 422),
)
async def settle_migration(
    migration_id: str, body: SettleMigration, service: Service
) -> MigrationStatus:
    return await service.settle(migration_id, body.outcome, force=body.force)


@router.get(
    "/v1/migrations/{migration_id}/decision",
    tags=["incoming"],
    summary="The commit decision of a migration to another host, for its destination daemon.",
    description=(
        "Called by the destination host's daemon when it lost the source after its vote, or "
        "restarted: it authenticates with the credential the prepare call gave it for this "
        "migration only.  The answer is commit, abort or pending (the commit is being "
        "recorded), and the outcome once known.  An id this daemon never journaled was "
        "never committed: abort."
    ),
    responses=_errors(403, 422),
)
async def migration_decision(
    migration_id: str, request: Request, service: Service
) -> dict[str, Any]:
    token = request.headers.get("authorization", "").partition(" ")[2].strip()
    answer = await service.decision(migration_id, token)
    if answer is None:
        raise Forbidden("this credential does not answer for this migration's decision")
    return encode(answer)


@router.get(
    "/v1/migrations",
    tags=["migrations"],
    summary="Every migration this daemon knows, newest first.",
    responses=_errors(422),
)
async def list_migrations(
    service: Service,
    outcome: Annotated[
        Outcome | None,
        Query(
            description="Only migrations that ended so: succeeded, refused, rolled_back or "
            "failed (none: any, running ones included)."
        ),
    ] = None,
    phase: Annotated[Phase | None, Query(description="Only migrations in this phase.")] = None,
) -> list[MigrationStatus]:
    return await service.list(outcome=outcome, phase=None if phase is None else phase.value)


@router.get(
    "/v1/migrations/{migration_id}",
    tags=["migrations"],
    summary="One migration: its phase and live progress, its report once it has ended.",
    responses=_errors(404, 422),
)
async def get_migration(migration_id: str, service: Service) -> MigrationStatus:
    return await service.status(migration_id)


@router.patch(
    "/v1/migrations/{migration_id}",
    tags=["migrations"],
    summary="Change the downtime limit and bandwidth cap of a migration in pre-copy.",
    description=(
        "As libvirt's migrate-setmaxdowntime and migrate-setspeed.  Either field or both, "
        "held to the plan's bounds (422 names the field; an unknown field is 422 too); "
        "`bandwidth_limit_mib_s: null` removes the cap.  Accepted in prepare (the first "
        "round uses them) and in pre-copy until its decision: the cap applies at once, the "
        "limit at the next round's decision.  200 with the migration and its `control` (the "
        "limits in force and every change, journaled before the answer); the same request "
        "again is the same answer and records nothing new.  409 once the pre-copy decision "
        "is taken or the migration ended, and on a destination daemon (ask the source's)."
    ),
    responses=_errors(404, 409, 422),
)
async def control_migration(
    migration_id: str, body: ControlRequest, service: Service
) -> MigrationStatus:
    return await service.control(migration_id, body)


@router.post(
    "/v1/migrations/{migration_id}/switchover",
    tags=["migrations"],
    status_code=202,
    summary="Force the switchover of a migration in pre-copy, now.",
    description=(
        "As libvirt's migrate --force-complete: the pre-copy round in flight ends, and its "
        "decision is the switchover (its reason says the operator forced it); asked in "
        "prepare, the first round's decision is.  202: the switchover goes on (follow it to "
        "its outcome); asked again while it does, 202 again, so that a retry is safe.  409 "
        "after a pre-copy decision not forced, once it rolls back or ended, and on a "
        "destination daemon (ask the source's)."
    ),
    responses=_errors(404, 409, 422),
)
async def switchover_migration(migration_id: str, service: Service) -> MigrationStatus:
    return await service.force_switchover(migration_id)


@router.post(
    "/v1/migrations/{migration_id}/cancel",
    tags=["migrations"],
    status_code=202,
    summary="Roll a migration back.",
    description=(
        "202: it rolls back (follow it to its end: its outcome will be refused if pre-copy had "
        "not begun, rolled_back if it had, or failed if the rollback itself fails).  409 once "
        "it is past its commit point (the destination completes) or has ended."
    ),
    responses=_errors(404, 409, 422),
)
async def cancel_migration(migration_id: str, service: Service) -> MigrationStatus:
    return await service.cancel(migration_id)


@router.get(
    "/v1/migrations/{migration_id}/events",
    tags=["migrations"],
    summary="The migration's events as Server-Sent Events, until it ends.",
    description=(
        "Each event has `id: <seq>`, `event: <kind>` and `data: <MigrationEvent as JSON>`.  "
        "The journaled events come first, then live ones; the stream ends after the "
        "migration's `finished` event.  Send `Last-Event-ID` to resume after an event.  "
        "A stream quiet for 15 s sends a comment line (`: keep-alive`)."
    ),
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "An event stream.",
            "content": {
                "text/event-stream": {
                    "schema": {"$ref": "#/components/schemas/MigrationEvent"},
                }
            },
        },
        **_errors(404, 422),
    },
)
async def migration_events(
    migration_id: str,
    service: Service,
    last_event_id: Annotated[
        int | None,
        Header(
            alias="Last-Event-ID",
            ge=0,
            # Event ids are the journal's 64-bit sequence numbers: a larger one names
            # no event, and would overflow the query after the 200 went out.
            le=2**63 - 1,
            description="Resume after the event with this id.",
        ),
    ] = None,
) -> StreamingResponse:
    await service.status(migration_id)  # 404 now, not in the middle of a 200
    return StreamingResponse(
        _event_stream(service, migration_id, last_event_id or 0),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


#: An event stream quiet this long sends a comment line: proxies and load balancers
#: close idle connections, and a pre-copy may run for minutes without an event.
KEEPALIVE_S = 15.0


async def _event_stream(
    service: MigrationService, migration_id: str, after_seq: int
) -> AsyncIterator[bytes]:
    events = cast(
        AsyncGenerator[JournalEvent | None, None],
        service.follow_alive(migration_id, after_seq, KEEPALIVE_S),
    )
    async with contextlib.aclosing(events):
        async for event in events:
            yield b": keep-alive\n\n" if event is None else format_sse(event)


def format_sse(event: JournalEvent) -> bytes:
    data = MigrationEvent.of(event).model_dump_json()
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {data}\n\n".encode()


@router.get(
    "/v1/devices",
    tags=["devices"],
    summary="The devices this daemon has migrated, and the migration holding each, if any.",
)
async def list_devices(service: Service) -> list[DeviceStatus]:
    return service.devices()


class OrchestratorAPI(FastAPI):
    """FastAPI with the bearer scheme and the event model in its OpenAPI document."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is not None:
            return self.openapi_schema
        schema = super().openapi()
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "A token from the daemon's api.token_file.",
        }
        schema["security"] = [{"bearer": []}]
        event_schema = MigrationEvent.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = {**components.get("schemas", {}), "MigrationEvent": event_schema}
        components["schemas"] = dict(sorted(schemas.items()))
        self.openapi_schema = schema
        return schema


def build_app() -> OrchestratorAPI:
    """The routes and error handlers, without a service: enough for the OpenAPI document."""
    app = OrchestratorAPI(
        title="Passthrough live-migration orchestrator",
        version=__version__,
        description=(
            "Live-migrates the passthrough devices (GPUs, NICs, VFs, vDPA) of VMs through the "
            "Linux device migration flow.  Every answer but /metrics and the event stream is "
            'JSON; every error is `{"error": {"kind", "message", "problems"}}`.'
        ),
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.include_router(open_router)
    app.include_router(router)
    return app


_DECISION_PATH = re.compile(r"/v1/migrations/([A-Za-z0-9_-]{1,128})/decision")


def _decision_scope(service: MigrationService) -> Callable[[str, bytes], bool]:
    """A migration's decision credential opens its decision route, and nothing else."""

    def scoped(path: str, credentials: bytes) -> bool:
        match = _DECISION_PATH.fullmatch(path)
        if match is None:
            return False
        expected = service.decision_token(match.group(1)).encode()
        return hmac.compare_digest(expected, credentials)

    return scoped


def create_app(
    service: MigrationService,
    *,
    registry: CollectorRegistry,
    tokens: Sequence[str],
    read_tokens: Sequence[str] = (),
    peer_tokens: Sequence[str] = (),
    max_body_bytes: int = 1 << 20,
) -> OrchestratorAPI:
    """The API over ``service``, authenticated by ``tokens`` (operate: everything),
    ``read_tokens`` (GET routes and /metrics) and ``peer_tokens`` (the routes another
    host's daemon calls); the caller runs the service."""
    app = build_app()
    app.state.orchestrator = ApiContext(service=service, registry=registry)
    # Added innermost first: CrashGuard ends up outermost.
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes)
    roles = {"operate": tokens, "read": read_tokens, "peer": peer_tokens}
    app.add_middleware(BearerAuth, tokens=roles, scoped=_decision_scope(service))
    app.add_middleware(CrashGuard)
    return app

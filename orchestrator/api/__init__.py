"""The REST layer: a FastAPI app over the migration service, and its client.

``create_app`` builds the app the daemon serves; ``openapi_document`` the
schema committed as ``openapi.json``; ``client`` is what the CLI's
``submit``, ``status``, ``watch`` and ``cancel`` talk through.

The names below load on first use, so that the CLI's client commands, which
import ``orchestrator.api.client``, do not pay for importing FastAPI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import (
        METRICS_CONTENT_TYPE,
        ApiContext,
        NotReady,
        build_app,
        create_app,
        format_sse,
    )
    from .models import ErrorBody, ErrorDetail, MigrationEvent, ProblemItem, error_body
    from .openapi import OPENAPI_PATH, openapi_document, render_openapi, write_openapi

_HOMES = {
    "METRICS_CONTENT_TYPE": "app",
    "ApiContext": "app",
    "NotReady": "app",
    "build_app": "app",
    "create_app": "app",
    "format_sse": "app",
    "ErrorBody": "models",
    "ErrorDetail": "models",
    "MigrationEvent": "models",
    "ProblemItem": "models",
    "error_body": "models",
    "OPENAPI_PATH": "openapi",
    "openapi_document": "openapi",
    "render_openapi": "openapi",
    "write_openapi": "openapi",
}

__all__ = [
    "METRICS_CONTENT_TYPE",
    "OPENAPI_PATH",
    "ApiContext",
    "ErrorBody",
    "ErrorDetail",
    "MigrationEvent",
    "NotReady",
    "ProblemItem",
    "build_app",
    "create_app",
    "error_body",
    "format_sse",
    "openapi_document",
    "render_openapi",
    "write_openapi",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)

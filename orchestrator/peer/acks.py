"""Whether the other host's daemon holds a finished migration's outcome, for retention.

A migration between two hosts may be pruned from this host's journal only once
the peer daemon will never ask about it again: once its own record is final.
Two cases are known at the end without asking (``MigrationService`` and the
incoming server record them); for the others, retention asks the peer here,
through the routes the daemons already use for each other:

* the source asks the destination daemon ``GET /v1/incoming/{id}`` with the
  plan's destination credential: an outcome there, or no such migration (it
  never heard of it, or pruned it, which it does only once the source's record
  was final), is an acknowledgement;
* the destination asks the source daemon its decision route with the
  migration's own credential: an outcome there, or, for a committed migration,
  an answer that the source does not know it any more (a committed source
  answers ``commit`` while it keeps the record), is an acknowledgement.

Anything else (no answer, an error, no outcome yet) acknowledges nothing: the
record stays, and the next pass asks again.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import structlog

from orchestrator.journal import MigrationRecord
from orchestrator.peer.messages import DecisionAnswer, decode
from orchestrator.peer.remote import destination_token

log = structlog.get_logger("orchestrator.retention")

__all__ = ["TIMEOUT_S", "peer_holds_outcome"]

#: How long one question to a peer may take.
TIMEOUT_S = 10.0


async def peer_holds_outcome(record: MigrationRecord, ca_file: Path | None) -> bool:
    """Whether the peer daemon of this finished migration between two hosts holds
    its outcome (see the module docstring); False when it cannot tell."""
    try:
        if record.role == "destination":
            return await _source_holds(record, ca_file)
        return await _destination_holds(record, ca_file)
    except Exception as exc:  # a peer out of reach, a credential gone: ask next time
        log.info("retention.peer_not_asked", migration=record.id, error=str(exc))
        return False


async def _destination_holds(record: MigrationRecord, ca_file: Path | None) -> bool:
    spec = record.plan.destination
    if spec is None:
        return True  # nobody else to ask
    token = destination_token(spec)
    url = f"{spec.url.rstrip('/')}/v1/incoming/{record.id}"
    async with _client(ca_file or spec.ca_file) as client:
        response = await client.get(url, headers={"Authorization": f"Bearer {token}"})
    if response.status_code == 404:
        return True
    response.raise_for_status()
    return response.json().get("outcome") is not None


async def _source_holds(record: MigrationRecord, ca_file: Path | None) -> bool:
    peer = record.peer or {}
    api, token = peer.get("api"), peer.get("token")
    if not api or not token:
        return False
    url = f"{str(api).rstrip('/')}/v1/migrations/{record.id}/decision"
    async with _client(ca_file) as client:
        response = await client.get(url, headers={"Authorization": f"Bearer {token}"})
    response.raise_for_status()
    answer = decode(response.json())
    if not isinstance(answer, DecisionAnswer):
        return False
    if answer.outcome is not None:
        return True
    return record.committed and answer.decision == "abort"


def _client(ca_file: Path | None) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = True
    if ca_file is not None:
        verify = ssl.create_default_context(cafile=str(ca_file))
    return httpx.AsyncClient(timeout=TIMEOUT_S, verify=verify)

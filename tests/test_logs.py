"""The daemon's log lines: what an on-call engineer reads after a crash."""

from __future__ import annotations

import io
import json

import structlog

from orchestrator import logs


def crash() -> None:
    raise RuntimeError("the nursery is closed")


def test_a_logged_exception_keeps_its_traceback_in_json() -> None:
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    try:
        crash()
    except RuntimeError:
        structlog.get_logger().exception("incoming.crashed", migration="m1")
    finally:
        logs.configure("warning")
    line = json.loads(stream.getvalue())
    assert line["event"] == "incoming.crashed" and line["migration"] == "m1"
    assert "Traceback" in line["exception"]
    assert "RuntimeError: the nursery is closed" in line["exception"]

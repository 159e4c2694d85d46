"""The committed OpenAPI document (``openapi.json`` beside this file) and how to renew it.

``orchestrator openapi --write`` (or ``python -m orchestrator.api.openapi``)
regenerates it; ``tests/test_api.py`` fails when it is out of date.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from .app import build_app

OPENAPI_PATH: Final = Path(__file__).with_name("openapi.json")


def openapi_document() -> dict[str, Any]:
    return build_app().openapi()


def render_openapi() -> str:
    """The document as committed: indented JSON and a final newline."""
    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"


def write_openapi(path: Path = OPENAPI_PATH) -> Path:
    path.write_text(render_openapi(), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(f"wrote {write_openapi()}")

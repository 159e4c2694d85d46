#!/usr/bin/env python3
"""Health probe of the orchestrator daemon: the image's HEALTHCHECK and the Kubernetes probes.

    orchestrator-healthcheck            GET /healthz (liveness: the process answers)
    orchestrator-healthcheck --ready    GET /readyz with a token (readiness: recovery is done
                                        and the daemon is not shutting down)

It asks over the daemon's Unix socket, found from the daemon's own settings
(``$ORCHESTRATOR_CONFIG``, the ``ORCHESTRATOR_*`` environment, or ``--config``),
so it needs no port, no TLS and no copy of the configuration: the socket is
plain HTTP whatever ``api.tcp`` and TLS say, and a probe that follows the
settings cannot drift from them.  /readyz needs a bearer token: the first
one of ``api.token_file``.

Exit 0 when the answer is 200, 1 otherwise, with one line saying why (Docker
keeps it in ``docker inspect``, Kubernetes in the pod's events).  Standard
library HTTP: curl is not in the slim image.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import sys
from pathlib import Path


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket: http.client with the connect step replaced."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def probe(socket_path: Path, route: str, token: str | None, timeout: float) -> tuple[bool, str]:
    """(healthy, what happened) for one GET of ``route`` on the daemon's socket."""
    connection = UnixHTTPConnection(socket_path, timeout)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        connection.request("GET", route, headers=headers)
        response = connection.getresponse()
        body = response.read(512).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{route} on {socket_path}: no answer: {exc}"
    finally:
        connection.close()
    return response.status == 200, f"{route} on {socket_path}: {response.status} {body}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orchestrator-healthcheck", description=__doc__)
    parser.add_argument("--ready", action="store_true", help="check /readyz instead of /healthz")
    parser.add_argument("--config", type=Path, help="settings file (default: $ORCHESTRATOR_CONFIG)")
    parser.add_argument("--socket", type=Path, help="the API's Unix socket (default: settings)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    args = parser.parse_args(argv)

    # The daemon's own settings model: the same file, environment and defaults.
    from orchestrator.settings import Settings, SettingsError, read_token_file

    try:
        settings = Settings.load(args.config)
        token = None
        if args.ready:
            # The first token, as the CLI client takes it.
            token = read_token_file(settings.api.token_file, check_mode=False)[0]
    except SettingsError as exc:
        print(f"unhealthy: settings: {exc}")
        return 1
    socket_path = args.socket or settings.socket_path
    healthy, said = probe(socket_path, "/readyz" if args.ready else "/healthz", token, args.timeout)
    print(("healthy: " if healthy else "unhealthy: ") + said)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())

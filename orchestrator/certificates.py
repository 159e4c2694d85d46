"""The daemon's certificates: loaded at start, reloaded on SIGHUP, their expiry exported.

Two certificates may be in use: the host's ``[tls]`` identity (the data
listener's, and the API's unless ``[api] tls_cert`` is set) and the API's
own.  Each TLS server context is made once and kept: a reload loads the new
files into the same ``ssl.SSLContext``, which new connections then use
(OpenSSL takes a new certificate chain into a live context; connections
already open keep theirs).  A reload whose files do not load changes
nothing and is logged: a bad rotation never takes down a running daemon.
The source's client contexts are made per migration from the files, so a
rotation reaches them at once.  CA certificates are added on reload, never
removed: a CA taken out of ``ca_file`` stays trusted until a restart (a
rotation runs old and new CAs side by side anyway).

The expiry of each certificate in use is exported as
``orchestrator_tls_certificate_expiry_timestamp_seconds{certificate}``
(``host``, ``api``), for an alert well before the date.
"""

from __future__ import annotations

import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Gauge

__all__ = ["CertificateFiles", "Certificates", "expiry_timestamp"]

log = structlog.get_logger("orchestrator.daemon")


@dataclass(frozen=True)
class CertificateFiles:
    """One certificate in use: its chain and key, and the CA its peers must have."""

    name: str
    cert_file: Path
    key_file: Path
    ca_file: Path | None = None


@dataclass
class Certificates:
    """The daemon's server contexts, which a reload refreshes in place."""

    registry: CollectorRegistry | None = None
    _contexts: list[tuple[CertificateFiles, ssl.SSLContext]] = field(default_factory=list)
    #: The expiry gauge, with a registry.
    expiry: Gauge | None = None

    def __post_init__(self) -> None:
        if self.registry is not None:
            self.expiry = Gauge(
                "orchestrator_tls_certificate_expiry_timestamp_seconds",
                "When each certificate the daemon serves expires (Unix time): host, its [tls] "
                "identity; api, the API's own [api] tls_cert.",
                ["certificate"],
                registry=self.registry,
            )

    def keep(self, files: CertificateFiles, context: ssl.SSLContext) -> ssl.SSLContext:
        """Serve ``context`` (made from ``files``); a reload refreshes it."""
        self._contexts.append((files, context))
        self._export(files)
        return context

    def reload(self) -> list[str]:
        """Load every certificate again into its context; the names of those that
        could not be (each logged, and kept as it was).

        The files are read once, into a private copy, and both the trial load
        and the live one read that copy: a rotation that lands between them
        (a Kubernetes Secret's symlink swap) cannot give the live context a
        key of another certificate."""
        failed = []
        for files, context in self._contexts:
            try:
                with tempfile.TemporaryDirectory(prefix="orchestrator-tls-") as folder:
                    snapshot = _snapshot(files, Path(folder))
                    _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), snapshot)
                    _load(context, snapshot)
            except (OSError, ssl.SSLError) as exc:
                failed.append(files.name)
                log.error(  # noqa: TRY400 - the reason is all there is: no traceback
                    "daemon.tls_reload_failed",
                    certificate=files.name,
                    cert_file=str(files.cert_file),
                    error=getattr(exc, "reason", None) or str(exc),
                    kept="the certificate already loaded",
                )
                continue
            self._export(files)
            log.info("daemon.tls_reloaded", certificate=files.name, cert_file=str(files.cert_file))
        return failed

    def _export(self, files: CertificateFiles) -> None:
        if self.expiry is None:
            return
        expiry = expiry_timestamp(files.cert_file)
        if expiry is not None:
            self.expiry.labels(certificate=files.name).set(expiry)
            days = (expiry - time.time()) / 86400
            if days < 14:
                log.warning(
                    "daemon.tls_certificate_expires_soon",
                    certificate=files.name,
                    days=round(days, 1),
                )


def _snapshot(files: CertificateFiles, folder: Path) -> CertificateFiles:
    """A copy of the files, read once each, in ``folder`` (private to this process)."""
    copies = {}
    for part in ("cert_file", "key_file", "ca_file"):
        path = getattr(files, part)
        if path is None:
            continue
        copy = folder / part
        copy.write_bytes(path.read_bytes())
        copies[part] = copy
    return CertificateFiles(
        files.name, copies["cert_file"], copies["key_file"], copies.get("ca_file")
    )


def _load(context: ssl.SSLContext, files: CertificateFiles) -> None:
    context.load_cert_chain(files.cert_file, files.key_file)
    if files.ca_file is not None:
        context.load_verify_locations(cafile=files.ca_file)


def expiry_timestamp(cert_file: Path) -> float | None:
    """When the first certificate in ``cert_file`` expires (Unix time); None where this
    Python cannot say (its ssl module decodes certificate files only through a
    helper CPython keeps for its tests)."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:
        return None
    try:
        not_after = decode(str(cert_file))["notAfter"]
    except (OSError, ssl.SSLError, KeyError, ValueError):
        return None
    return float(ssl.cert_time_to_seconds(not_after))

"""The daemon's settings: one model per subsystem, from a TOML file, the environment and flags.

Precedence, lowest first: the defaults here, the TOML file given with
``--config`` (or named by ``ORCHESTRATOR_CONFIG``), the environment
(``ORCHESTRATOR_`` prefix, ``__`` between nested names:
``ORCHESTRATOR_API__TCP=127.0.0.1:8443``), then command-line flags.  Nested
tables merge key by key, so an environment variable overrides one key of the
file's ``[api]`` table and leaves the others.

Every failure is a :class:`SettingsError` listing each problem with the
field's path (``api.tcp``), the same shape as a plan's problems; the CLI
prints them and exits 2.  Unknown keys are refused, in the file and in the
environment alike: a misspelt setting silently ignored is a daemon that
listens where nobody expects it.

Checks that concern files on the daemon's host (the token file, the TLS
certificate) are not made when the settings load, because the CLI client
loads the same settings to find the daemon: ``read_token_file`` and the
daemon make them at start.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from orchestrator.compat import CompatSettings, rule_problems
from orchestrator.errors import OrchestratorError, Problem
from orchestrator.plan import UNIX_PATH_MAX as PLAN_UNIX_PATH_MAX
from orchestrator.plan import problems_from_validation

#: The environment variable naming a config file when ``--config`` is not given.
CONFIG_ENV: Final = "ORCHESTRATOR_CONFIG"
ENV_PREFIX: Final = "ORCHESTRATOR_"

#: The longest path a Unix socket address holds (``sun_path`` less its NUL).
UNIX_PATH_MAX: Final = PLAN_UNIX_PATH_MAX

SOCKET_NAME: Final = "api.sock"

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["console", "json"]


class SettingsError(OrchestratorError):
    """The settings are unusable; carries every problem found, by field path."""

    def __init__(self, problems: list[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        self.problems: list[Problem] = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


def parse_host_port(value: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); ValueError says what is wrong."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError('expected "host:port", for example "127.0.0.1:8443" or "[::1]:8443"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError('an IPv6 address goes in brackets: "[::1]:8443"')
    if not host:
        raise ValueError("the host is empty")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"the port must be a number from 0 to 65535, not {port_text!r}")
    return host, int(port_text)


class ApiSettings(BaseModel):
    """The REST API's listeners, its authentication and its limits (the ``[api]`` table)."""

    model_config = ConfigDict(extra="forbid")

    unix_socket: Path | None = Field(
        None,
        description=(
            f"Unix socket the API listens on, mode 0600, with a lock file beside it "
            f"(default: {SOCKET_NAME} in state_dir).  The CLI client connects here."
        ),
    )
    tcp: str | None = Field(
        None,
        description=(
            'Also listen on TCP at "host:port" ("[::1]:8443" for IPv6; port 0 takes a free '
            "port).  Off by default.  Use TLS (tls_cert, tls_key) off the loopback: the "
            "bearer tokens travel in every request."
        ),
    )
    advertise: str | None = Field(
        None,
        description=(
            'The URL other hosts\' daemons reach this API on ("https://10.0.0.1:7800"): '
            "the destination of a migration asks it for the commit decision when the two "
            "lose each other.  Default: the TCP listener's own address, unless it is a "
            "wildcard (0.0.0.0, ::).  Without either, migrations to other hosts are refused."
        ),
    )
    token_file: Path = Field(
        Path("/etc/orchestrator/api-tokens"),
        description=(
            "File of the operators' bearer tokens, one per line; blank lines and lines "
            "starting with # are ignored.  An operate token may do everything: read, submit, "
            "control, cancel, settle.  The file must be a regular file (symlinks are "
            "followed) of this daemon's user, not writable by group or others nor readable "
            "by others (mode 0600 or 0640), each token at least 32 bytes."
        ),
    )
    read_token_file: Path | None = Field(
        None,
        description=(
            "File of read-only tokens (same rules): GET routes, the event streams and "
            "/metrics, nothing that changes anything.  For dashboards, Prometheus and "
            "watchers."
        ),
    )
    peer_token_file: Path | None = Field(
        None,
        description=(
            "File of the tokens other hosts' daemons present (same rules): the routes a "
            "source daemon calls on its destination (POST /v1/incoming and its messages), "
            "nothing else.  Operate tokens are accepted there too."
        ),
    )
    tls_cert: Path | None = Field(
        None,
        description="PEM certificate (chain) for the TCP listener; needs tls_key and tcp.",
    )
    tls_key: Path | None = Field(
        None,
        validate_default=True,
        description="PEM private key of tls_cert; needs tls_cert and tcp.",
    )
    max_body_bytes: int = Field(
        1 << 20,
        ge=1,
        le=1 << 30,
        description="Largest request body accepted, in bytes; a larger one is refused with 413.",
    )

    @field_validator("tcp")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # ORCHESTRATOR_API__TCP="" turns TCP off again
        parse_host_port(value.strip())
        return value.strip()

    @field_validator("advertise")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an http:// or https:// URL with a host, not {value!r}")
        return value.strip()

    @field_validator("tls_key")
    @classmethod
    def _tls_pair(cls, key: Path | None, info: ValidationInfo) -> Path | None:
        # Here rather than on the model, so that the error names a field.
        if "tls_cert" not in info.data:
            return key  # tls_cert itself is invalid and reported
        cert = info.data["tls_cert"]
        if (cert is None) != (key is None):
            given, missing = ("tls_cert", "tls_key") if key is None else ("tls_key", "tls_cert")
            raise ValueError(f"tls_cert and tls_key go together: {given} is set, {missing} is not")
        if key is not None and info.data.get("tcp") is None and "tcp" in info.data:
            raise ValueError("TLS applies to the TCP listener, and tcp is not set")
        return key

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        return None if self.tcp is None else parse_host_port(self.tcp)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


class DataSettings(BaseModel):
    """The data channel this daemon receives migrations on (the ``[data]`` table).

    A daemon that is the destination of migrations from other hosts listens
    here; the source daemon learns the port from the prepare call and
    connects to the host it reached this daemon's API on (or ``advertise``).
    """

    model_config = ConfigDict(extra="forbid")

    listen: str | None = Field(
        None,
        description=(
            'Listen for data-channel connections on "host:port" ("0.0.0.0:7801"; port 0 '
            "takes a free port).  Off by default: this daemon then refuses to be the "
            "destination of a migration from another host."
        ),
    )
    advertise: str | None = Field(
        None,
        description=(
            "Host name or address the source daemon should connect the data channel to "
            "(default: the host it reached this daemon's API on)."
        ),
    )
    insecure: bool = Field(
        False,
        description=(
            "Allow a data listener beyond the loopback without a [tls] identity: device "
            "state then crosses the network in cleartext, readable and alterable on the "
            "path.  Without it such a daemon refuses to start."
        ),
    )
    max_buffered_mib: int = Field(
        32,
        ge=1,
        le=65536,
        description=(
            "Each incoming migration's cap, in MiB, on device state received and not yet "
            "loaded into its devices: a destination device that loads slower than the "
            "network holds the source back (TCP back-pressure) instead of filling this "
            "daemon's memory.  Each connection may always take one 1 MiB buffer beyond it."
        ),
    )
    max_handshakes: int = Field(
        # The listener's own default (DEFAULT_MAX_HANDSHAKES); not imported, so
        # that loading the settings does not load the transport and trio.
        256,
        ge=1,
        le=65536,
        description=(
            "Most data-channel connections not yet authenticated (in their handshake) at "
            "once.  When one more arrives, the oldest still in its handshake is closed: "
            "connections that are no migration's can neither use up the daemon's file "
            "descriptors nor keep out a source this daemon expects, which answers the "
            "handshake at once.  Keep it well below the descriptor limit (LimitNOFILE)."
        ),
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value

    @property
    def listen_address(self) -> tuple[str, int] | None:
        return None if self.listen is None else parse_host_port(self.listen)


class TlsSettings(BaseModel):
    """This host's identity for migration traffic (the ``[tls]`` table), as libvirt's
    pki: every host's certificate is signed by ``ca_file``.  Set, the data channel
    is mutual TLS (the listener requires a certificate of the CA, cleartext is
    refused, the source checks the destination's name from its URL); the source
    checks the destination API's certificate against ``ca_file``; the API's TCP
    listener serves this certificate unless ``[api] tls_cert`` says otherwise."""

    model_config = ConfigDict(extra="forbid")

    cert_file: Path = Field(description="PEM certificate (chain) of this host.")
    key_file: Path = Field(description="PEM private key of cert_file.")
    ca_file: Path = Field(description="PEM certificate(s) of the CA that signs every host's.")


class LogSettings(BaseModel):
    """The daemon's logs on stderr (the ``[log]`` table)."""

    model_config = ConfigDict(extra="forbid")

    level: LogLevel = Field("info", description="Least severe level logged.")
    format: LogFormat = Field(
        "console", description='"console" for people, "json" (one object a line) for collectors.'
    )


#: The config file's values, for ``Settings.settings_customise_sources`` during ``load``.
_FILE_VALUES: ContextVar[Mapping[str, Any] | None] = ContextVar(
    "orchestrator_file_values", default=None
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this host's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything ``orchestrator serve`` is configured with."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
    )

    state_dir: Path = Field(
        Path("/var/lib/orchestrator"),
        description=(
            "Directory of the journal (journal.sqlite3) and the daemon's lock; created with "
            "mode 0700 if missing.  One daemon per state directory."
        ),
    )
    max_migrations: int = Field(
        0,
        ge=0,
        le=100_000,
        description=(
            "Most migrations this host runs at once, outgoing and incoming together (0: no "
            "limit).  One more is refused at once, nothing queued: a submission gets 429 "
            "too_many_migrations, another host's prepare is refused (its migration ends "
            "refused), and the management layer decides when to try again.  Migrations a "
            "restart recovers always run."
        ),
    )
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        le=86400,
        allow_inf_nan=False,
        description=(
            "On SIGTERM or SIGINT: how long running migrations may go on to finish; the ones "
            "still before their commit point then are rolled back."
        ),
    )
    journal_retention_days: float | None = Field(
        None,
        gt=0,
        le=36500,
        allow_inf_nan=False,
        description=(
            "Prune from the journal the migrations that finished more than this many days "
            "ago, at start and then hourly: only finished ones, and of those between two "
            "hosts only the ones whose outcome the peer daemon acknowledged (it may still "
            "ask about the others).  Off unless set: the journal keeps everything."
        ),
    )
    handover_socket: Path | None = Field(
        None,
        description=(
            "Unix socket (SOCK_SEQPACKET, mode 0600, with a lock file beside it) where VMMs "
            "hand over the descriptors of the devices they hold (SCM_RIGHTS), for plans to name "
            'by handle ("vm/device").  Off unless set.'
        ),
    )
    api: ApiSettings = Field(default_factory=ApiSettings, description="The REST API.")
    data: DataSettings = Field(
        default_factory=DataSettings, description="The data channel from other hosts."
    )
    log: LogSettings = Field(default_factory=LogSettings, description="Logging.")
    tls: TlsSettings | None = Field(
        None, description="This host's TLS identity for migration traffic; off unless set."
    )
    compat: CompatSettings = Field(
        default_factory=CompatSettings,
        description=(
            "Device identity differences this daemon accepts when it coordinates a migration "
            "([[compat.rules]]: backend, model, field, values or min/max, downgrade)."
        ),
    )

    @field_validator("handover_socket", mode="before")
    @classmethod
    def _empty_is_off(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest precedence first: flags (passed as init arguments), the
        # environment, then the file.  No .env or secrets directory.
        file_values = InitSettingsSource(settings_cls, init_kwargs=dict(_FILE_VALUES.get() or {}))
        return init_settings, env_settings, file_values

    @classmethod
    def load(
        cls, config_file: Path | None = None, flags: Mapping[str, Any] | None = None
    ) -> Settings:
        """Defaults < ``config_file`` (else ``$ORCHESTRATOR_CONFIG``) < environment < ``flags``.

        ``flags`` are nested like the file (``{"api": {"tcp": "..."}}``); a None
        value means the flag was not given.  Raises SettingsError.
        """
        if config_file is None and os.environ.get(CONFIG_ENV):
            config_file = Path(os.environ[CONFIG_ENV])
        file_values = read_config_file(config_file) if config_file is not None else {}
        token = _FILE_VALUES.set(file_values)
        try:
            settings = cls(**_without_none(flags or {}))
        except ValidationError as exc:
            raise SettingsError(problems_from_validation(exc)) from None
        finally:
            _FILE_VALUES.reset(token)
        settings.check_cleartext()
        settings.check_compat()
        return settings

    def check_compat(self) -> None:
        """SettingsError for a ``[[compat.rules]]`` entry naming a backend or an
        identity field that does not exist (each with its path)."""
        from orchestrator.backends import BACKENDS  # the backends' own field names

        fields = {name: backend.identity_fields for name, backend in BACKENDS.items()}
        problems = rule_problems(self.compat, fields)
        if problems:
            raise SettingsError(problems)

    def check_cleartext(self) -> None:
        """SettingsError when the data channel would listen beyond the loopback with
        no [tls] identity and no ``data.insecure`` to accept cleartext there."""
        address = self.data.listen_address
        if address is None or self.tls is not None or self.data.insecure:
            return
        if not is_loopback(address[0]):
            raise SettingsError(
                [
                    Problem(
                        "data.listen",
                        f"{self.data.listen!r} is beyond the loopback and there is no [tls] "
                        "identity: device state would cross the network in cleartext.  Set "
                        "[tls] cert_file, key_file and ca_file, or data.insecure = true to "
                        "accept that",
                    )
                ]
            )

    @property
    def socket_path(self) -> Path:
        """Where the API's Unix socket is."""
        return self.api.unix_socket or self.state_dir / SOCKET_NAME


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            nested = _without_none(value)
            if nested:
                out[key] = nested
        elif value is not None:
            out[key] = value
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML config file's tables; every failure a SettingsError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SettingsError(
            f"cannot read the config file {str(path)!r}: {exc.strerror or exc}"
        ) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise SettingsError(f"config file {str(path)!r}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {str(path)!r}: invalid TOML: {exc}") from None


def read_token_file(
    path: Path, *, check_mode: bool = True, field: str = "api.token_file"
) -> tuple[str, ...]:
    """The bearer tokens in ``path``: one per line, blank lines and # comments ignored.

    Symlinks are followed (a Kubernetes Secret's mount is one).  Refuses
    (SettingsError on ``field``) a file that is missing, not a regular file (a
    FIFO is refused at once, never waited on), holds no token, or, with
    ``check_mode``: a file that group or other may write or other may read,
    that another user owns, or that sits in a directory every user may write
    to (anyone could replace it), and a token shorter than ``MIN_TOKEN_BYTES``
    (``x``, ``changeme``): a token grants what its file's role allows.  The
    client reads its token with ``check_mode=False``: that file is its owner's
    business, not the daemon's.
    """
    try:
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer, forever.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SettingsError([Problem(field, f"{path} does not exist")]) from None
    except OSError as exc:
        raise SettingsError(
            [Problem(field, f"cannot open {path}: {exc.strerror or exc}")]
        ) from None
    try:
        # fstat the file we read, not the name: no window for a swap between the two.
        info = os.fstat(fd)
        mode = info.st_mode
        if not stat.S_ISREG(mode):
            raise SettingsError([Problem(field, f"{path} is not a regular file")])
        if check_mode:
            _check_token_file_owner(path, info.st_uid, field)
        if check_mode and mode & 0o027:
            who = " and ".join(
                name
                for name, bits in (
                    ("group (write)", 0o020),
                    ("other (read)", 0o004),
                    ("other (write)", 0o002),
                    ("other (execute)", 0o001),
                )
                if mode & bits
            )
            raise SettingsError(
                [
                    Problem(
                        field,
                        f"{path} is accessible by {who} (mode {stat.S_IMODE(mode):04o}): "
                        f"make it readable by its owner only (chmod 600; 640 for a group)",
                    )
                ]
            )
        with os.fdopen(fd, "rb", closefd=False) as file:
            text = file.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError([Problem(field, f"cannot read {path}: {exc}")]) from None
    finally:
        os.close(fd)
    tokens = tuple(
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    )
    if not tokens:
        raise SettingsError(
            [
                Problem(
                    field,
                    f"{path} holds no token (one per line; blank lines and # comments are ignored)",
                )
            ]
        )
    if check_mode:
        short = [n for n, token in enumerate(tokens, 1) if len(token.encode()) < MIN_TOKEN_BYTES]
        if short:
            raise SettingsError(
                [
                    Problem(
                        field,
                        f"{path}: token {', '.join(map(str, short))} has fewer than "
                        f"{MIN_TOKEN_BYTES} bytes: anyone could guess it (make one "
                        "with: python -c 'import secrets; print(secrets.token_urlsafe(32))')",
                    )
                ]
            )
    return tokens


#: The shortest bearer token the daemon accepts (``x`` and ``changeme`` are guessed).
MIN_TOKEN_BYTES = 32


def _check_token_file_owner(path: Path, uid: int, field: str) -> None:
    """The daemon's own file, in a directory not every user may write to (the
    directory of the file itself, where a symlink leads)."""
    if uid != os.geteuid():
        raise SettingsError(
            [Problem(field, f"{path} is owned by uid {uid}, not by this daemon's ({os.geteuid()})")]
        )
    # The directory holding the name (whoever writes it could point the name
    # elsewhere) and, through a symlink, the one holding the file.
    folders = dict.fromkeys([path.absolute().parent, Path(os.path.realpath(path)).parent])
    for folder in folders:
        try:
            folder_mode = folder.stat().st_mode
        except OSError as exc:
            raise SettingsError(
                [Problem(field, f"cannot inspect {folder}: {exc.strerror or exc}")]
            ) from None
        if folder_mode & stat.S_IWOTH and not folder_mode & stat.S_ISVTX:
            raise SettingsError(
                [
                    Problem(
                        field,
                        f"{path} is in {folder}, which every user may write to: anyone "
                        "could replace it; keep it in a directory only its owner writes",
                    )
                ]
            )

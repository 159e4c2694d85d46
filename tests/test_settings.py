"""Daemon settings: defaults < file < environment < flags; every problem named; token files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator import cli
from orchestrator.settings import (
    CONFIG_ENV,
    ApiSettings,
    LogSettings,
    Settings,
    SettingsError,
    parse_host_port,
    read_token_file,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ORCHESTRATOR_"):
            monkeypatch.delenv(name)


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def problems_of(exc: pytest.ExceptionInfo[SettingsError]) -> dict[str, str]:
    return {p.path: p.message for p in exc.value.problems}


def test_defaults() -> None:
    settings = Settings.load()
    assert settings.state_dir == Path("/var/lib/orchestrator")
    assert settings.socket_path == Path("/var/lib/orchestrator/api.sock")
    assert settings.api.tcp is None and settings.api.tcp_address is None
    assert settings.api.max_body_bytes == 1 << 20
    assert not settings.api.tls
    assert (settings.log.level, settings.log.format) == ("info", "console")


def test_every_setting_is_documented() -> None:
    models: list[type[BaseModel]] = [Settings, ApiSettings, LogSettings]
    for model in models:
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"


def test_the_example_config_loads_and_states_the_defaults() -> None:
    example = Settings.load(ROOT / "config" / "orchestrator.toml")
    assert example == Settings.load()


def test_precedence_is_file_then_environment_then_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path / "o.toml",
        """
        state_dir = "/from/file"
        shutdown_grace_s = 5
        [api]
        tcp = "127.0.0.1:1"
        token_file = "/file/tokens"
        max_body_bytes = 1000
        [log]
        level = "debug"
        """,
    )
    settings = Settings.load(config)
    assert settings.state_dir == Path("/from/file") and settings.api.tcp == "127.0.0.1:1"

    monkeypatch.setenv("ORCHESTRATOR_STATE_DIR", "/from/env")
    monkeypatch.setenv("ORCHESTRATOR_API__TCP", "127.0.0.1:2")
    monkeypatch.setenv("ORCHESTRATOR_API__MAX_BODY_BYTES", "2000")
    settings = Settings.load(config)
    assert settings.state_dir == Path("/from/env")
    assert settings.api.tcp == "127.0.0.1:2" and settings.api.max_body_bytes == 2000
    # Nested tables merge key by key: the file's other [api] keys stay.
    assert settings.api.token_file == Path("/file/tokens")
    assert settings.shutdown_grace_s == 5 and settings.log.level == "debug"

    flags: dict[str, Any] = {
        "state_dir": "/from/flag",
        "shutdown_grace_s": None,  # not given
        "api": {"tcp": "[::1]:3", "unix_socket": "/flag.sock", "token_file": None},
        "log": {"level": None, "format": "json"},
    }
    settings = Settings.load(config, flags)
    assert settings.state_dir == Path("/from/flag")
    assert settings.api.tcp_address == ("::1", 3)
    assert settings.socket_path == Path("/flag.sock")
    assert settings.api.max_body_bytes == 2000  # env
    assert settings.api.token_file == Path("/file/tokens")  # file
    assert settings.shutdown_grace_s == 5 and settings.log.level == "debug"  # file
    assert settings.log.format == "json"  # flag


def test_the_config_file_may_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path / "o.toml", 'state_dir = "/via/env"\n')
    monkeypatch.setenv(CONFIG_ENV, str(config))
    assert Settings.load().state_dir == Path("/via/env")
    other = write(tmp_path / "p.toml", 'state_dir = "/via/flag"\n')
    assert Settings.load(other).state_dir == Path("/via/flag")


def test_an_empty_tcp_turns_tcp_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "o.toml", '[api]\ntcp = "127.0.0.1:8443"\n')
    monkeypatch.setenv("ORCHESTRATOR_API__TCP", "")
    assert Settings.load(config).api.tcp is None


def test_every_bad_field_in_the_file_is_named(tmp_path: Path) -> None:
    config = write(
        tmp_path / "o.toml",
        """
        colour = "blue"
        shutdown_grace_s = -1
        [api]
        tcp = "8443"
        max_body_bytes = 0
        tls_cert = "/c.pem"
        bogus = 1
        [log]
        level = "loud"
        format = "xml"
        """,
    )
    with pytest.raises(SettingsError) as exc:
        Settings.load(config)
    found = problems_of(exc)
    assert set(found) == {
        "colour",
        "shutdown_grace_s",
        "api.tcp",
        "api.max_body_bytes",
        "api.tls_key",
        "api.bogus",
        "log.level",
        "log.format",
    }
    assert found["colour"] == found["api.bogus"] == "unknown field"
    assert "host:port" in found["api.tcp"]
    assert "tls_cert is set, tls_key is not" in found["api.tls_key"]


def test_tls_needs_both_files_and_tcp() -> None:
    with pytest.raises(SettingsError) as exc:
        Settings.load(flags={"api": {"tls_key": "/k.pem", "tcp": "127.0.0.1:1"}})
    assert "tls_key is set, tls_cert is not" in problems_of(exc)["api.tls_key"]
    with pytest.raises(SettingsError) as exc:
        Settings.load(flags={"api": {"tls_key": "/k.pem", "tls_cert": "/c.pem"}})
    assert "tcp is not set" in problems_of(exc)["api.tls_key"]
    settings = Settings.load(
        flags={"api": {"tls_key": "/k.pem", "tls_cert": "/c.pem", "tcp": "0.0.0.0:8443"}}
    )
    assert settings.api.tls


def test_bad_environment_and_flag_values_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_API__MAX_BODY_BYTES", "lots")
    monkeypatch.setenv("ORCHESTRATOR_API__NOPE", "1")
    with pytest.raises(SettingsError) as exc:
        Settings.load(flags={"shutdown_grace_s": "soon"})
    assert set(problems_of(exc)) == {"api.max_body_bytes", "api.nope", "shutdown_grace_s"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:65535", ("::1", 65535)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
    ],
)
def test_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8443", "host:port"),
        (":8443", "host:port"),
        ("::1:8443", "brackets"),
        ("[]:80", "empty"),
        ("host:65536", "0 to 65535"),
        ("host:http", "0 to 65535"),
    ],
)
def test_bad_host_port(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_host_port(text)


def test_a_missing_or_broken_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"cannot read the config file .*nope\.toml"):
        Settings.load(tmp_path / "nope.toml")
    broken = write(tmp_path / "broken.toml", "[api\n")
    with pytest.raises(SettingsError, match=r"broken\.toml.*invalid TOML"):
        Settings.load(broken)


# -- token files ------------------------------------------------------------------------


A_TOKEN = "long-enough-token-0123456789abcdef"  # 34 bytes
B_TOKEN = "beta-token-0123456789abcdef-0123456"


def test_tokens_one_per_line_without_blanks_or_comments(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens", f"# ops\n\n  {A_TOKEN}  \n#beta\n{B_TOKEN}\n")
    assert read_token_file(path) == (A_TOKEN, B_TOKEN)


@pytest.mark.parametrize("token", ["x", "changeme", "thirty-one-bytes-is-too-short!!"])
def test_a_guessable_token_is_refused_by_the_daemon(tmp_path: Path, token: str) -> None:
    path = write(tmp_path / "tokens", f"{A_TOKEN}\n{token}\n")
    with pytest.raises(SettingsError) as exc:
        read_token_file(path)
    message = problems_of(exc)["api.token_file"]
    assert "token 2 has fewer than 32 bytes" in message and token not in message
    assert read_token_file(path, check_mode=False)[1] == token  # a client's own business


def test_a_token_is_measured_in_bytes(tmp_path: Path) -> None:
    token = "ü" * 16  # 16 characters, 32 bytes
    assert read_token_file(write(tmp_path / "tokens", f"{token}\n")) == (token,)


def test_the_field_named_is_the_file_s_own(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens", "x\n")
    with pytest.raises(SettingsError) as exc:
        read_token_file(path, field="api.read_token_file")
    assert "fewer than 32 bytes" in problems_of(exc)["api.read_token_file"]


def test_a_fifo_token_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "tokens"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SettingsError) as exc:  # no writer ever comes: no wait for one
        read_token_file(fifo)
    assert "not a regular file" in problems_of(exc)["api.token_file"]


def test_a_token_file_anyone_could_replace_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    path = write(shared / "tokens", f"{A_TOKEN}\n")
    shared.chmod(0o777)
    with pytest.raises(SettingsError) as exc:
        read_token_file(path)
    assert "which every user may write to" in problems_of(exc)["api.token_file"]
    shared.chmod(0o1777)  # sticky, as /tmp: only the file's owner may replace it
    assert read_token_file(path) == (A_TOKEN,)


def test_a_symlinked_token_file_is_judged_where_it_leads(tmp_path: Path) -> None:
    """As a Kubernetes Secret's mount: the name is a symlink into a data directory."""
    data = tmp_path / "..data"
    data.mkdir(mode=0o700)
    target = write(data / "api-tokens", f"{A_TOKEN}\n", 0o440)
    link = tmp_path / "api-tokens"
    link.symlink_to(target)
    assert read_token_file(link) == (A_TOKEN,)
    data.chmod(0o777)  # the directory it leads to is what anyone could write
    with pytest.raises(SettingsError) as exc:
        read_token_file(link)
    assert "which every user may write to" in problems_of(exc)["api.token_file"]


def test_a_token_file_another_user_owns_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "tokens", f"{A_TOKEN}\n")
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(path).st_uid + 1)
    with pytest.raises(SettingsError) as exc:
        read_token_file(path)
    assert "is owned by uid" in problems_of(exc)["api.token_file"]


@pytest.mark.parametrize(
    ("mode", "who"),
    [
        (0o604, "other (read)"),
        (0o660, "group (write)"),
        (0o644, "other (read)"),
        (0o602, "other (write)"),
    ],
)
def test_a_token_file_others_may_read_is_refused(tmp_path: Path, mode: int, who: str) -> None:
    path = write(tmp_path / "tokens", f"{A_TOKEN}\n", mode)
    with pytest.raises(SettingsError) as exc:
        read_token_file(path)
    message = problems_of(exc)["api.token_file"]
    assert f"accessible by {who}" in message and f"(mode {mode:04o})" in message
    assert "chmod 600" in message
    # A client reading its own token does not judge the file's mode.
    assert read_token_file(path, check_mode=False) == (A_TOKEN,)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_a_token_file_its_group_may_read_is_accepted(tmp_path: Path, mode: int) -> None:
    assert read_token_file(write(tmp_path / "tokens", f"{A_TOKEN}\n", mode)) == (A_TOKEN,)


def test_a_missing_empty_or_odd_token_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as exc:
        read_token_file(tmp_path / "absent")
    assert "does not exist" in problems_of(exc)["api.token_file"]
    empty = write(tmp_path / "empty", "# only a comment\n\n   \n")
    with pytest.raises(SettingsError) as exc:
        read_token_file(empty)
    assert "holds no token" in problems_of(exc)["api.token_file"]
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(SettingsError) as exc:
        read_token_file(tmp_path / "dir")
    assert "not a regular file" in problems_of(exc)["api.token_file"]


# -- through the CLI: exit 2, the field named, no traceback ---------------------------------


def test_serve_with_bad_settings_exits_2_naming_the_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "o.toml", '[api]\ntcp = "nowhere"\nmax_body_bytes = -5\n')
    assert cli.main(["serve", "--config", str(config), "--shutdown-grace-s", "x"]) == 2
    err = capsys.readouterr().err
    assert "invalid settings: 3 problem(s)" in err
    for field in ("api.tcp", "api.max_body_bytes", "shutdown_grace_s"):
        assert f"  {field}: " in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (None, 0o600, "does not exist"),
        ("# nothing\n", 0o600, "holds no token"),
        ("token\n", 0o644, "accessible by other (read)"),
    ],
)
def test_serve_refuses_a_bad_token_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
    mode: int,
    message: str,
) -> None:
    tokens = tmp_path / "tokens"
    if content is not None:
        write(tokens, content, mode)
    argv = ["serve", "--state-dir", str(tmp_path / "s"), "--token-file", str(tokens)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"api.token_file: {tokens}" in err and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "s").exists(), "nothing starts before the checks pass"


# -- [tls] and the data channel beyond the loopback ---------------------------------


def test_a_data_listener_beyond_the_loopback_needs_tls_or_says_it_is_insecure() -> None:
    beyond = {"data": {"listen": "0.0.0.0:7801"}}
    with pytest.raises(SettingsError) as info:
        Settings.load(flags=beyond)
    message = problems_of(info)["data.listen"]
    assert "cleartext" in message and "data.insecure" in message and "[tls]" in message
    # On the loopback, or said to be insecure, or with an identity: it starts.
    Settings.load(flags={"data": {"listen": "127.0.0.1:7801"}})
    Settings.load(flags={"data": {"listen": "[::1]:7801"}})
    Settings.load(flags={"data": {"listen": "0.0.0.0:7801", "insecure": True}})
    tls = {"cert_file": "/c.pem", "key_file": "/k.pem", "ca_file": "/ca.pem"}
    settings = Settings.load(flags={**beyond, "tls": tls})
    assert settings.tls is not None and settings.tls.ca_file == Path("/ca.pem")


def test_a_tls_identity_names_the_file_it_lacks(tmp_path: Path) -> None:
    config = write(tmp_path / "o.toml", '[tls]\ncert_file = "/c.pem"\nkey_file = "/k.pem"\n')
    with pytest.raises(SettingsError) as info:
        Settings.load(config_file=config)
    assert "tls.ca_file" in problems_of(info)


def test_every_tls_and_data_setting_is_documented() -> None:
    from orchestrator.settings import DataSettings, TlsSettings

    for model in (TlsSettings, DataSettings):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_serve_refuses_a_bad_role_token_file_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = write(tmp_path / "tokens", f"{A_TOKEN}\n")
    readers = write(tmp_path / "readers", "short\n")
    config = write(
        tmp_path / "orchestrator.toml",
        f'state_dir = "{tmp_path / "s"}"\n[api]\ntoken_file = "{tokens}"\n'
        f'read_token_file = "{readers}"\n',
    )
    assert cli.main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"api.read_token_file: {readers}: token 1 has fewer than 32 bytes" in err
    assert "Traceback" not in err

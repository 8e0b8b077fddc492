"""farm.config and farm.addresses: defaults, precedence, one-line errors, describe() round-trip."""

from __future__ import annotations

import datetime
import inspect
import os
from pathlib import Path
from typing import Any

import pytest

from farm.addresses import Address, parse_address
from farm.config import Config, ConfigError, SMTPSettings, load_config
from farm.smtp import SMTP

# --- addresses -----------------------------------------------------------------------------------

GOOD_ADDRESSES = [
    ("127.0.0.1:8025", Address("tcp", "127.0.0.1:8025", host="127.0.0.1", port=8025)),
    ("localhost:25", Address("tcp", "localhost:25", host="localhost", port=25)),
    ("mx.example.com:0", Address("tcp", "mx.example.com:0", host="mx.example.com", port=0)),
    ("0.0.0.0:65535", Address("tcp", "0.0.0.0:65535", host="0.0.0.0", port=65535)),
    ("[::1]:25", Address("tcp", "[::1]:25", host="::1", port=25)),
    ("[::]:587", Address("tcp", "[::]:587", host="::", port=587)),
    ("[2001:DB8:0::1]:25", Address("tcp", "[2001:db8::1]:25", host="2001:db8::1", port=25)),
    ("unix:/run/farm.sock", Address("unix", "unix:/run/farm.sock", path="/run/farm.sock")),
    ("unix:relative.sock", Address("unix", "unix:relative.sock", path="relative.sock")),
    ("fd://3", Address("fd", "fd://3", fd=3)),
    ("fd://007", Address("fd", "fd://7", fd=7)),
]


@pytest.mark.parametrize(("text", "expected"), GOOD_ADDRESSES)
def test_parse_good_address(text: str, expected: Address) -> None:
    address = parse_address(text)
    assert address == expected
    assert parse_address(str(address)) == address


EXPECTED_FORMS = "expected HOST:PORT, [IPv6]:PORT, unix:/path or fd://N"
BAD_ADDRESSES = [
    ("x", f"bad address 'x': {EXPECTED_FORMS}"),
    ("", f"bad address '': {EXPECTED_FORMS}"),
    (":25", f"bad address ':25': {EXPECTED_FORMS}"),
    ("host:", f"bad address 'host:': {EXPECTED_FORMS}"),
    ("host:http", f"bad address 'host:http': {EXPECTED_FORMS}"),
    ("host:-1", f"bad address 'host:-1': {EXPECTED_FORMS}"),
    ("host:65536", "bad address 'host:65536': port must be 0..65535"),
    ("::1:25", "bad address '::1:25': an IPv6 address must be bracketed, e.g. [::1]:25"),
    ("[::1:25", f"bad address '[::1:25': {EXPECTED_FORMS}"),
    ("[zz]:25", "bad address '[zz]:25': 'zz' is not an IPv6 address"),
    ("a b:25", "bad address 'a b:25': 'a b' is not a host name or IPv4 address"),
    ("unix:", "bad address 'unix:': empty socket path (expected unix:/path)"),
    ("fd://", "bad address 'fd://': expected fd://N with N a file descriptor number >= 0"),
    ("fd://-1", "bad address 'fd://-1': expected fd://N with N a file descriptor number >= 0"),
]


@pytest.mark.parametrize(("text", "message"), BAD_ADDRESSES)
def test_parse_bad_address(text: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_address(text)
    assert str(raised.value) == message


# --- defaults and precedence ---------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "farm.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.bind == (parse_address("127.0.0.1:8025"),)
    assert config.workers == (os.cpu_count() or 1)
    assert config.handler == "farm.handlers:Debugging"
    assert dict(config.handler_args) == {}
    assert (config.metrics, config.user, config.group, config.pidfile) == (None,) * 4
    assert (config.graceful_timeout, config.timeout, config.boot_timeout) == (30.0, 30.0, 30.0)
    assert config.uvloop is True
    assert (config.max_sessions, config.max_messages, config.max_messages_jitter) == (1000, 0, 0)
    assert (config.max_rss, config.log_level, config.log_file) == (0, "INFO", None)
    assert config.source is None
    assert config.smtp_kwargs() == {
        "hostname": None,
        "ident": None,
        "data_size_limit": 33554432,
        "enable_SMTPUTF8": True,
        "strict_smtputf8": True,
        "decode_data": False,
        "timeout": 300.0,
        "max_recipients": 1000,
        "command_call_limit": None,
        "pipelining": True,
        "enhanced_status_codes": True,
        "chunking": True,
        "dsn": False,
        "min_data_rate": 500.0,
        "tls_handshake_timeout": 30.0,
        "require_starttls": False,
        "auth_require_tls": True,
        "auth_failure_limit": 3,
        "unknown_command_limit": 5,
        "soft_error_limit": 10,
        "hard_error_limit": 20,
        "junk_command_limit": 100,
        "error_sleep_time": 1.0,
        "greeting_delay": 0.0,
        "forbid_unauth_pipelining": True,
        "proxy_protocol_timeout": None,
        "proxy_trusted_networks": None,
        "spool_threshold": 1048576,
        "spool_directory": None,
    }


def test_smtp_kwargs_are_engine_keywords() -> None:
    parameters = inspect.signature(SMTP).parameters
    # tls_cert/tls_key become the engine's tls_context.
    assert set(SMTPSettings.names()) - {"tls_cert", "tls_key"} <= set(parameters)
    config = Config(smtp={"command_call_limit": {"mail": 3}})
    SMTP(object(), **config.smtp_kwargs())  # accepted as is
    assert config.smtp_kwargs()["command_call_limit"] == {"MAIL": 3}


FILE = """\
bind = ["0.0.0.0:25", "[::]:25", "unix:/run/farm.sock"]
workers = 4
handler = "farm.handlers:Sink"
metrics = "127.0.0.1:9100"
graceful_timeout = 10
uvloop = false
log_level = "debug"

[handler_args]
path = "/var/mail"
depth = 2

[smtp]
hostname = "mx.example.com"
max_recipients = 50
"""


def test_file_values(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    config = load_config(path)
    assert [a.text for a in config.bind] == ["0.0.0.0:25", "[::]:25", "unix:/run/farm.sock"]
    assert config.workers == 4
    assert config.handler == "farm.handlers:Sink"
    assert config.metrics == parse_address("127.0.0.1:9100")
    assert config.graceful_timeout == 10.0
    assert isinstance(config.graceful_timeout, float)
    assert config.uvloop is False
    assert config.log_level == "DEBUG"
    assert dict(config.handler_args) == {"path": "/var/mail", "depth": 2}
    assert config.smtp.hostname == "mx.example.com"
    assert config.smtp.max_recipients == 50
    assert config.smtp.pipelining is True  # unspecified keys keep their defaults
    assert config.source == path


def test_overrides_win_and_none_means_not_given(tmp_path: Path) -> None:
    overrides = {
        "bind": ["127.0.0.1:2525"],
        "workers": 2,
        "uvloop": None,
        "metrics": None,
        "smtp.hostname": "cli.example.com",
        "smtp": {"max_recipients": 7, "timeout": None},
    }
    config = load_config(write(tmp_path, FILE), overrides)
    assert [a.text for a in config.bind] == ["127.0.0.1:2525"]  # replaces, not appends
    assert config.workers == 2
    assert config.uvloop is False
    assert config.metrics == parse_address("127.0.0.1:9100")
    assert config.smtp.hostname == "cli.example.com"
    assert config.smtp.max_recipients == 7
    assert config.smtp.timeout == 300.0


def test_overrides_without_file() -> None:
    config = load_config(None, {"bind": "[::1]:0", "workers": 1, "handler": None})
    assert config.bind == (parse_address("[::1]:0"),)
    assert config.handler == "farm.handlers:Debugging"


def test_override_fixes_a_bad_file_value(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = 0\n[smtp]\ntimeout = 0\n")
    config = load_config(path, {"workers": 3, "smtp.timeout": 5})
    assert (config.workers, config.smtp.timeout) == (3, 5.0)


def test_config_is_frozen_and_replace_validates() -> None:
    config = Config(workers=2)
    with pytest.raises(AttributeError):
        config.workers = 3  # type: ignore[misc]
    changed = config.replace(workers=5, bind=["unix:/tmp/s"], smtp={"hostname": "h"})
    assert (changed.workers, changed.bind[0].kind, changed.smtp.hostname) == (5, "unix", "h")
    assert changed.smtp.max_recipients == 1000
    assert config.workers == 2
    with pytest.raises(ConfigError, match=r"^workers: expected an integer >= 1, got 0$"):
        config.replace(workers=0)
    with pytest.raises(ConfigError, match=r"^unknown key 'wrokers' \(did you mean 'workers'\?\)$"):
        config.replace(wrokers=1)


def test_handler_args_are_read_only_copies() -> None:
    args: dict[str, Any] = {"a": {"b": [1]}}
    config = Config(handler_args=args)
    args["a"]["b"].append(2)
    assert config.handler_args == {"a": {"b": [1]}}
    with pytest.raises(TypeError):
        config.handler_args["x"] = 1  # type: ignore[index]


# --- errors: one line, naming the file and the key -----------------------------------------------

MODULE_ATTR = "expected MODULE:ATTR (e.g. farm.handlers:Debugging)"
CALLS = "smtp.command_call_limit"
BRACKETS = "bad address '::1:25': an IPv6 address must be bracketed, e.g. [::1]:25"
FILE_ERRORS = [
    ("wrokers = 2", "unknown key 'wrokers' (did you mean 'workers'?)"),
    ("colour = 'red'", "unknown key 'colour'"),
    ("[smtp]\nhostnam = 'x'", "unknown key 'smtp.hostnam' (did you mean 'smtp.hostname'?)"),
    ("smtp = 3", "smtp: expected a table, got 3"),
    ("workers = 'x'", "workers: expected an integer >= 1, got 'x'"),
    ("workers = 0", "workers: expected an integer >= 1, got 0"),
    ("workers = 1.5", "workers: expected an integer >= 1, got 1.5"),
    ("workers = true", "workers: expected an integer >= 1, got True"),
    ("max_messages = -1", "max_messages: expected an integer >= 0, got -1"),
    ("max_rss = '1G'", "max_rss: expected an integer >= 0, got '1G'"),
    ("uvloop = 'yes'", "uvloop: expected true or false, got 'yes'"),
    ("uvloop = 1", "uvloop: expected true or false, got 1"),
    ("graceful_timeout = 0", "graceful_timeout: expected a number > 0, got 0"),
    ("timeout = -2.5", "timeout: expected a number > 0, got -2.5"),
    ("boot_timeout = inf", "boot_timeout: expected a number > 0, got inf"),
    ("boot_timeout = true", "boot_timeout: expected a number > 0, got True"),
    ("user = 0", "user: expected a non-empty string, got 0"),
    ("pidfile = ''", "pidfile: expected a non-empty string, got ''"),
    ("log_level = 'loud'", "log_level: expected one of DEBUG, INFO, WARNING, ERROR, got 'loud'"),
    ("bind = []", "bind: expected a non-empty list of addresses, got []"),
    ("bind = 25", "bind: expected a non-empty list of addresses, got 25"),
    ("bind = ['x']", f"bind: bad address 'x': {EXPECTED_FORMS}"),
    ("bind = [25]", f"bind: bad address 25: expected a string ({EXPECTED_FORMS[9:]})"),
    ("bind = ['::1:25']", f"bind: {BRACKETS}"),
    ("bind = ['h:1', 'h:1']", "bind: duplicate address 'h:1'"),
    ("metrics = 'unix:/m'", "metrics: expected HOST:PORT or [IPv6]:PORT, got 'unix:/m'"),
    ("metrics = '9100'", f"metrics: bad address '9100': {EXPECTED_FORMS}"),
    ("handler = 'farm.handlers'", f"handler: {MODULE_ATTR}, got 'farm.handlers'"),
    ("handler = 'a:b:c'", f"handler: {MODULE_ATTR}, got 'a:b:c'"),
    ("handler = '1mod:X'", f"handler: {MODULE_ATTR}, got '1mod:X'"),
    ("handler_args = 3", "handler_args: expected a table, got 3"),
    ("[smtp]\ntimeout = 0", "smtp.timeout: expected a number > 0, got 0"),
    ("[smtp]\ndata_size_limit = -1", "smtp.data_size_limit: expected an integer >= 0, got -1"),
    ("[smtp]\npipelining = 'on'", "smtp.pipelining: expected true or false, got 'on'"),
    ("[smtp]\nmax_recipients = 0", "smtp.max_recipients: expected an integer >= 1, got 0"),
    ("[smtp]\nmin_data_rate = 0", "smtp.min_data_rate: expected a number > 0, got 0"),
    ("[smtp]\nhostname = 1", "smtp.hostname: expected a non-empty string, got 1"),
    (
        "[smtp]\ncommand_call_limit = 'x'",
        f"{CALLS}: expected an integer >= 1 or a table of them, got 'x'",
    ),
    ("[smtp]\ncommand_call_limit = {MAIL = 0}", f"{CALLS}.MAIL: expected an integer >= 1, got 0"),
    (
        "[smtp]\ncommand_call_limit = {'MAIL FROM' = 1}",
        f"{CALLS}: expected SMTP command names or '*', got 'MAIL FROM'",
    ),
]


@pytest.mark.parametrize(("text", "message"), FILE_ERRORS)
def test_file_error_is_one_line_naming_file_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value) == f"{path}: {message}"
    assert "\n" not in str(raised.value)


def test_error_key_attribute(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, "[smtp]\ntimeout = 'x'\n"))
    assert raised.value.key == "smtp.timeout"


def test_relative_file_name_is_reported_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "workers = 'x'\n")
    with pytest.raises(
        ConfigError, match=r"^farm\.toml: workers: expected an integer >= 1, got 'x'$"
    ):
        load_config("farm.toml")


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = 2\n\nbind = \n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value) == f"{path}: line 3: Invalid value (column 8)"


def test_toml_error_without_position(tmp_path: Path) -> None:
    path = write(tmp_path, 'handler = "unterminated')
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value) == f"{path}: Unterminated string (at end of document)"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "farm.toml"
    path.write_bytes(b"workers = 2\n# \xff\n")
    with pytest.raises(ConfigError, match=r": not UTF-8 text \(bad byte at offset 14\)$"):
        load_config(path)


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as raised:
        load_config("farm.toml")
    assert str(raised.value) == "cannot read farm.toml: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cannot read .*: Is a directory$"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"workers": 0}, "command line: workers: expected an integer >= 1, got 0"),
        ({"bind": ["nope"]}, f"command line: bind: bad address 'nope': {EXPECTED_FORMS}"),
        ({"smtp.timeout": -1}, "command line: smtp.timeout: expected a number > 0, got -1"),
        ({"wrokers": 1}, "command line: unknown key 'wrokers' (did you mean 'workers'?)"),
        ({"smtp.nope": 1}, "command line: unknown key 'smtp.nope'"),
    ],
)
def test_override_errors_name_the_command_line(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, "workers = 2\n"), overrides)
    assert str(raised.value) == message


def test_file_error_is_reported_even_with_other_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "[smtp]\ntimeout = 0\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, {"smtp.hostname": "h", "workers": 1})
    assert str(raised.value) == f"{path}: smtp.timeout: expected a number > 0, got 0"


# --- describe() ----------------------------------------------------------------------------------


def round_trip(tmp_path: Path, config: Config) -> Config:
    return load_config(write(tmp_path, config.describe(), "described.toml"))


def test_describe_defaults_round_trip(tmp_path: Path) -> None:
    config = Config()
    assert round_trip(tmp_path, config) == config


def test_describe_full_round_trip(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FILE)).replace(
        user="mail",
        group="mail",
        pidfile="/run/farm.pid",
        log_file="/var/log/farm.log",
        max_messages=10000,
        max_messages_jitter=500,
        max_rss=512,
        timeout=12.5,
        handler_args={
            "quoted": 'a "b" \\ c\n\t\x7f é',
            "dotted.key": [1, 2.5, True, "x", [], {}],
            "nested": {"deep": {"list": [{"a": 1}]}},
            "when": datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.UTC),
            "day": datetime.date(2024, 5, 1),
            "tiny": 1e-7,
            "": "empty key",
        },
        smtp={"ident": "ESMTP farm", "command_call_limit": {"*": 50, "mail": 5}},
    )
    again = round_trip(tmp_path, config)
    assert again == config
    assert again.describe().splitlines()[1:] == config.describe().splitlines()[1:]


def test_describe_mentions_unset_values_and_int_call_limit(tmp_path: Path) -> None:
    config = Config(smtp={"command_call_limit": 30})
    text = config.describe()
    assert "# metrics: not set" in text
    assert "# hostname: not set" in text
    assert "command_call_limit = 30" in text
    assert round_trip(tmp_path, config) == config


def test_tls_files_become_a_context(tmp_path: Any) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("farm.test")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    config = Config(smtp={"tls_cert": str(chain), "tls_key": str(key)})
    kwargs = config.smtp_kwargs()
    assert "tls_cert" not in kwargs
    assert kwargs["tls_context"].protocol is not None
    with pytest.raises(ConfigError, match=r"smtp\.tls_cert: expected a readable file"):
        Config(smtp={"tls_cert": str(tmp_path / "missing.pem")})


def test_proxy_networks_are_checked() -> None:
    config = Config(smtp={"proxy_protocol_timeout": 5, "proxy_trusted_networks": ["10.0.0.0/8"]})
    assert config.smtp_kwargs()["proxy_trusted_networks"] == ("10.0.0.0/8",)
    with pytest.raises(ConfigError, match="proxy_trusted_networks"):
        Config(smtp={"proxy_trusted_networks": ["not-a-network"]})


def test_proxy_protocol_needs_trusted_networks() -> None:
    with pytest.raises(ConfigError, match=r"smtp\.proxy_trusted_networks: required"):
        Config(smtp={"proxy_protocol_timeout": 5})


def test_stop_delay_defaults_to_0_and_is_checked(tmp_path: Path) -> None:
    assert Config().stop_delay == 0.0
    config = load_config(write(tmp_path, "stop_delay = 5\n"))
    assert config.stop_delay == 5.0 and isinstance(config.stop_delay, float)
    assert load_config(None, {"stop_delay": 2.5}).stop_delay == 2.5
    assert Config(stop_delay=0).stop_delay == 0.0
    for bad, shown in (("-1", "-1"), ("inf", "inf"), ("true", "True"), ("'2s'", "'2s'")):
        with pytest.raises(ConfigError, match=rf"stop_delay: expected a number >= 0, got {shown}"):
            load_config(write(tmp_path, f"stop_delay = {bad}\n"))
    assert "stop_delay = 5.0" in config.describe()


def test_stop_delay_command_line_flag() -> None:
    from farm.cli import build_parser, overrides_from

    args = build_parser().parse_args(["serve", "--stop-delay", "3"])
    assert load_config(None, overrides_from(args)).stop_delay == 3.0

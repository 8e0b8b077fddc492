"""The farm's configuration: one frozen, validated object built from TOML and command-line flags.

``load_config(path, overrides)`` reads ``farm.toml`` (top-level keys, a ``[handler_args]`` table of
keyword arguments for the handler class, and an ``[smtp]`` table of engine keywords), applies the
command-line flags on top (same key names; ``None`` means "flag not given") and returns a
:class:`Config`.

Stored types: ``bind`` is a tuple of :class:`~farm.addresses.Address` (never empty, no
duplicates), ``metrics`` an ``Address`` of kind ``tcp`` or ``None``, ``handler_args`` a read-only
mapping, ``smtp`` an :class:`SMTPSettings`. Constructing either dataclass validates and normalises
every field (address strings are parsed, ints accepted where floats are expected, log levels
upper-cased), so a ``Config`` object is always valid; a bad value raises :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import ipaddress
import json
import math
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from farm.addresses import Address, parse_address
from farm.limits import DEFAULT_EXEMPT, DEFAULT_IPV6_PREFIX, ClientLimits
from farm.resolver import parse_nameserver
from farm.scan.milter import parse_milter_address
from farm.screening.sites import parse_site
from farm.smtp.settings import DEFAULTS as _ENGINE

__all__ = [
    "LOG_LEVELS",
    "AuthenticationSettings",
    "Config",
    "ConfigError",
    "LimitSettings",
    "SMTPSettings",
    "ScanSettings",
    "ScreeningSettings",
    "load_config",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
COMMAND_LINE = "command line"
DEFAULT_BIND = (parse_address("127.0.0.1:8025"),)

Check = Callable[[str, Any], Any]


class ConfigError(Exception):
    """A configuration problem, as one line naming the file (if any) and the key.

    ``key`` is the dotted key at fault (``"workers"``, ``"smtp.timeout"``) or ``None``.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key

    def located(self, where: str | None) -> ConfigError:
        """The same error prefixed with ``where`` (a file name or "command line")."""
        return ConfigError(f"{where}: {self}" if where else str(self), self.key)


# --- value checks: each takes (dotted key, value) and returns the normalised value ---------------


def _expected(key: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {what}, got {value!r}", key)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(minimum: int) -> Check:
    def check(key: str, value: Any) -> int:
        if not _is_int(value) or value < minimum:
            raise _expected(key, f"an integer >= {minimum}", value)
        return value

    return check


def _positive_number(key: str, value: Any) -> float:
    number_like = _is_int(value) or isinstance(value, float)
    if not number_like or not math.isfinite(value) or value <= 0:
        raise _expected(key, "a number > 0", value)
    return float(value)


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _expected(key, "true or false", value)
    return value


def _optional_string(key: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise _expected(key, "a non-empty string", value)
    return value


def _non_negative_number(key: str, value: Any) -> float:
    number_like = _is_int(value) or isinstance(value, float)
    if not number_like or not math.isfinite(value) or value < 0:
        raise _expected(key, "a number >= 0", value)
    return float(value)


def _optional_positive(key: str, value: Any) -> float | None:
    return None if value is None else _positive_number(key, value)


def _readable_file(key: str, value: Any) -> str | None:
    value = _optional_string(key, value)
    if value is not None and not os.access(value, os.R_OK):
        raise _expected(key, "a readable file", value)
    return value


def _directory(key: str, value: Any) -> str | None:
    value = _optional_string(key, value)
    if value is not None and not os.path.isdir(value):
        raise _expected(key, "an existing directory", value)
    return value


def _networks(key: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _expected(key, 'a list of networks like "10.0.0.0/8"', value)
    for item in value:
        try:
            ipaddress.ip_network(str(item), strict=False)
        except ValueError:
            raise _expected(key, 'a list of networks like "10.0.0.0/8"', item) from None
    return tuple(str(item) for item in value)


def _address(key: str, value: Any) -> Address:
    if isinstance(value, Address):
        return value
    try:
        return parse_address(value)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}", key) from None


def _bind(key: str, value: Any) -> tuple[Address, ...]:
    if isinstance(value, str | Address):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise _expected(key, "a non-empty list of addresses", value)
    addresses = tuple(_address(key, item) for item in value)
    seen: set[str] = set()
    for address in addresses:
        if address.text in seen:
            raise ConfigError(f"{key}: duplicate address {address.text!r}", key)
        seen.add(address.text)
    return addresses


def _tls_bind(key: str, value: Any) -> tuple[Address, ...]:
    if value is None or value == [] or value == ():
        return ()
    return _bind(key, value)


def _metrics(key: str, value: Any) -> Address | None:
    if value is None:
        return None
    address = _address(key, value)
    if address.kind != "tcp":
        raise _expected(key, "HOST:PORT or [IPv6]:PORT", address.text)
    return address


_HANDLER = re.compile(r"[^\W\d]\w*(?:\.[^\W\d]\w*)*:[^\W\d]\w*(?:\.[^\W\d]\w*)*")


def _handler(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _HANDLER.fullmatch(value):
        raise _expected(key, "MODULE:ATTR (e.g. farm.handlers:Debugging)", value)
    return value


def _log_level(key: str, value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise _expected(key, f"one of {', '.join(LOG_LEVELS)}", value)
    return value.upper()


def _ipv6_prefix(key: str, value: Any) -> int:
    if not _is_int(value) or not 1 <= value <= 128:
        raise _expected(key, "an integer from 1 to 128", value)
    return int(value)


def _log_format(key: str, value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_FORMATS:
        raise _expected(key, f"one of {', '.join(LOG_FORMATS)}", value)
    return value.lower()


_TOML_SCALARS = (str, int, float, bool, datetime.date, datetime.time)


def _toml_data(key: str, value: Any) -> Any:
    """Check ``value`` is representable in TOML; return a deep copy with plain lists and dicts."""
    if isinstance(value, Mapping):
        return {k: _toml_data(f"{key}.{k}", v) for k, v in _string_keys(key, value).items()}
    if isinstance(value, list | tuple):
        return [_toml_data(key, item) for item in value]
    if isinstance(value, _TOML_SCALARS):
        return value
    raise _expected(key, "a TOML value", value)


def _string_keys(key: str, table: Mapping[Any, Any]) -> Mapping[str, Any]:
    for name in table:
        if not isinstance(name, str):
            raise ConfigError(f"{key}: keys must be strings, got {name!r}", key)
    return table


def _handler_args(key: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _expected(key, "a table", value)
    return MappingProxyType(_toml_data(key, value))


_VERB = re.compile(r"\*|[A-Za-z]+")


def _call_limit(key: str, value: Any) -> int | Mapping[str, int] | None:
    if value is None:
        return None
    if _is_int(value):
        return _integer(1)(key, value)
    if not isinstance(value, Mapping):
        raise _expected(key, "an integer >= 1 or a table of them", value)
    limits: dict[str, int] = {}
    for verb, limit in value.items():
        if not isinstance(verb, str) or not _VERB.fullmatch(verb):
            raise ConfigError(f"{key}: expected SMTP command names or '*', got {verb!r}", key)
        limits[verb.upper()] = _integer(1)(f"{key}.{verb}", limit)
    return MappingProxyType(limits)


def _settings_table(cls: type) -> Check:
    """The check of a sub-table (``[smtp]``, ``[limits]``): a mapping of ``cls``'s names."""

    def check(key: str, value: Any) -> Any:
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise _expected(key, "a table", value)
        _reject_unknown(value, cls.names(), f"{key}.")  # type: ignore[attr-defined]
        return cls(**value)

    return check


def _nameservers(key: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise _expected(key, 'a list of nameservers like "127.0.0.1:53"', value)
    for item in value:
        try:
            parse_nameserver(item)
        except ValueError as error:
            raise ConfigError(f"{key}: {error}", key) from None
    return tuple(str(item) for item in value)


def _sites(default_weight: int) -> Check:
    def check(key: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise _expected(key, 'a list of "domain[=filter][*weight]"', value)
        for item in value:
            try:
                parse_site(item, default_weight)
            except ValueError as error:
                raise ConfigError(f"{key}: {error}", key) from None
        return tuple(str(item).strip() for item in value)

    return check


def _one_of(*choices: str) -> Check:
    def check(key: str, value: Any) -> str:
        if value not in choices:
            raise _expected(key, "one of " + ", ".join(choices), value)
        return value  # type: ignore[no-any-return]

    return check


def _network_list(key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        raise _expected(key, 'a list of networks like "10.0.0.0/8"', value)
    return _networks(key, value) or ()


# --- the dataclasses -----------------------------------------------------------------------------


def _checked(check: Check) -> dict[str, Check]:
    """Field metadata: the check that validates and normalises the field."""
    return {"check": check}


def _validate(obj: Any, prefix: str) -> None:
    for spec in fields(obj):
        check = spec.metadata.get("check")
        if check is not None:
            object.__setattr__(obj, spec.name, check(prefix + spec.name, getattr(obj, spec.name)))


#: ``SMTPSettings.as_kwargs``: load the TLS context from the files (no context given).
_LOAD = object()


def _empty_table() -> Mapping[str, Any]:
    return MappingProxyType({})


def _cpu_count() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class SMTPSettings:
    """The ``[smtp]`` table: keyword arguments for ``farm.smtp.SMTP``."""

    hostname: str | None = field(default=_ENGINE.hostname, metadata=_checked(_optional_string))
    ident: str | None = field(default=_ENGINE.ident, metadata=_checked(_optional_string))
    data_size_limit: int = field(default=_ENGINE.data_size_limit, metadata=_checked(_integer(0)))
    #: Override: internationalised addresses are accepted (aiosmtpd's default is off).
    enable_SMTPUTF8: bool = field(default=True, metadata=_checked(_boolean))
    #: Override: a non-ASCII address must be valid UTF-8 and declared with SMTPUTF8 (500 5.5.2,
    #: 553 5.6.7), so that no undeclared or broken address reaches the mailbox server.
    strict_smtputf8: bool = field(default=True, metadata=_checked(_boolean))
    decode_data: bool = field(default=_ENGINE.decode_data, metadata=_checked(_boolean))
    timeout: float = field(default=_ENGINE.timeout, metadata=_checked(_positive_number))
    max_recipients: int = field(default=_ENGINE.max_recipients, metadata=_checked(_integer(1)))
    command_call_limit: int | Mapping[str, int] | None = field(
        default=_ENGINE.command_call_limit, metadata=_checked(_call_limit)
    )
    #: Override: PIPELINING is offered (RFC 2920; every MTA sends it).
    pipelining: bool = field(default=True, metadata=_checked(_boolean))
    #: Override: replies carry RFC 3463 enhanced status codes, as Postfix's do.
    enhanced_status_codes: bool = field(default=True, metadata=_checked(_boolean))
    #: Override: CHUNKING/BDAT is offered (RFC 3030).
    chunking: bool = field(default=True, metadata=_checked(_boolean))
    dsn: bool = field(default=_ENGINE.dsn, metadata=_checked(_boolean))
    min_data_rate: float = field(default=_ENGINE.min_data_rate, metadata=_checked(_positive_number))
    #: PEM certificate chain and key: STARTTLS is offered when both are set.
    tls_cert: str | None = field(default=None, metadata=_checked(_readable_file))
    tls_key: str | None = field(default=None, metadata=_checked(_readable_file))
    tls_handshake_timeout: float = field(
        default=_ENGINE.tls_handshake_timeout, metadata=_checked(_positive_number)
    )
    require_starttls: bool = field(default=_ENGINE.require_starttls, metadata=_checked(_boolean))
    auth_require_tls: bool = field(default=_ENGINE.auth_require_tls, metadata=_checked(_boolean))
    auth_failure_limit: int = field(
        default=_ENGINE.auth_failure_limit, metadata=_checked(_integer(1))
    )
    unknown_command_limit: int = field(
        default=_ENGINE.unknown_command_limit, metadata=_checked(_integer(1))
    )
    #: Overrides: Postfix's error limits and their defaults (farm.smtp.error_limits; the
    #: engine's default is 0, off, as aiosmtpd has none); 0 switches one off.
    soft_error_limit: int = field(default=10, metadata=_checked(_integer(0)))
    hard_error_limit: int = field(default=20, metadata=_checked(_integer(0)))
    junk_command_limit: int = field(default=100, metadata=_checked(_integer(0)))
    error_sleep_time: float = field(
        default=_ENGINE.error_sleep_time, metadata=_checked(_non_negative_number)
    )
    #: Seconds the client must stay silent before the 220 (0: greet at once); talkers: 554.
    greeting_delay: float = field(
        default=_ENGINE.greeting_delay, metadata=_checked(_non_negative_number)
    )
    #: Override: a client that sends on before a reply it must wait for gets 554 5.5.0 (as
    #: Postfix 3.9's smtpd_forbid_unauth_pipelining default): bots that blast a dialogue.
    forbid_unauth_pipelining: bool = field(default=True, metadata=_checked(_boolean))
    proxy_protocol_timeout: float | None = field(
        default=_ENGINE.proxy_protocol_timeout, metadata=_checked(_optional_positive)
    )
    proxy_trusted_networks: tuple[str, ...] | None = field(
        default=_ENGINE.proxy_trusted_networks, metadata=_checked(_networks)
    )
    #: Message bodies larger than this (octets) are spooled to an unlinked file (0: all).
    spool_threshold: int = field(default=_ENGINE.spool_threshold, metadata=_checked(_integer(0)))
    #: Where spool files live (default: the system's temporary directory); on disk, not tmpfs.
    spool_directory: str | None = field(
        default=_ENGINE.spool_directory, metadata=_checked(_directory)
    )

    def __post_init__(self) -> None:
        _validate(self, "smtp.")
        if self.proxy_protocol_timeout and self.proxy_trusted_networks is None:
            # Otherwise any client could claim any source address in a PROXY header.
            raise ConfigError(
                "smtp.proxy_trusted_networks: required with proxy_protocol_timeout "
                '(the proxies\' networks, e.g. ["10.0.0.0/8"])',
                "smtp.proxy_trusted_networks",
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The names accepted in the ``[smtp]`` table."""
        return tuple(spec.name for spec in fields(cls))

    def tls_context(self) -> ssl.SSLContext | None:
        """The server's SSL context from ``tls_cert``/``tls_key`` (None without a certificate).

        The farm's supervisor builds it before any privilege is dropped, and again at each
        reload, so a key only root can read works; a key that cannot be loaded is a
        :class:`ConfigError` naming ``smtp.tls_key``.
        """
        if not self.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as error:
            reason = getattr(error, "strerror", None) or getattr(error, "reason", None) or error
            raise ConfigError(
                f"smtp.tls_key: cannot load {self.tls_cert} with {self.tls_key or 'its key'}: "
                f"{reason}",
                "smtp.tls_key",
            ) from None
        return context

    def as_kwargs(self, tls_context: ssl.SSLContext | object | None = _LOAD) -> dict[str, Any]:
        """Keyword arguments for ``farm.smtp.SMTP(handler, **kwargs)``.

        ``tls_cert``/``tls_key`` become a ``tls_context``: the one given (the farm's workers get
        the supervisor's), else loaded here by :meth:`tls_context`.
        """
        kwargs = {name: getattr(self, name) for name in self.names()}
        if isinstance(self.command_call_limit, Mapping):
            kwargs["command_call_limit"] = dict(self.command_call_limit)
        del kwargs["tls_cert"], kwargs["tls_key"]
        context = self.tls_context() if tls_context is _LOAD else tls_context
        if context is not None:
            kwargs["tls_context"] = context
        return kwargs

    def replace(self, **changes: Any) -> SMTPSettings:
        """A validated copy with ``changes`` applied."""
        _reject_unknown(changes, self.names(), "smtp.")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class LimitSettings:
    """The ``[limits]`` table: per-client-IP limits held across all workers (farm.limits)."""

    #: Concurrent sessions from one client address (0: no limit).
    sessions_per_ip: int = field(default=50, metadata=_checked(_integer(0)))
    #: Messages (MAIL commands) per ``interval`` from one client address (0: no limit).
    messages_per_ip: int = field(default=0, metadata=_checked(_integer(0)))
    #: Failed AUTH attempts per ``interval`` from one client address (0: no limit).
    auth_failures_per_ip: int = field(default=0, metadata=_checked(_integer(0)))
    interval: float = field(default=60.0, metadata=_checked(_positive_number))
    #: Client networks never limited (loopback by default).
    exempt_networks: tuple[str, ...] = field(
        default=DEFAULT_EXEMPT, metadata=_checked(_network_list)
    )
    #: IPv6 clients are counted per network of this many bits (1-128; 128: per address).
    ipv6_prefix: int = field(default=DEFAULT_IPV6_PREFIX, metadata=_checked(_ipv6_prefix))

    def __post_init__(self) -> None:
        _validate(self, "limits.")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The names accepted in the ``[limits]`` table."""
        return tuple(spec.name for spec in fields(cls))

    def replace(self, **changes: Any) -> LimitSettings:
        _reject_unknown(changes, self.names(), "limits.")
        return dataclasses.replace(self, **changes)

    def client_limits(self) -> ClientLimits:
        return ClientLimits(**{name: getattr(self, name) for name in self.names()})


def _rspamd_url(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"http://[^/\s]+(?::\d+)?/?", value):
        raise _expected(key, 'an URL like "http://127.0.0.1:11333"', value)
    return value


def _milters(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise _expected(key, 'a list like ["inet:127.0.0.1:11332", "unix:/run/milter.sock"]', value)
    for item in value:
        try:
            parse_milter_address(item if isinstance(item, str) else repr(item))
        except ValueError as error:
            raise ConfigError(f"{key}: {error}", key) from None
    return tuple(value)


def _on_error(key: str, value: Any) -> str:
    if value not in ("tempfail", "accept"):
        raise _expected(key, '"tempfail" or "accept"', value)
    return value


@dataclass(frozen=True)
class ScanSettings:
    """The ``[scan]`` table: rspamd and milters asked about every message (farm.scan)."""

    #: rspamd's normal worker (its HTTP /checkv2 protocol); unset: not asked.
    rspamd: str | None = field(default=None, metadata=_checked(_rspamd_url))
    #: Milters in Postfix's smtpd_milters syntax, asked in this order after rspamd.
    milters: tuple[str, ...] = field(default=(), metadata=_checked(_milters))
    #: Seconds per message for all scanners together.
    timeout: float = field(default=30.0, metadata=_checked(_positive_number))
    #: What a failed scanner means: "tempfail" (451 4.7.1) or "accept" (as if not asked).
    on_error: str = field(default="tempfail", metadata=_checked(_on_error))
    #: Larger messages are not scanned (counted, and a header says so).
    max_size: int = field(default=20971520, metadata=_checked(_integer(1)))

    def __post_init__(self) -> None:
        _validate(self, "scan.")

    @property
    def active(self) -> bool:
        return bool(self.rspamd or self.milters)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The names accepted in the ``[scan]`` table."""
        return tuple(spec.name for spec in fields(cls))

    def replace(self, **changes: Any) -> ScanSettings:
        _reject_unknown(changes, self.names(), "scan.")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ScreeningSettings:
    """The ``[screening]`` table: DNS block/allow lists checked at connection (postscreen)."""

    #: Nameservers ``HOST:PORT`` (None: /etc/resolv.conf).
    resolver: tuple[str, ...] | None = field(default=None, metadata=_checked(_nameservers))
    #: ``domain[=filter][*weight]`` entries (default weight 1).
    dnsbl: tuple[str, ...] = field(default=(), metadata=_checked(_sites(1)))
    #: Allow lists: the same syntax, default weight -1.
    dnswl: tuple[str, ...] = field(default=(), metadata=_checked(_sites(-1)))
    #: The score at which a client is listed.
    threshold: int = field(default=1, metadata=_checked(_integer(1)))
    action: str = field(default="ignore", metadata=_checked(_one_of("enforce", "drop", "ignore")))
    #: Seconds for all lookups of one client.
    timeout: float = field(default=2.0, metadata=_checked(_positive_number))
    #: Verdicts the farm-wide cache holds.
    cache_size: int = field(default=65536, metadata=_checked(_integer(16)))
    min_ttl: float = field(default=60.0, metadata=_checked(_non_negative_number))
    max_ttl: float = field(default=3600.0, metadata=_checked(_positive_number))

    def __post_init__(self) -> None:
        _validate(self, "screening.")
        if len(self.dnsbl) + len(self.dnswl) > 64:
            raise ConfigError("screening: at most 64 lists in dnsbl and dnswl", "screening")
        if self.min_ttl > self.max_ttl:
            raise ConfigError("screening.min_ttl: more than max_ttl", "screening.min_ttl")

    @property
    def active(self) -> bool:
        return bool(self.dnsbl or self.dnswl)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(spec.name for spec in fields(cls))

    def replace(self, **changes: Any) -> ScreeningSettings:
        _reject_unknown(changes, self.names(), "screening.")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class AuthenticationSettings:
    """The ``[authentication]`` table: SPF, DKIM, ARC, DMARC into Authentication-Results."""

    #: The name in our Authentication-Results header (None: ``[smtp] hostname``).
    authserv_id: str | None = field(default=None, metadata=_checked(_optional_string))
    #: Nameservers ``HOST:PORT`` (None: ``[screening] resolver``, else /etc/resolv.conf).
    resolver: tuple[str, ...] | None = field(default=None, metadata=_checked(_nameservers))
    spf: bool = field(default=False, metadata=_checked(_boolean))
    dkim: bool = field(default=False, metadata=_checked(_boolean))
    arc: bool = field(default=False, metadata=_checked(_boolean))
    dmarc: str = field(default="off", metadata=_checked(_one_of("off", "report", "enforce")))
    #: Refuse an SPF ``fail`` at MAIL (550 5.7.23).
    spf_reject_fail: bool = field(default=False, metadata=_checked(_boolean))
    #: Seconds for the checks of one message (then temperror).
    timeout: float = field(default=5.0, metadata=_checked(_positive_number))
    #: Threads per worker verifying signatures.
    threads: int = field(default=2, metadata=_checked(_integer(1)))

    def __post_init__(self) -> None:
        _validate(self, "authentication.")
        if self.dmarc != "off" and not (self.spf and self.dkim):
            raise ConfigError(
                "authentication.dmarc: needs spf = true and dkim = true (DMARC uses both)",
                "authentication.dmarc",
            )
        if self.spf_reject_fail and not self.spf:
            raise ConfigError(
                "authentication.spf_reject_fail: needs spf = true",
                "authentication.spf_reject_fail",
            )

    @property
    def active(self) -> bool:
        return bool(self.spf or self.dkim or self.arc)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(spec.name for spec in fields(cls))

    def replace(self, **changes: Any) -> AuthenticationSettings:
        _reject_unknown(changes, self.names(), "authentication.")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Config:
    """The farm's effective configuration (see the module docstring for stored types)."""

    bind: tuple[Address, ...] = field(default=DEFAULT_BIND, metadata=_checked(_bind))
    #: Listeners that speak TLS from the first byte (SMTPS, port 465 style).
    tls_bind: tuple[Address, ...] = field(default=(), metadata=_checked(_tls_bind))
    workers: int = field(default_factory=_cpu_count, metadata=_checked(_integer(1)))
    handler: str = field(default="farm.handlers:Debugging", metadata=_checked(_handler))
    handler_args: Mapping[str, Any] = field(
        default_factory=_empty_table, metadata=_checked(_handler_args)
    )
    metrics: Address | None = field(default=None, metadata=_checked(_metrics))
    user: str | None = field(default=None, metadata=_checked(_optional_string))
    group: str | None = field(default=None, metadata=_checked(_optional_string))
    pidfile: str | None = field(default=None, metadata=_checked(_optional_string))
    graceful_timeout: float = field(default=30.0, metadata=_checked(_positive_number))
    #: Seconds a SIGTERM keeps serving with /ready at 503 (for a load balancer) before the drain.
    stop_delay: float = field(default=0.0, metadata=_checked(_non_negative_number))
    timeout: float = field(default=30.0, metadata=_checked(_positive_number))
    boot_timeout: float = field(default=30.0, metadata=_checked(_positive_number))
    uvloop: bool = field(default=True, metadata=_checked(_boolean))
    max_sessions: int = field(default=1000, metadata=_checked(_integer(1)))
    max_messages: int = field(default=0, metadata=_checked(_integer(0)))
    max_messages_jitter: int = field(default=0, metadata=_checked(_integer(0)))
    max_rss: int = field(default=0, metadata=_checked(_integer(0)))
    #: MiB of message bodies a worker holds in memory at once; past it, 452 4.3.1 (0: no limit).
    body_memory_limit: int = field(default=128, metadata=_checked(_integer(0)))
    log_level: str = field(default="INFO", metadata=_checked(_log_level))
    log_file: str | None = field(default=None, metadata=_checked(_optional_string))
    #: ``text`` (key=value lines) or ``json`` (one object per line, for log shippers).
    log_format: str = field(default="text", metadata=_checked(_log_format))
    smtp: SMTPSettings = field(
        default_factory=SMTPSettings, metadata=_checked(_settings_table(SMTPSettings))
    )
    limits: LimitSettings = field(
        default_factory=LimitSettings, metadata=_checked(_settings_table(LimitSettings))
    )
    screening: ScreeningSettings = field(
        default_factory=ScreeningSettings, metadata=_checked(_settings_table(ScreeningSettings))
    )
    authentication: AuthenticationSettings = field(
        default_factory=AuthenticationSettings,
        metadata=_checked(_settings_table(AuthenticationSettings)),
    )
    scan: ScanSettings = field(
        default_factory=ScanSettings, metadata=_checked(_settings_table(ScanSettings))
    )
    #: The file this configuration was read from (not compared, not a TOML key).
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _validate(self, "")
        if self.group is not None and self.user is None:
            # drop_privileges would change the gid only: the workers would still run as root.
            raise ConfigError("group: needs user as well (a group alone keeps uid 0)", "group")
        if self.tls_bind and not (self.smtp.tls_cert and self.smtp.tls_key):
            raise ConfigError("tls_bind: needs smtp.tls_cert and smtp.tls_key", "tls_bind")
        both = {a.text for a in self.bind} & {a.text for a in self.tls_bind}
        if both:
            raise ConfigError(f"tls_bind: {sorted(both)[0]!r} is in bind too", "tls_bind")

    def listen_addresses(self) -> tuple[Address, ...]:
        """Every address to listen on: ``bind`` then ``tls_bind``."""
        return self.bind + self.tls_bind

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The names accepted at the top level of ``farm.toml``."""
        return tuple(spec.name for spec in fields(cls) if spec.name != "source")

    def smtp_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``farm.smtp.SMTP(handler, **config.smtp_kwargs())``."""
        return self.smtp.as_kwargs()

    def replace(self, **changes: Any) -> Config:
        """A validated copy with ``changes`` applied (``smtp`` may be a partial mapping)."""
        _reject_unknown(changes, (*self.names(), "source"), "")
        for name in _TABLES:
            if isinstance(changes.get(name), Mapping):
                changes[name] = getattr(self, name).replace(**changes[name])
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (addresses as text, tables as dicts, ``None`` kept), without ``source``."""
        data = {name: _plain(getattr(self, name)) for name in self.names()}
        for name, table in _TABLES.items():
            settings = getattr(self, name)
            data[name] = {key: _plain(getattr(settings, key)) for key in table.names()}
        return data

    def describe(self) -> str:
        """The effective configuration as TOML text that ``load_config`` reads back equal."""
        data = self.as_dict()
        tables = {name: data.pop(name) for name in _TABLES}
        handler_args = data.pop("handler_args")
        lines = [f"# farm: effective configuration ({self.source or 'no file'})"]
        lines += _toml_lines(data)
        lines += ["", "[handler_args]", *_toml_lines(handler_args)]
        for name, table in tables.items():
            lines += ["", f"[{name}]", *_toml_lines(table)]
        return "\n".join(lines) + "\n"


#: The sub-tables of farm.toml that hold settings objects.
_TABLES: dict[str, Any] = {
    "smtp": SMTPSettings,
    "limits": LimitSettings,
    "screening": ScreeningSettings,
    "authentication": AuthenticationSettings,
    "scan": ScanSettings,
}


def _reject_unknown(table: Mapping[str, Any], known: tuple[str, ...], prefix: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(_unknown_message(str(key), known, prefix), f"{prefix}{key}")


def _unknown_message(key: str, known: tuple[str, ...], prefix: str) -> str:
    message = f"unknown key {prefix + key!r}"
    close = difflib.get_close_matches(key, known, n=1)
    return f"{message} (did you mean {prefix + close[0]!r}?)" if close else message


# --- loading -------------------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Read ``path`` (TOML) if given, apply ``overrides`` (CLI flags), validate, return a Config.

    ``overrides`` uses the TOML key names; a ``None`` value means "not given". ``smtp`` may be a
    mapping merged into the file's ``[smtp]`` table, or use dotted keys (``"smtp.hostname"``).
    Any other key replaces the file's value outright (``bind`` included).
    """
    where = os.fspath(path) if path is not None else None
    table = _read_toml(where) if where is not None else {}
    _check_table(table, where)
    table, given = _apply_overrides(table, overrides or {})
    try:
        return Config(**table, source=where)
    except ConfigError as error:
        raise error.located(COMMAND_LINE if _from(error.key, given) else where) from None


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {error.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: {_syntax_message(error)}") from None


_AT_LINE = re.compile(r"(?P<message>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)")


def _syntax_message(error: tomllib.TOMLDecodeError) -> str:
    text = " ".join(str(error).split())
    match = _AT_LINE.fullmatch(text)
    if match is None:
        return text
    return f"line {match['line']}: {match['message']} (column {match['column']})"


def _check_table(table: Mapping[str, Any], where: str | None) -> None:
    """Reject unknown keys and a non-table ``[smtp]``/``[limits]`` before merging into them."""
    try:
        _reject_unknown(table, Config.names(), "")
        for name, settings in _TABLES.items():
            section = table.get(name, {})
            if not isinstance(section, Mapping):
                raise _expected(name, "a table", section)
            _reject_unknown(section, settings.names(), f"{name}.")
    except ConfigError as error:
        raise error.located(where) from None


def _apply_overrides(
    table: Mapping[str, Any], overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], set[str]]:
    """Merge ``overrides`` into a copy of ``table``; return it and the dotted keys overridden."""
    merged = dict(table)
    sections = {name: dict(merged.get(name, {})) for name in _TABLES}
    given: set[str] = set()
    for key, value in _flatten(overrides):
        if value is None:
            continue
        given.add(key)
        name, dot, rest = key.partition(".")
        if dot and name in sections:
            sections[name][rest] = value
        else:
            merged[key] = value
    try:
        _reject_unknown(merged, Config.names(), "")
        for name, settings in _TABLES.items():
            _reject_unknown(sections[name], settings.names(), f"{name}.")
    except ConfigError as error:
        raise error.located(COMMAND_LINE) from None
    for name, section in sections.items():
        if section and name not in given:
            merged[name] = section
    return merged, given


def _flatten(overrides: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``{"smtp": {"hostname": h}}`` and ``{"smtp.hostname": h}`` both give ``smtp.hostname``."""
    items: list[tuple[str, Any]] = []
    for key, value in overrides.items():
        if key in _TABLES and isinstance(value, Mapping):
            items += [(f"{key}.{name}", item) for name, item in value.items()]
        else:
            items.append((key, value))
    return items


def _from(key: str | None, given: set[str]) -> bool:
    """Whether ``key`` (or a table containing it) came from the overrides."""
    parts = (key or "").split(".")
    return any(".".join(parts[:n]) in given for n in range(1, len(parts) + 1))


# --- TOML output ---------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, Address):
        return value.text
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _toml_lines(table: Mapping[str, Any]) -> list[str]:
    return [
        f"# {key}: not set" if value is None else f"{_toml_key(key)} = {_toml_value(value)}"
        for key, value in table.items()
    ]


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _toml_float(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return f"{{ {items} }}" if items else "{}"
    return "[" + ", ".join(_toml_value(item) for item in value) + "]"


def _toml_float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)

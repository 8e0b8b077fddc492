"""Per-client-IP limits, counted like Postfix's anvil(8): concurrent sessions, a message rate and
an AUTH-failure rate per client address.

:class:`Anvil` holds the counters (no I/O, an injectable clock). Rates are token buckets: a
client may send ``messages_per_ip`` messages at once, then one more each ``interval /
messages_per_ip`` seconds; AUTH failures likewise. :class:`LocalLimiter` puts an Anvil behind
the engine's ``limiter`` interface for one process (a Controller); a farm keeps the same
counters in a table in shared memory that every worker updates itself, so that the limits hold
across all workers (``farm.supervisor.anvil``).

The engine (``farm.smtp.SMTP(limiter=...)``) asks at these points, for the client address
(the PROXY header's source when the proxy is trusted, else the peer):

* before the greeting: ``open_session`` (refused: ``421 4.7.0 <host> Error: too many
  connections from <ip>``, then close); ``close_session`` when the connection ends;
* at ``MAIL``: ``count_message`` (refused: ``450 4.7.1 Error: too much mail from <ip>``);
* at ``AUTH``: ``auth_allowed`` takes one attempt from the allowance (refused: ``454 4.7.0
  Error: too many AUTH failures from <ip>``); a successful one is given back with
  ``auth_succeeded``, so the allowance counts failures.

Clients in ``exempt_networks`` (loopback by default, as Postfix exempts ``$mynetworks``) are
never counted; ``key`` returns None for them and the engine skips every check. IPv6 clients are
counted per network of ``ipv6_prefix`` bits (64 by default): a host that owns a /64 has 2**64
addresses to pick from, so one per address would be no limit at all.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from farm.proxy_protocol import V2_CMD
from farm.smtp.limiter import (
    too_many_auth_failures,
    too_many_connections,
    too_much_mail,
)

__all__ = [
    "Anvil",
    "ClientLimits",
    "Limiter",
    "LocalLimiter",
    "client_address",
    "session_key",
    "too_many_auth_failures",
    "too_many_connections",
    "too_much_mail",
    "unmapped",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_EXEMPT = ("127.0.0.0/8", "::1/128")
#: The key shared by sessions whose PROXY header carried no usable source address.
UNKNOWN_CLIENT = "unknown"
DEFAULT_IPV6_PREFIX = 64
#: Addresses whose key a limiter remembers (then it forgets them all and starts again).
KEY_CACHE = 4096
#: The Anvil forgets idle clients in a sweep at most this often (seconds).
SWEEP_INTERVAL = 10.0


@dataclass(frozen=True)
class ClientLimits:
    """The limits; 0 switches one off."""

    #: Concurrent sessions from one address.
    sessions_per_ip: int = 50
    #: Messages (MAIL commands) per ``interval`` from one address.
    messages_per_ip: int = 0
    #: Failed AUTH attempts per ``interval`` from one address.
    auth_failures_per_ip: int = 0
    #: The time unit of the rates, in seconds.
    interval: float = 60.0
    #: Client networks never limited.
    exempt_networks: tuple[str, ...] = DEFAULT_EXEMPT
    #: IPv6 clients are counted per network of this prefix length (one site's /64 is one
    #: client); 128 counts each address alone.
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX
    _networks: tuple[Network, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("sessions_per_ip", "messages_per_ip", "auth_failures_per_ip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, not {value!r}")
        prefix = self.ipv6_prefix
        if isinstance(prefix, bool) or not isinstance(prefix, int) or not 1 <= prefix <= 128:
            raise ValueError(f"ipv6_prefix must be an integer from 1 to 128, not {prefix!r}")
        if not self.interval > 0:
            raise ValueError(f"interval must be > 0, not {self.interval!r}")
        networks = tuple(ipaddress.ip_network(str(n), strict=False) for n in self.exempt_networks)
        object.__setattr__(self, "_networks", networks)

    @property
    def active(self) -> bool:
        return bool(self.sessions_per_ip or self.messages_per_ip or self.auth_failures_per_ip)

    def exempt(self, address: IPAddress) -> bool:
        return any(address in network for network in self._networks)


def client_address(peer: Any, proxy_data: Any = None) -> IPAddress | None:
    """The client's address: the PROXY header's source when the session had one, else the
    socket peer's host.

    A header without a usable source (v1 ``UNKNOWN``, v2 ``LOCAL`` whatever addresses it
    carries, a UNIX or UNSPEC address family) gives None, never the peer: that is the
    balancer, often a trusted network.
    IPv4-mapped IPv6 addresses count as the IPv4 address; a Unix-socket peer has none.
    """
    address: Any = None
    if proxy_data is not None:
        address = getattr(proxy_data, "src_addr", None)
        if (
            not getattr(proxy_data, "valid", False)
            or getattr(proxy_data, "command", None) == V2_CMD.LOCAL  # its addresses are void
            or not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address)
        ):
            return None
    else:
        host = peer[0] if isinstance(peer, tuple | list) and peer else None
        if not isinstance(host, str):
            return None
        return _host_address(host)
    return unmapped(address)


def session_key(limiter: Limiter, peer: Any, proxy_data: Any = None) -> str | None:
    """The ``limiter`` key of a session: its client address's, or for a PROXY header without a
    usable source one key shared by all such sessions (never the balancer's, which may be
    exempt); None when the session is not limited."""
    address = client_address(peer, proxy_data)
    if address is None and proxy_data is not None:
        return UNKNOWN_CLIENT if limiter.limits.active else None
    return limiter.key(address)


@functools.lru_cache(maxsize=KEY_CACHE)
def _host_address(host: str) -> IPAddress | None:
    """A socket peer's host text as an address (parsed once per address, not per session)."""
    try:
        return unmapped(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return None


def unmapped(address: IPAddress) -> IPAddress:
    """``::ffff:a.b.c.d`` as ``a.b.c.d``; any other address unchanged."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class _Bucket:
    """A token bucket of ``capacity`` tokens refilled at ``rate`` per second."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, capacity: float, now: float) -> None:
        self.tokens = capacity
        self.stamp = now

    def level(self, capacity: float, rate: float, now: float) -> float:
        self.tokens = min(capacity, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        return self.tokens


class Anvil:
    """The counters of every client address (keys are the addresses as text)."""

    def __init__(self, limits: ClientLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self.sessions: dict[str, int] = {}
        self._messages: dict[str, _Bucket] = {}
        self._auth: dict[str, _Bucket] = {}
        self._next_sweep = clock() + SWEEP_INTERVAL

    def update(self, limits: ClientLimits) -> None:
        """New limits (a reload); the counts so far are kept."""
        self.limits = limits

    def open_session(self, key: str) -> tuple[bool, int]:
        """Count a new session unless the address is at its limit: (admitted, sessions now)."""
        count = self.sessions.get(key, 0)
        limit = self.limits.sessions_per_ip
        if limit and count >= limit:
            return False, count
        self.sessions[key] = count + 1
        return True, count + 1

    def close_session(self, key: str) -> None:
        count = self.sessions.get(key, 0) - 1
        if count > 0:
            self.sessions[key] = count
        else:
            self.sessions.pop(key, None)

    def count_message(self, key: str) -> bool:
        """Take one message from the address's allowance; False when it has none left."""
        return self.take_messages(key, 1) == 1

    def take_messages(self, key: str, wanted: int) -> int:
        """Take up to ``wanted`` messages from the address's allowance: how many it got."""
        limit = self.limits.messages_per_ip
        if not limit:
            return wanted
        now = self._clock()
        if now >= self._next_sweep:
            self.sweep(now)
        bucket = self._messages.get(key)
        if bucket is None:
            bucket = self._messages[key] = _Bucket(limit, now)
        granted = min(wanted, int(bucket.level(limit, limit / self.limits.interval, now)))
        bucket.tokens -= granted
        return granted

    def return_messages(self, key: str, count: int) -> None:
        """Give back messages taken but not used."""
        limit = self.limits.messages_per_ip
        bucket = self._messages.get(key)
        if limit and bucket is not None and count > 0:
            bucket.tokens = min(limit, bucket.tokens + count)

    def take_auth(self, key: str) -> bool:
        """An AUTH attempt takes one from the address's allowance (False: none left); a
        success gives it back, so only failures (and abandoned attempts) use it up. Taking at
        the attempt, not at the failure, keeps parallel sessions from multiplying it."""
        limit = self.limits.auth_failures_per_ip
        if not limit:
            return True
        now = self._clock()
        if now >= self._next_sweep:
            self.sweep(now)
        bucket = self._auth.get(key)
        if bucket is None:
            bucket = self._auth[key] = _Bucket(limit, now)
        if bucket.level(limit, limit / self.limits.interval, now) < 1:
            return False
        bucket.tokens -= 1
        return True

    def give_back_auth(self, key: str) -> None:
        """The attempt succeeded: it does not count."""
        limit = self.limits.auth_failures_per_ip
        bucket = self._auth.get(key)
        if limit and bucket is not None:
            bucket.tokens = min(limit, bucket.tokens + 1)

    def sweep(self, now: float | None = None) -> None:
        """Forget the buckets that have refilled (their clients look new again)."""
        now = self._clock() if now is None else now
        self._next_sweep = now + SWEEP_INTERVAL
        for buckets, limit in (
            (self._messages, self.limits.messages_per_ip),
            (self._auth, self.limits.auth_failures_per_ip),
        ):
            rate = limit / self.limits.interval if limit else 0.0
            refilled = [
                key for key, b in buckets.items() if not limit or b.level(limit, rate, now) >= limit
            ]
            for key in refilled:
                del buckets[key]

    @property
    def tracked(self) -> int:
        """Addresses with any state (memory held: a sweep forgets refilled ones)."""
        return len(self.sessions.keys() | self._messages.keys() | self._auth.keys())


class Limiter:
    """What every engine ``limiter`` shares: which clients are limited, and by what."""

    #: Whether MAIL and AUTH are counted (``farm.smtp.limiter.ClientLimiter``): plain attributes,
    #: read by the engine per command, kept in step with :attr:`limits`.
    counts_messages: bool
    counts_auth: bool

    def __init__(self, limits: ClientLimits) -> None:
        self.limits = limits
        self._keys: dict[IPAddress, str | None] = {}
        #: A socket peer's host text -> its key: one dict lookup per session.
        self._host_keys: dict[str, str | None] = {}

    def key(self, address: IPAddress | None) -> str | None:
        """The counter key of a client (its address, or its IPv6 network of ``ipv6_prefix``
        bits), or None when it is not limited at all."""
        if address is None:
            return None
        keys = self._keys
        try:
            return keys[address]
        except KeyError:
            pass
        limits = self.limits
        key: str | None = None
        if limits.active and not limits.exempt(address):
            key = str(address)
            if address.version == 6 and limits.ipv6_prefix < 128:
                network = ipaddress.IPv6Network((address, limits.ipv6_prefix), strict=False)
                key = str(network)
        if len(keys) >= KEY_CACHE:
            keys.clear()
        keys[address] = key
        return key

    def session_key(self, peer: Any, proxy_data: Any = None) -> str | None:
        """The key of a session (farm.smtp.limiter.ClientLimiter): see :func:`session_key`.

        Without a PROXY header the key depends on the peer's host text alone: it is looked up
        by that text (parsed once per address, not per session)."""
        host = peer[0] if proxy_data is None and type(peer) is tuple and peer else None
        if type(host) is not str:
            return session_key(self, peer, proxy_data)
        host_keys = self._host_keys
        if host in host_keys:
            return host_keys[host]
        key = session_key(self, peer)
        if len(host_keys) >= KEY_CACHE:
            host_keys.clear()
        host_keys[host] = key
        return key

    @property
    def limits(self) -> ClientLimits:
        return self._limits

    @limits.setter
    def limits(self, limits: ClientLimits) -> None:
        self._limits = limits
        self.counts_messages = bool(limits.messages_per_ip)
        self.counts_auth = bool(limits.auth_failures_per_ip)
        self._limits_changed(limits)

    def _limits_changed(self, limits: ClientLimits) -> None:
        """Subclasses keep what they derive from the limits in step (here: nothing)."""


class LocalLimiter(Limiter):
    """The engine's ``limiter`` for one process: an :class:`Anvil` in this process.

    ``LocalLimiter(sessions_per_ip=3)`` or ``LocalLimiter(ClientLimits(...))``.
    """

    def __init__(self, limits: ClientLimits | None = None, **kwargs: Any) -> None:
        super().__init__(limits if limits is not None else ClientLimits(**kwargs))
        self.anvil = Anvil(self.limits)

    async def open_session(self, key: str) -> bool:
        return self.anvil.open_session(key)[0]

    def close_session(self, key: str) -> None:
        self.anvil.close_session(key)

    async def count_message(self, key: str) -> bool:
        return self.anvil.count_message(key)

    async def auth_allowed(self, key: str) -> bool:
        return self.anvil.take_auth(key)

    def auth_succeeded(self, key: str) -> None:
        self.anvil.give_back_auth(key)

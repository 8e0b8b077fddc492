"""What the engine needs from a per-client ``limiter`` (``SMTP(limiter=...)``), and its replies.

The engine asks at four points: a new session (``open_session``, released by
``close_session``), each MAIL (``count_message``, when ``counts_messages``), each AUTH attempt
(``auth_allowed``, given back by ``auth_succeeded``, when ``counts_auth``). ``farm.limits``
implements it (one process's counters, or the supervisor's over a channel); the engine knows
only this interface.
"""

from __future__ import annotations

from typing import Any, Protocol


class ClientLimiter(Protocol):
    """A per-client limiter as the engine uses it."""

    @property
    def counts_messages(self) -> bool: ...

    @property
    def counts_auth(self) -> bool: ...

    def session_key(self, peer: Any, proxy_data: Any = None) -> str | None:
        """The key the session's client is counted under; None: the client is not limited."""
        ...

    async def open_session(self, key: str) -> bool: ...

    def close_session(self, key: str) -> None: ...

    async def count_message(self, key: str) -> bool: ...

    async def auth_allowed(self, key: str) -> bool: ...

    def auth_succeeded(self, key: str) -> None: ...


def too_many_connections(hostname: str, ip: str) -> str:
    return f"421 4.7.0 {hostname} Error: too many connections from {ip}"


def too_much_mail(ip: str) -> str:
    return f"450 4.7.1 Error: too much mail from {ip}"


def too_many_auth_failures(ip: str) -> str:
    return f"454 4.7.0 Error: too many AUTH failures from {ip}"

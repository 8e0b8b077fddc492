"""What the engine needs from a per-client ``limiter`` (``SMTP(limiter=...)``), and its replies.

The engine asks at four points: a new session (``open_session``, released by
``close_session``), each MAIL (``count_message``, when ``counts_messages``), each AUTH attempt
(``auth_allowed``, given back by ``auth_succeeded``, when ``counts_auth``). ``farm.limits``
implements it (one process's counters) and ``farm.supervisor.anvil`` (a table in shared
memory); the engine knows only this interface.

The three questions answer a bool at once, or an awaitable of one when the answer has to be
waited for (an ``async def`` method is fine): a limiter that knows at once costs the engine no
coroutine and no task per connection.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol, TypeAlias

#: A limiter's answer: now, or once awaited.
Answer: TypeAlias = bool | Awaitable[bool]


class ClientLimiter(Protocol):
    """A per-client limiter as the engine uses it."""

    @property
    def counts_messages(self) -> bool: ...

    @property
    def counts_auth(self) -> bool: ...

    def session_key(self, peer: Any, proxy_data: Any = None) -> str | None:
        """The key the session's client is counted under; None: the client is not limited."""
        ...

    def open_session(self, key: str) -> Answer: ...

    def close_session(self, key: str) -> None: ...

    def count_message(self, key: str) -> Answer: ...

    def auth_allowed(self, key: str) -> Answer: ...

    def auth_succeeded(self, key: str) -> None: ...


def too_many_connections(hostname: str, ip: str) -> str:
    return f"421 4.7.0 {hostname} Error: too many connections from {ip}"


def too_much_mail(ip: str) -> str:
    return f"450 4.7.1 Error: too much mail from {ip}"


def too_many_auth_failures(ip: str) -> str:
    return f"454 4.7.0 Error: too many AUTH failures from {ip}"

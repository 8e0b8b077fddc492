"""AUTH result types and the ``auth_mechanism`` decorator (aiosmtpd-compatible names)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar


@dataclass
class AuthResult:
    """Outcome of one SASL exchange.

    ``success``: whether the client is now authenticated. ``handled``: True when the mechanism
    already sent its own failure reply. ``message``: a custom reply to send. ``auth_data``: what
    ends up in ``session.auth_data``.
    """

    success: bool
    handled: bool = True
    message: str | None = None
    auth_data: Any = field(default=None, repr=lambda x: "...")  # type: ignore[arg-type]


@dataclass(frozen=True)
class LoginPassword:
    """Credentials of the PLAIN and LOGIN mechanisms; the password never appears in repr()."""

    login: bytes
    password: bytes = field(repr=False)

    def __str__(self) -> str:
        return f"LoginPassword(login='{self.login.decode(errors='replace')}', password=...)"


F = TypeVar("F", bound=Callable[..., Any])


def auth_mechanism(actual_name: str) -> Callable[[F], F]:
    """Give an ``auth_*`` method a mechanism name that is not a valid identifier."""

    def decorator(func: F) -> F:
        func.__auth_mechanism_name__ = actual_name  # type: ignore[attr-defined]
        return func

    return decorator

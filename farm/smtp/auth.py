"""AUTH result types and the ``auth_mechanism`` decorator (aiosmtpd-compatible names)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

#: What an AUTH mechanism name may consist of (RFC 4422 3.1: upper case, digits, - and _).
_MECHANISM_NAME = re.compile(r"[A-Z0-9_-]+\Z")


@dataclass
class AuthResult:
    """Outcome of one SASL exchange.

    ``success``: whether the client is now authenticated. ``handled``: on failure, True when
    the mechanism already sent its own reply (nothing more is sent). ``message``: the reply to
    send instead of the default one. ``auth_data``: what ends up in ``session.auth_data``.
    """

    success: bool
    handled: bool = True
    message: str | None = None
    auth_data: Any = None

    def __repr__(self) -> str:  # auth_data may hold credentials: never shown
        return (
            f"AuthResult(success={self.success!r}, handled={self.handled!r}, "
            f"message={self.message!r}, auth_data=...)"
        )

    __str__ = __repr__


class LoginPassword(NamedTuple):
    """Credentials of the PLAIN and LOGIN mechanisms: ``login, password = credentials``.

    The password never appears in ``repr()`` or ``str()``.
    """

    login: bytes
    password: bytes

    def __str__(self) -> str:
        return f"LoginPassword(login='{self.login.decode(errors='replace')}', password=...)"

    def __repr__(self) -> str:
        return self.__str__()


F = TypeVar("F", bound=Callable[..., Any])


def auth_mechanism(actual_name: str) -> Callable[[F], F]:
    """Give an ``auth_*`` method a mechanism name that is not a valid identifier.

    Raises ValueError unless the name (upper-cased) is letters, digits, ``-`` and ``_``.
    """
    if not _MECHANISM_NAME.match(actual_name.upper()):
        raise ValueError(f"Invalid AUTH mechanism name: {actual_name.upper()}")

    def decorator(func: F) -> F:
        func.__dict__["__auth_mechanism_name__"] = actual_name
        return func

    return decorator

"""HELP texts: the ``@syntax`` decorator on ``smtp_*`` methods (aiosmtpd's API) and its lookup.

A command is listed by ``HELP`` only if its method carries a syntax; ``when`` names a server
attribute that must be truthy for the command to be offered (``STARTTLS``: ``tls_context``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def syntax(text: str, extended: str | None = None, when: str | None = None) -> Callable[[F], F]:
    """Give an ``smtp_<VERB>`` method its HELP syntax (``extended`` is added after EHLO)."""

    def decorator(func: F) -> F:
        func.__dict__["__smtp_syntax__"] = text
        func.__dict__["__smtp_syntax_extended__"] = extended
        func.__dict__["__smtp_syntax_when__"] = when
        return func

    return decorator


def offered(server: Any, method: Any) -> bool:
    """Whether HELP shows ``method``'s command on this server."""
    if getattr(method, "__smtp_syntax__", None) is None:
        return False
    when = getattr(method, "__smtp_syntax_when__", None)
    return not when or bool(getattr(server, when, None))


def syntax_text(method: Any, extended_smtp: bool) -> str:
    """The ``Syntax:`` text of ``method`` (with its ESMTP part after EHLO)."""
    text: str = method.__smtp_syntax__
    extra = getattr(method, "__smtp_syntax_extended__", None)
    return text + extra if extended_smtp and extra else text

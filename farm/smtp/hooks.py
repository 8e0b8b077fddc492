"""The handler's hook table, built once per handler object rather than once per connection."""

from __future__ import annotations

import inspect
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

#: Returned by a hook lookup when the handler has no such hook.
MISSING = type("_Missing", (), {"__repr__": lambda self: "MISSING"})()

#: Hook names an aiosmtpd handler may define as ``handle_<NAME>``.
HOOK_NAMES = (
    "HELO",
    "EHLO",
    "MAIL",
    "RCPT",
    "DATA",
    "RSET",
    "NOOP",
    "QUIT",
    "VRFY",
    "AUTH",
    "PROXY",
    "STARTTLS",
    "CLOSE",
)


@dataclass(frozen=True, slots=True, eq=False)
class HookTable:
    """Bound ``handle_*`` methods of one handler, and how its EHLO hook is called."""

    hooks: dict[str, Any]
    #: True for the deprecated 4-argument ``handle_EHLO`` that returns one status line.
    old_style_ehlo: bool
    handle_exception: Any
    #: ``auth_<MECH>`` methods by mechanism name (``__`` in a name becomes ``-``).
    auth_mechanisms: dict[str, Any]
    #: The AUTH mechanism lists already logged for this handler (logged once, not per session).
    announced: set[tuple[str, ...]] = field(default_factory=set)


_cache: dict[int, tuple[Any, HookTable]] = {}
_lock = threading.Lock()


def hook_table(handler: Any) -> HookTable:
    """The hook table of ``handler``, computed on first use and then cached."""
    entry = _cache.get(id(handler))
    if entry is not None and entry[0] is handler:
        return entry[1]
    table = _build(handler)
    with _lock:
        if len(_cache) > 256:
            _cache.clear()
        _cache[id(handler)] = (handler, table)
    return table


def _build(handler: Any) -> HookTable:
    hooks = {}
    for name in HOOK_NAMES:
        method = getattr(handler, "handle_" + name, None)
        if callable(method):
            hooks[name] = method
    old_style = False
    ehlo = hooks.get("EHLO")
    if ehlo is not None:
        try:
            arity = len(inspect.signature(ehlo).parameters)
        except (TypeError, ValueError):  # no signature to read (a C callable): the new style
            arity = 5
        if arity not in (4, 5):
            raise RuntimeError("Unsupported EHLO Hook")
        old_style = arity == 4
    process_message = getattr(handler, "process_message", None)
    if "DATA" not in hooks and callable(process_message):
        hooks["DATA"] = _process_message_adapter(process_message)
    mechanisms = {}
    for attr in dir(handler):
        if attr.startswith("auth_") and attr != "auth_":
            method = getattr(handler, attr, None)
            if callable(method):
                given = getattr(method, "__auth_mechanism_name__", None)
                mechanisms[(given or attr[5:].replace("__", "-")).upper()] = method
    return HookTable(
        hooks=hooks,
        old_style_ehlo=old_style,
        handle_exception=getattr(handler, "handle_exception", None),
        auth_mechanisms=mechanisms,
    )


def _process_message_adapter(process_message: Any) -> Any:
    """The deprecated ``process_message(peer, mail_from, rcpt_tos, content)`` handler API,
    as a ``handle_DATA`` hook: its None means the default ``250 OK``."""

    async def handle_DATA(server: Any, session: Any, envelope: Any) -> Any:
        warnings.warn(
            "Use handler.handle_DATA() instead of .process_message()",
            DeprecationWarning,
            stacklevel=2,
        )
        status = process_message(
            session.peer, envelope.mail_from, envelope.rcpt_tos, envelope.content
        )
        if inspect.isawaitable(status):
            status = await status
        return "250 OK" if status is None else status

    return handle_DATA

"""The handler's hook table, built once per handler object rather than once per connection."""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Any

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
            old_style = len(inspect.signature(ehlo).parameters) < 5
        except (TypeError, ValueError):
            old_style = False
    mechanisms = {}
    for attr in dir(handler):
        if attr.startswith("auth_") and attr != "auth_":
            method = getattr(handler, attr, None)
            if callable(method):
                name = getattr(method, "__auth_mechanism_name__", None)
                mechanisms[(name or attr[5:].replace("__", "-")).upper()] = method
    return HookTable(
        hooks=hooks,
        old_style_ehlo=old_style,
        handle_exception=getattr(handler, "handle_exception", None),
        auth_mechanisms=mechanisms,
    )

"""Pure parsing of command arguments: verbs, paths (addresses) and ESMTP parameters.

The results match aiosmtpd's, which uses the standard library's RFC 5322 parser; the common
``<local@domain>`` form takes a fast path that gives the same answer without it.
"""

from __future__ import annotations

import re
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Final

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_SIMPLE_PATH: Final = re.compile(
    rf"<({_ATEXT}+(?:\.{_ATEXT}+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:[ \t]+([^(]*))?\Z"
)
#: Control characters (RFC 5321 4.1.2: never valid in a command), except TAB.
CONTROL_CHARACTERS: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def split_command(line: bytes, smtputf8: bool) -> tuple[str, str | None] | None:
    """``b"mail FROM:<a@b> "`` -> ``("MAIL", "FROM:<a@b>")``: the verb upper-cased (``""``
    when it is empty or not ASCII), the argument stripped (None without a space after the
    verb; with ``smtputf8`` decoded as UTF-8, surrogate escapes for bad octets). None when
    the argument is not ASCII and ``smtputf8`` is off."""
    verb_bytes, space, arg_bytes = line.partition(b" ")
    if not verb_bytes.isascii():
        return "", None
    verb = verb_bytes.upper().decode("ascii")
    if not space or not verb:
        return verb, None
    arg_bytes = arg_bytes.strip()
    if smtputf8:
        return verb, arg_bytes.decode("utf-8", "surrogateescape")
    if not arg_bytes.isascii():
        return None
    return verb, arg_bytes.decode("ascii")


def strip_keyword(keyword: str, arg: str) -> str | None:
    """``FROM:<a@b>`` -> ``<a@b>`` for keyword ``FROM:`` (case-insensitive); None if absent."""
    n = len(keyword)
    if arg[:n].upper() == keyword:
        return arg[n:].strip()
    return None


def parse_path(arg: str, local_part_limit: int = 0) -> tuple[str | None, str | None]:
    """Parse a reverse- or forward-path and what follows it.

    Returns ``(address, rest)``; ``("", "")`` for an empty argument and ``(None, None)`` when
    the address cannot be parsed (or its local part is longer than ``local_part_limit``).
    The null path ``<>`` gives the address ``"<>"``, as aiosmtpd does.
    """
    if not arg:
        return "", ""
    m = _SIMPLE_PATH.match(arg)
    if m is not None:
        address, rest = m.group(1), m.group(2) or ""
    else:
        try:
            if arg.lstrip().startswith("<"):
                angle, rest = get_angle_addr(arg)
                address = angle.addr_spec
            else:
                spec, rest = get_addr_spec(arg)
                address = spec.addr_spec
        except (HeaderParseError, IndexError, ValueError, AttributeError):
            return None, None
    if local_part_limit and len(address.rpartition("@")[0]) > local_part_limit:
        return None, None
    return address, rest


def parse_params(options: list[str]) -> dict[str, str | bool] | None:
    """``["SIZE=10", "BODY=8BITMIME"]`` -> dict; None if any is malformed (RFC 1869)."""
    result: dict[str, str | bool] = {}
    for option in options:
        name, eq, value = option.partition("=")
        if not name.isalnum() or (eq and not value):
            return None
        result[name] = value if eq else True
    return result

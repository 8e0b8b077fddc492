"""DSN parameters (RFC 3461) on MAIL and RCPT: checked, then removed from the unknown set.

The options stay in ``envelope.mail_options`` / ``rcpt_options`` for the handler to act on.
"""

from __future__ import annotations

import re

_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+\Z")
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")
#: Parameters whose values are case-sensitive (RFC 3461 xtext): never upper-cased.
_CASE_KEPT = ("ENVID", "ORCPT")


def split_options(params: str | None, dsn: bool) -> list[str]:
    """``"size=10 envid=Ab"`` -> ``["SIZE=10", "ENVID=Ab"]``: upper-cased as aiosmtpd does,
    except the values of ENVID and ORCPT when DSN is on."""
    if not params:
        return []
    if not dsn:
        return params.upper().split()
    options = []
    for option in params.split():
        name, eq, value = option.partition("=")
        name = name.upper()
        options.append(f"{name}{eq}{value if name in _CASE_KEPT else value.upper()}")
    return options


def dsn_mail_options_valid(options: dict[str, str | bool]) -> bool:
    """Validate and remove ``RET`` and ``ENVID``; False on a malformed value."""
    ret = options.pop("RET", None)
    if ret is not None and ret not in ("FULL", "HDRS"):
        return False
    envid = options.pop("ENVID", None)
    return envid is None or (
        isinstance(envid, str) and len(envid) <= 100 and bool(_XTEXT.match(envid))
    )


def dsn_rcpt_options_valid(options: dict[str, str | bool]) -> bool:
    """Validate and remove ``NOTIFY`` and ``ORCPT``; False on a malformed value."""
    notify = options.pop("NOTIFY", None)
    if notify is not None:
        if not isinstance(notify, str):
            return False
        values = notify.split(",")
        if values != ["NEVER"] and not (set(values) <= _NOTIFY and len(set(values)) == len(values)):
            return False
    orcpt = options.pop("ORCPT", None)
    if orcpt is not None:
        if not isinstance(orcpt, str):
            return False
        kind, sep, address = orcpt.partition(";")
        if not sep or not _ATOM.match(kind) or not address or not _XTEXT.match(address):
            return False
    return True

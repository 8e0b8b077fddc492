"""CHUNKING / BDAT (RFC 3030): the command's argument and the chunk's refusals, as pure
functions. :class:`farm.smtp.SMTP` reads the chunks and keeps the message's body.

A chunk's octets are always consumed, even when the command is refused, so that message
content is never taken for commands. The handler sees the same Envelope as after DATA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from farm.smtp.body import INSUFFICIENT_STORAGE

BDAT_SYNTAX = "501 Syntax: BDAT <size> [LAST]"
TOO_MUCH_DATA = "552 Error: Too much mail data"


class BdatArguments(NamedTuple):
    """``BDAT <size> [LAST]``."""

    size: int
    last: bool


def _size(word: str) -> int | None:
    return int(word) if word.isascii() and word.isdigit() else None


def parse_bdat(arg: str | None) -> BdatArguments | None:
    """``"1000 LAST"`` -> (1000, True); None for a syntax error (no valid size, or a second
    word other than ``LAST``), after which the stream cannot be trusted."""
    parts = (arg or "").split()
    if not parts or len(parts) > 2:
        return None
    size = _size(parts[0])
    if size is None:
        return None
    if len(parts) == 1:
        return BdatArguments(size, False)
    if parts[1].upper() != "LAST":
        return None
    return BdatArguments(size, True)


def chunk_size_to_skip(arg: str | None) -> int | None:
    """The octets that follow a ``BDAT`` refused before it ran (a policy check answered it):
    any second word is allowed, since only the size matters; None: the size is unknown."""
    parts = (arg or "").split()
    if not parts or len(parts) > 2:
        return None
    return _size(parts[0])


def chunk_refusal(
    order_refusal: str | None,
    received: int | None,
    size: int,
    limit: int | None,
    out_of_room: Callable[[], bool],
) -> str | None:
    """The reply refusing a chunk of ``size`` octets, or None to accept it.

    ``order_refusal``: the command-order rule BDAT breaks, if any (HELO and RCPT first:
    :func:`farm.smtp.state.ordering_refusal`); ``received``: the octets of earlier chunks
    (None: this is the transaction's first); ``out_of_room``: asked for a first chunk only,
    whether the memory budget for bodies is used up.
    """
    if order_refusal is not None:
        return order_refusal
    if received is None and out_of_room():
        return INSUFFICIENT_STORAGE
    if limit and (received or 0) + size > limit:
        return TOO_MUCH_DATA
    return None


def chunk_accepted(size: int) -> str:
    """The reply to a chunk that is not the last one."""
    return f"250 Message OK, {size} octets received"

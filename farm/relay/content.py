"""The content sent to a next hop: stray CR, LF and NUL made spaces, dot-stuffed for ``DATA``.

``clean_content`` and ``dot_stuff`` work on a whole message in memory (the ``Proxy`` handler's);
``content_chunks`` streams the same bytes from a message body chunk by chunk, never holding it
whole (the relay's): stray CR, LF (not part of a CRLF pair) and NUL become a space, the content
ends with CRLF, and for ``DATA`` a dot starting a line is doubled and the ``.`` line added. A
CR at the end of a chunk, or a CRLF (a dot may start the next chunk), waits for the next chunk,
so the result does not depend on where the body's chunks end.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from farm.smtp.body import CHUNK_SIZE, Body

__all__ = [
    "WHOLE_LIMIT",
    "clean_content",
    "content_chunks",
    "content_size",
    "dot_stuff",
    "whole_content",
]

#: Content of at most this many octets, its body held in memory, is made whole and sent as
#: one ``bytes`` (:func:`whole_content`) instead of chunk by chunk.
WHOLE_LIMIT = 64 * 1024

#: Stray CR / LF (not part of a CRLF pair) and NUL.
_STRAY = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")
#: A dot at the start of a line (after the first line), for dot-stuffing.
_LEADING_DOT = re.compile(rb"\r\n\.")


def clean_content(content: bytes) -> bytes:
    """Stray CR/LF and NUL replaced with a space; ends with CRLF (unless empty)."""
    content = _clean(content, False)
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    return content


def dot_stuff(content: bytes) -> bytes:
    """The DATA payload for ``content`` (CRLF lines): leading dots doubled, ``.`` line added."""
    if content.startswith(b"."):
        content = b"." + content
    if b"\r\n." in content:
        content = _LEADING_DOT.sub(b"\r\n..", content)
    return content + b".\r\n"


def content_size(header: bytes, body: Body) -> int:
    """Octets :func:`content_chunks` yields without dot-stuffing (what ``BDAT`` declares)."""
    size = len(header) + body.size
    if body.size and not body.endswith(b"\r\n"):
        size += 2  # the CRLF added at the end
    return size


def whole_content(header: bytes, body: Body, *, stuff: bool) -> bytes | None:
    """What :func:`content_chunks` yields, as one ``bytes``, when the body is in memory and
    the content at most :data:`WHOLE_LIMIT` octets; else None (stream it). A small message's
    usual case: one scan and one copy, no chunk generator."""
    if body.spooled or len(header) + body.size > WHOLE_LIMIT:
        return None
    content = clean_content(header + body.read_all())
    return dot_stuff(content) if stuff else content


def content_chunks(
    header: bytes, body: Body, *, stuff: bool, chunk_size: int = CHUNK_SIZE
) -> Iterator[bytes]:
    """``header`` (our trace header, CRLF-terminated) then the cleaned ``body``; with
    ``stuff``, dot-stuffed and followed by the ``.`` line (for ``DATA``)."""
    carry = header
    first = stuff
    for chunk in body.chunks(chunk_size):
        data = carry + chunk
        if first:
            first = False
            if data.startswith(b"."):  # the content's first line
                data = b"." + data
        keep = 2 if data.endswith(b"\r\n") else 1 if data.endswith(b"\r") else 0
        carry = data[len(data) - keep :]
        if len(data) > keep:
            yield _clean(data[: len(data) - keep], stuff)
    ending = carry
    if first and ending.startswith(b"."):
        ending = b"." + ending
    if not ending.endswith(b"\r\n"):
        ending = _STRAY.sub(b" ", ending) + b"\r\n" if ending or body.size else ending
    if stuff:
        ending = _LEADING_DOT.sub(b"\r\n..", ending) + b".\r\n"
    if ending:
        yield ending


def _clean(data: bytes, stuff: bool) -> bytes:
    # The regular expressions scan slowly (look-arounds); counting is fast and, for the usual
    # clean CRLF text, tells that there is nothing to replace: every CR is in a CRLF pair and
    # every LF too exactly when the three counts agree.
    pairs = data.count(b"\r\n")
    if b"\x00" in data or data.count(b"\r") != pairs or data.count(b"\n") != pairs:
        data = _STRAY.sub(b" ", data)
    if stuff and b"\r\n." in data:
        data = _LEADING_DOT.sub(b"\r\n..", data)
    return data

"""Sans-I/O parsing of a next hop's replies: whole replies taken off the client's read buffer.

A reply is one or more lines ``NNN-text`` ending with a line ``NNN text`` (RFC 5321 4.2.1),
each line ending at LF (a CR before it is dropped). The code is three digits, the first 2 to
5, the same on every line of a reply. At most ``MAX_REPLY_LINES`` lines of at most
``MAX_LINE`` octets each; anything else raises ``ValueError`` (the caller closes the
connection). Text is decoded as UTF-8 (invalid octets replaced), made printable (anything
outside ASCII 0x20-0x7E becomes ``?``) and stripped.

Compiled with mypyc (``farm/compiled.py``): the relay reads three replies per message.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MAX_LINE", "MAX_REPLY_LINES", "NEXT_HOP_LOST", "Reply", "ReplyReader"]

NEXT_HOP_LOST: Final = "451 4.4.2 Connection to next hop lost, try again later"
MAX_LINE: Final = 4096
MAX_REPLY_LINES: Final = 100

_UNPRINTABLE: Final = re.compile(r"[^\x20-\x7e]")


class Reply:
    """One reply from the next hop: ``code``, its ``lines`` and their text joined into one
    printable line (``text``); ``ok`` for a 2xx."""

    def __init__(self, code: int, lines: list[str]) -> None:
        self.code = code
        self.lines = lines
        self.text = lines[0] if len(lines) == 1 else " ".join([line for line in lines if line])
        self.ok = 200 <= code <= 299

    def passthrough(self) -> str:
        """Our reply to the client for this refusal (``421`` → ``451``, non-4/5xx → 451 4.4.2)."""
        if not 400 <= self.code <= 599:
            return NEXT_HOP_LOST
        code = 451 if self.code == 421 else self.code
        return f"{code} {self.text or 'Requested action not taken'}"

    def __repr__(self) -> str:
        return f"{self.code} {self.text}"


class ReplyReader:
    """Takes whole replies off a buffer; the lines of a reply still arriving wait here."""

    def __init__(self) -> None:
        self.code = 0
        self.lines: list[str] = []

    def take(self, buffer: bytearray) -> Reply | None:
        """The next whole reply, its lines removed from ``buffer``; None while it is incomplete
        (the complete lines so far are removed and kept). ``ValueError``: a malformed, changing
        or oversized reply."""
        start = 0
        lines = self.lines
        while True:
            end = buffer.find(b"\n", start, start + MAX_LINE + 1)
            if end < 0:
                del buffer[:start]
                if len(buffer) > MAX_LINE:
                    raise ValueError("reply line too long")
                return None
            raw = bytes(buffer[start:end])
            start = end + 1
            code, more, text = _parse_line(raw)
            if self.code and code != self.code:
                raise ValueError("reply code changed within a multi-line reply")
            self.code = code
            lines.append(text)
            if not more:
                del buffer[:start]
                self.code = 0
                self.lines = []
                return Reply(code, lines)
            if len(lines) >= MAX_REPLY_LINES:
                raise ValueError("reply too long")


def _parse_line(raw: bytes) -> tuple[int, bool, str]:
    """(code, more lines follow, text) of one reply line (``raw``: without its LF)."""
    line = raw.rstrip(b"\r\n")
    if (
        len(line) < 3
        or not 50 <= line[0] <= 53  # 2-5
        or not 48 <= line[1] <= 57
        or not 48 <= line[2] <= 57
    ):
        raise ValueError(f"malformed reply {raw[:40]!r}")
    code = (line[0] - 48) * 100 + (line[1] - 48) * 10 + (line[2] - 48)
    separator = line[3] if len(line) > 3 else 0
    rest = line[4:] if separator == 32 or separator == 45 else line[3:]  # " " or "-"
    text = rest.decode("utf-8", "replace")
    if not (text.isascii() and text.isprintable()):
        text = _UNPRINTABLE.sub("?", text)
    return code, separator == 45, text.strip()

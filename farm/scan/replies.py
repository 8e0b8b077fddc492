"""SMTP replies built from scanners' text: one safe line, or a checked multi-line reply."""

from __future__ import annotations

import re

__all__ = ["checked_reply", "reply_text"]

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
_REPLY_LINE = re.compile(r"([45])\d\d([ -])\1\.\d{1,3}\.\d{1,3}(?: [\x20-\x7e]*)?")
MAX_TEXT = 400


def reply_text(text: str, default: str) -> str:
    """``text`` as printable ASCII on one line (``default`` if nothing is left)."""
    cleaned = _UNPRINTABLE.sub(" ", text).strip()[:MAX_TEXT]
    return cleaned or default


def checked_reply(text: str) -> str | None:
    """A milter's ``ddd x.y.z text`` reply (multi-line: CRLF-joined), or None if malformed.

    Every line must be a 4xx or 5xx reply with the same code, ``-`` on all lines but the last,
    and an enhanced code of the reply's class (Postfix's rule too). ``%%`` becomes ``%`` (Sendmail
    uses the text as a format string; Postfix undoes that the same way).
    """
    lines = text.replace("%%", "%").split("\r\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or len(lines) > 20:
        return None
    code = lines[0][:3]
    for number, line in enumerate(lines):
        match = _REPLY_LINE.fullmatch(line)
        last = number == len(lines) - 1
        if match is None or line[:3] != code or (match[2] == "-") == last:
            return None
    return "\r\n".join(lines)

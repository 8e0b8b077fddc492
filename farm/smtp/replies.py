"""Reply text helpers: multi-line formatting and RFC 2034/3463 enhanced status codes."""

from __future__ import annotations

import functools
import re

_HAS_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")

#: The enhanced code a reply gets when its text carries none, by reply code.
_BY_CODE = {
    "211": "2.0.0",
    "214": "2.0.0",
    "220": "2.0.0",
    "221": "2.0.0",
    "235": "2.7.0",
    "250": "2.0.0",
    "251": "2.1.5",
    "252": "2.5.0",
    "421": "4.3.0",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.5.3",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "538": "5.7.11",
    "550": "5.0.0",
    "551": "5.1.6",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}
#: A 250 to these verbs says more than 2.0.0 (RFC 3463: sender, recipient, content).
_SUCCESS_BY_VERB = {"MAIL": "2.1.0", "RCPT": "2.1.5", "DATA": "2.6.0", "BDAT": "2.6.0"}


@functools.lru_cache(maxsize=256)
def format_multiline(text: str) -> str:
    """Make a reply with embedded line breaks a well-formed multi-line reply.

    ``"250 a\\nb"`` and ``"250-a\\r\\n250-b"`` both become ``"250-a\\r\\n250 b"``: every line
    carries the code, ``-`` after it on all lines but the last. Cached: the EHLO reply is
    the same for every session.
    """
    lines = [line.rstrip("\r") for line in text.split("\n")]
    lines = [line for line in lines if line]
    if not lines:
        return text.strip()
    code = lines[0][:3] if lines[0][:3].isdigit() else "451"
    out = []
    for i, line in enumerate(lines):
        rest = line[4:] if line[:3].isdigit() and line[3:4] in ("", " ", "-") else line
        sep = "-" if i < len(lines) - 1 else " "
        out.append(f"{code}{sep}{rest}")
    return "\r\n".join(out)


@functools.lru_cache(maxsize=1024)
def with_enhanced_code(text: str, verb: str | None = None) -> str:
    """Add an enhanced status code to every line of ``text`` that lacks one.

    Replies of class 3 (``334``, ``354``) carry none (RFC 3463 defines classes 2, 4 and 5).
    Cached: a server sends the same few replies over and over.
    """
    if "\n" in text:
        return "\r\n".join(with_enhanced_code(line, verb) for line in text.split("\r\n"))
    code = text[:3]
    if code[:1] not in ("2", "4", "5") or not code.isdigit():
        return text
    rest = text[4:]
    if _HAS_ENHANCED.match(rest):
        return text
    enhanced = _BY_CODE.get(code, f"{code[0]}.0.0")
    if code == "250" and verb in _SUCCESS_BY_VERB:
        enhanced = _SUCCESS_BY_VERB[verb]
    separator = text[3:4] or " "
    return f"{code}{separator}{enhanced} {rest}".rstrip()

"""The Authentication-Results header field (RFC 8601): writing ours, finding forged ones.

Ours lists one result per method, each with the RFC 8601 properties:
``spf=pass smtp.mailfrom=example.org`` (or ``smtp.helo`` for ``<>``), one ``dkim=...
header.d=... header.s=... header.b=...`` per signature, ``dmarc=... header.from=...``,
``arc=...``. A reason goes in a comment. Values that are not RFC 2045 tokens are quoted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

__all__ = ["HEADER", "authserv_id_of", "format_header", "is_forged", "resinfo"]

HEADER = "Authentication-Results"

_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+")
_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+@[A-Za-z0-9.\-]+")
_NOT_CTEXT = re.compile(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e ]")


def _value(text: str) -> str:
    """A property value: a token (or user@domain) as is, anything else quoted."""
    if _TOKEN.fullmatch(text) or _ADDRESS.fullmatch(text):
        return text
    cleaned = "".join(ch for ch in text if " " <= ch <= "~")
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    cleaned = _NOT_CTEXT.sub("", text).strip()[:100]
    return f" ({cleaned})" if cleaned else ""


def resinfo(
    method: str, result: str, properties: Iterable[tuple[str, str]] = (), reason: str = ""
) -> str:
    """``method=result (reason) ptype.property=value ...``."""
    parts = [f"{method}={result}{_comment(reason)}"]
    parts += [f"{name}={_value(value)}" for name, value in properties if value]
    return " ".join(parts)


def format_header(authserv_id: str, results: Iterable[str]) -> str:
    """The field's value, folded: one result per line."""
    items = list(results) or ["none"]
    return f"{_value(authserv_id)};\r\n\t" + ";\r\n\t".join(items)


def authserv_id_of(value: bytes) -> str | None:
    """The authserv-id of an Authentication-Results value (comments and folding skipped)."""
    text = value.decode("utf-8", "replace")
    index, depth, length = 0, 0, len(text)
    while index < length:  # leading CFWS
        char = text[index]
        if char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif char == "\\" and depth:
            index += 1
        elif not (depth or char.isspace()):
            break
        index += 1
    if index >= length:
        return None
    if text[index] == '"':
        end = text.find('"', index + 1)
        return text[index + 1 : end].strip().lower() if end > index else None
    match = re.match(r"[^\s;()]+", text[index:])
    return match[0].lower() if match else None


def is_forged(authserv_id: str) -> Callable[[str, bytes], bool]:
    """The header filter that removes Authentication-Results fields claiming ``authserv_id``
    (RFC 8601 section 5: a sender must not be able to forge our verdict)."""
    ours = authserv_id.lower()

    def forged(name: str, value: bytes) -> bool:
        return name.lower() == "authentication-results" and authserv_id_of(value) == ours

    return forged

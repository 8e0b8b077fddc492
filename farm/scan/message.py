"""Header and body edits a scanner asks for, applied to a message held as bytes.

:class:`MessageEdit` splits the header block into fields once and keeps the body as an offset
into the original bytes, so a message that no scanner changes is never copied and one whose
headers change is copied once (headers + body) when :meth:`MessageEdit.content` is read.

Header values cross the milter protocol as Sendmail sends them: folded lines joined by a bare
``LF``, without the space after the colon. Values from scanners are normalised back to ``CRLF``
folding, and a continuation line that does not start with a space or tab gets a tab, so a
scanner can never smuggle a new header field (or the end of the headers) into the message.
"""

from __future__ import annotations

import re

__all__ = ["HeaderError", "MessageEdit", "header_field"]

_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


class HeaderError(ValueError):
    """A header name or value that cannot go into a message."""


def header_field(name: bytes, value: bytes, lead_space: bool = False) -> bytes:
    """One ``Name: value`` field with CRLF folding; ``lead_space``: the value brings its own."""
    if not _NAME.fullmatch(name):
        raise HeaderError(f"bad header name {name[:80]!r}")
    if b"\x00" in value:
        raise HeaderError(f"NUL in header {name[:80]!r}")
    lines = value.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    folded = [lines[0]]
    for line in lines[1:]:
        if not line.strip():
            continue  # an empty continuation line would end the header block
        folded.append(line if line[:1] in (b" ", b"\t") else b"\t" + line)
    separator = b":" if lead_space else b": "
    return name + separator + b"\r\n".join(folded) + b"\r\n"


class MessageEdit:
    """A message as header fields plus a body, edited in place by scanners' requests."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._changed = False
        self._body: bytes | None = None  # a replacement body, else the original's
        self._fields: list[bytes] = []
        self._body_start = self._split(raw)

    def _split(self, raw: bytes) -> int:
        """Fill ``_fields``; return the offset where the body starts (after the blank line)."""
        if raw.startswith(b"\r\n"):
            return 2
        end = raw.find(b"\r\n\r\n")
        header_end, body_start = (len(raw), len(raw)) if end < 0 else (end + 2, end + 4)
        fields = self._fields
        start = 0
        while start < header_end:
            stop = raw.find(b"\r\n", start, header_end)
            stop = header_end if stop < 0 else stop + 2
            line = raw[start:stop]
            if fields and line[:1] in (b" ", b"\t"):
                fields[-1] += line
            else:
                fields.append(line)
            start = stop
        if fields and not fields[-1].endswith(b"\r\n"):
            fields[-1] += b"\r\n"
        return body_start

    # -- reading ---------------------------------------------------------------------------

    @property
    def changed(self) -> bool:
        return self._changed

    def headers(self, lead_space: bool = False) -> list[tuple[bytes, bytes]]:
        """``(name, value)`` per field, folds as bare LF; the colon's space kept if asked."""
        out = []
        for field in self._fields:
            name, colon, value = field.partition(b":")
            if not colon:
                continue  # not a header line (a malformed message); scanners see the body
            if not lead_space and value.startswith(b" "):
                value = value[1:]
            out.append((name.rstrip(b" \t"), value.removesuffix(b"\r\n").replace(b"\r\n", b"\n")))
        return out

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        for field_name, value in self.headers():
            if field_name.lower() == wanted:
                return value
        return None

    def body(self) -> memoryview:
        """The body as a view (no copy)."""
        if self._body is not None:
            return memoryview(self._body)
        return memoryview(self._raw)[self._body_start :]

    def content(self) -> bytes:
        """The whole message: the original bytes when nothing changed."""
        if not self._changed:
            return self._raw
        return b"".join(self._fields) + b"\r\n" + self.body()

    # -- edits -----------------------------------------------------------------------------

    def _positions(self, name: bytes) -> list[int]:
        wanted = name.lower()
        positions = []
        for i, field in enumerate(self._fields):
            field_name, colon, _ = field.partition(b":")
            if colon and field_name.rstrip(b" \t").lower() == wanted:
                positions.append(i)
        return positions

    def add(self, name: bytes, value: bytes, lead_space: bool = False) -> None:
        """Append a field at the end of the header block."""
        self._fields.append(header_field(name, value, lead_space))
        self._changed = True

    def insert(self, index: int, name: bytes, value: bytes, lead_space: bool = False) -> None:
        """Insert a field before the ``index``-th field (0: at the top)."""
        position = min(max(index, 0), len(self._fields))
        self._fields.insert(position, header_field(name, value, lead_space))
        self._changed = True

    def change(self, name: bytes, index: int, value: bytes, lead_space: bool = False) -> None:
        """Replace the ``index``-th (1-based) ``name`` field; an empty value deletes it.

        A missing occurrence is added, as Sendmail does (and Postfix for an index past the end).
        """
        positions = self._positions(name)
        index = max(index, 1)
        if index > len(positions):
            if value:
                self.add(name, value, lead_space)
            return
        position = positions[index - 1]
        if value:
            self._fields[position] = header_field(name, value, lead_space)
        else:
            del self._fields[position]
        self._changed = True

    def remove(self, name: bytes, index: int = 0) -> None:
        """Delete ``name`` fields: all (0), the ``index``-th (1-based) or from the end (< 0)."""
        positions = self._positions(name)
        if index == 0:
            chosen = positions
        else:
            try:
                chosen = [positions[index - 1 if index > 0 else index]]
            except IndexError:
                return
        for position in reversed(chosen):
            del self._fields[position]
        self._changed = self._changed or bool(chosen)

    def replace_body(self, body: bytes) -> None:
        """Use ``body`` instead of the original body (line ends normalised to CRLF)."""
        self._body = re.sub(rb"\r?\n", b"\r\n", body)
        self._changed = True

"""CHUNKING / BDAT (RFC 3030) for the SMTP protocol.

A chunk's octets are always consumed, even when the command is refused, so that message
content is never taken for commands. The handler sees the same Envelope as after DATA.
"""

from __future__ import annotations

import logging
from typing import Any

from farm.smtp.body import INSUFFICIENT_STORAGE, Body
from farm.smtp.framing import Chunk, Message
from farm.smtp.help import syntax

log = logging.getLogger("farm.smtp")

BDAT_SYNTAX = "501 Syntax: BDAT <size> [LAST]"


class ChunkingMixin:
    """The ``BDAT`` command; mixed into :class:`farm.smtp.SMTP`."""

    _chunking: bool
    #: Content received by earlier BDAT chunks of this transaction (None: no BDAT yet).
    _bdat_content: Body | None = None
    #: For the chunk being read: (is it the last, the error reply to give after it, if any).
    _bdat_pending: tuple[bool, str | None] = (False, None)

    @syntax("BDAT <size> [LAST]", when="_chunking")
    async def smtp_BDAT(self, arg: str | None) -> None:
        """BDAT <size> [LAST]"""
        server: Any = self
        if not self._chunking:
            server._reply('500 Error: command "BDAT" not recognized')
            return
        parts = (arg or "").split()
        last = len(parts) == 2 and parts[1].upper() == "LAST"
        valid_size = bool(parts) and parts[0].isascii() and parts[0].isdigit()
        if not valid_size or len(parts) > 2 or (len(parts) == 2 and not last):
            # Without a size the chunk's end is unknown: the stream cannot be trusted any more.
            server._reply(BDAT_SYNTAX)
            server._close_after_flush = True
            return
        size = int(parts[0])
        error = self._bdat_error(size)
        if error is not None:
            server._framer.start_chunk(size, keep=False)
        else:
            server._framer.start_chunk(size, spill=server._spill)
            if self._bdat_content is None:
                self._bdat_content = server._new_body()
        self._bdat_pending = (last, error)
        if server._timeout:
            server._data_deadline = server.loop.time() + server._timeout

    def _skip_refused_chunk(self, arg: str | None) -> None:
        """A ``BDAT`` refused before :meth:`smtp_BDAT` ran (a policy check answered it): its
        chunk is still read and dropped, unanswered, so its octets never run as commands;
        without a valid size the stream cannot be trusted and the connection closes."""
        server: Any = self
        if not self._chunking:
            return  # BDAT is then an unknown command, as in aiosmtpd
        parts = (arg or "").split()
        if parts and len(parts) <= 2 and parts[0].isascii() and parts[0].isdigit():
            server._framer.start_chunk(int(parts[0]), keep=False)
            self._bdat_pending = (False, "")
        else:
            server._close_after_flush = True

    def _bdat_error(self, size: int) -> str | None:
        server: Any = self
        refusal: str | None = server._ordering_refusal("BDAT")
        if refusal is not None:
            return refusal
        if self._bdat_content is None and server._no_room_for_a_body():
            return INSUFFICIENT_STORAGE
        received = self._bdat_content.size if self._bdat_content is not None else 0
        limit = server.data_size_limit
        if limit and received + size > limit:
            return "552 Error: Too much mail data"
        return None

    def _on_chunk(self, chunk: Chunk) -> None:
        server: Any = self
        last, error = self._bdat_pending
        self._bdat_pending = (False, None)
        if error == "":
            return  # refused before smtp_BDAT: already answered
        if error is not None:
            if error.startswith("552"):
                # The transaction is over; only its last chunk gets (LMTP: per-recipient) replies.
                server._counts["bytes"] += chunk.size
                envelope = server.envelope
                server._set_post_data_state()
                if last:
                    server._end_message(error, chunk.size, envelope)
                else:
                    server._counts["rejected"] += 1
                    server._reply(error)
            else:
                server._reply(error)
            return
        content = self._bdat_content
        assert content is not None
        content.write(chunk.data)
        if not last:
            server._reply(f"250 Message OK, {chunk.size} octets received")
            return
        self._bdat_content = None
        server._on_message(Message(b"", content.size), content)

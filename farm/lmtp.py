"""LMTP (RFC 2033): ``LHLO`` instead of HELO/EHLO, and one reply per recipient after DATA.

``handle_DATA`` may return, as with SMTP, one reply string (it then applies to every
recipient), or per-recipient replies: a list in ``envelope.rcpt_tos`` order, or a dict from
recipient address to reply. A recipient the handler leaves out gets a temporary failure.
"""

from __future__ import annotations

import logging
from typing import Any

from farm.smtp.help import syntax
from farm.smtp.server import LOCAL_ERROR, SMTP
from farm.smtp.session import Envelope

log = logging.getLogger("farm.smtp")


class LMTP(SMTP):
    """An LMTP server: ``LMTP(handler, **SMTP_keywords)``."""

    @syntax("LHLO hostname")
    async def smtp_LHLO(self, arg: str | None) -> None:
        """LHLO hostname"""
        if not arg:
            self._reply("501 Syntax: LHLO hostname")
            return
        await super().smtp_EHLO(arg)

    async def smtp_HELO(self, arg: str | None) -> None:
        """HELO is not an LMTP command."""
        self._reply('500 Error: command "HELO" not recognized')

    async def smtp_EHLO(self, arg: str | None) -> None:
        """EHLO is not an LMTP command."""
        self._reply('500 Error: command "EHLO" not recognized')

    _helo_required = "503 Error: send LHLO first"

    def _data_replies(self, status: Any, envelope: Envelope | None) -> list[str]:
        recipients = list(envelope.rcpt_tos) if envelope is not None else []
        if isinstance(status, str) or not recipients:
            return [status if isinstance(status, str) else LOCAL_ERROR] * max(1, len(recipients))
        if isinstance(status, dict):
            replies = [status.get(rcpt) for rcpt in recipients]
        elif isinstance(status, (list, tuple)):
            replies = list(status)[: len(recipients)]
            replies += [None] * (len(recipients) - len(replies))
        else:
            replies = [None] * len(recipients)
        missing = [rcpt for rcpt, reply in zip(recipients, replies, strict=True) if not reply]
        if missing:
            log.error(
                "session=%s handle_DATA gave no reply for %d recipient(s)",
                self.session.id,  # type: ignore[union-attr]
                len(missing),
            )
        return [reply if isinstance(reply, str) and reply else LOCAL_ERROR for reply in replies]

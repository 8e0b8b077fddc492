"""A handler that imports and builds, but that the engine refuses: its EHLO hook takes neither
aiosmtpd's old signature (server, session, envelope, hostname) nor the new one (+ responses)."""

from __future__ import annotations

from typing import Any


class Handler:
    def __init__(self, **settings: Any) -> None:
        """Takes any ``handler_args`` (a test swaps it in for another handler at a reload)."""

    async def handle_EHLO(self, server: Any, session: Any) -> str:
        return "250 never used"

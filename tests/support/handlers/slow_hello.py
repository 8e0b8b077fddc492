"""A handler whose EHLO hook takes ``seconds`` (without blocking the loop), so that a session
with no transaction yet is inside a command when a test sends a signal. ``started_path``, if
given, is created as the hook begins."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any


class SlowHello:
    def __init__(self, seconds: float = 3.0, started_path: str | None = None) -> None:
        self.seconds = float(seconds)
        self.started_path = started_path

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        if self.started_path:
            Path(self.started_path).touch()
        await asyncio.sleep(self.seconds)
        session.host_name = hostname
        return responses

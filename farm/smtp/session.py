"""Per-connection Session and per-transaction Envelope, as aiosmtpd handlers know them."""

from __future__ import annotations

import asyncio
from typing import Any


class Session:
    """What the server knows about one client connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.peer: Any = None
        self.ssl: dict[str, Any] | None = None
        self.host_name: str | None = None
        self.extended_smtp = False
        self.loop = loop
        self.proxy_data: Any = None
        self.auth_data: Any = None
        self.authenticated = False
        #: Set by the server: a short id that every log line of this session carries.
        self.id = ""

    @property
    def login_data(self) -> Any:
        """Deprecated aiosmtpd alias of ``auth_data``."""
        return self.auth_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self.auth_data = value


class Envelope:
    """One mail transaction: sender, recipients, options and content."""

    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.smtp_utf8 = False
        self.content: bytes | str | None = None
        self.original_content: bytes | None = None
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []

"""Per-connection Session and per-transaction Envelope, as aiosmtpd handlers know them."""

from __future__ import annotations

import asyncio
from typing import Any


class Session:
    """What the server knows about one client connection."""

    #: The screening verdict (``farm.screening.Verdict``) when ``[screening]`` is on.
    screening: Any = None
    #: The peer as the session's log lines show it, set by the first (``farm.smtp.logline``).
    log_peer: str | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.peer: Any = None
        self.ssl: dict[str, Any] | None = None
        self.host_name: str | None = None
        self.extended_smtp = False
        self.loop = loop
        self.proxy_data: Any = None
        self.auth_data: Any = None
        self.authenticated = False
        self._login_data: Any = None
        #: Set by the server: a short id that every log line of this session carries.
        self.id = ""

    @property
    def login_data(self) -> Any:
        """Deprecated (aiosmtpd): the login name after AUTH PLAIN/LOGIN, or what an older-style
        ``auth_*`` mechanism returned. Use ``auth_data``."""
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class Envelope:
    """One mail transaction: sender, recipients, options and content.

    After DATA (or the last BDAT) the engine sets :attr:`body` (a :class:`farm.smtp.body.Body`:
    stream it). ``content`` and ``original_content`` are aiosmtpd's attributes: read from the
    body on first use (``content`` is ``str`` with ``decode_data``), and may be assigned.
    """

    #: The message body as received (``farm.smtp.body.Body``), set by the engine.
    body: Any = None
    #: How ``content`` decodes the body (``"ascii"``/``"utf-8"`` with decode_data, else None).
    content_encoding: str | None = None
    #: True once a handler assigned ``original_content`` (streamers then send that instead).
    original_content_replaced = False
    _content: bytes | str | None = None
    _original_content: bytes | None = None

    #: The sender authentication results (``farm.authentication.Results``) when
    #: ``[authentication]`` is on: SPF from MAIL on, the rest once the data is in.
    authentication: Any = None
    #: ``key=value`` text a handler adds to the message's log line (the relay's next hop).
    log_note = ""

    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.smtp_utf8 = False
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []

    @property
    def original_content(self) -> bytes | None:
        """The message as received, as one ``bytes`` (read from :attr:`body` on first use)."""
        if self._original_content is None and self.body is not None:
            self._original_content = self.body.read_all()
        return self._original_content

    @original_content.setter
    def original_content(self, value: bytes | None) -> None:
        self._original_content = value
        self.original_content_replaced = value is not None

    @property
    def content(self) -> bytes | str | None:
        """``original_content``, decoded to ``str`` with ``decode_data`` (on first use)."""
        if self._content is None and self.body is not None:
            original = self.original_content
            encoding = self.content_encoding
            if original is not None and encoding is not None:
                self._content = original.decode(encoding, "surrogateescape")
            else:
                self._content = original
        return self._content

    @content.setter
    def content(self, value: bytes | str | None) -> None:
        self._content = value

"""What a scanner is told about a message, and what it answers.

:class:`ScanContext` is the envelope and connection facts every scanner gets (client address,
HELO, MAIL FROM, RCPTs, TLS, the authenticated user) plus the message as a
:class:`~farm.scan.message.MessageEdit` that scanners edit in turn. :class:`Verdict` is one
scanner's answer; ``action`` is also the ``action`` label of ``farm_scan_results_total``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from farm.scan.message import MessageEdit

__all__ = ["ACTIONS", "FINAL_ACTIONS", "ScanContext", "Verdict"]

#: Every ``action`` a scanner's verdict can carry (the metric's label values).
ACTIONS = (
    "accept",  # nothing to say (rspamd "no action", a milter's continue/accept)
    "add_header",  # rspamd "add header": marked as spam
    "rewrite_subject",  # rspamd "rewrite subject"
    "quarantine",  # a milter asked to quarantine (delivered, flagged)
    "discard",  # a milter asked to drop the message silently (250, not delivered)
    "tempfail",  # 4xx: rspamd soft reject / greylist, a milter's tempfail
    "reject",  # 5xx
    "error",  # the scanner failed (timeout, refused connection, malformed reply)
    "skipped",  # not scanned: larger than max_size
)

#: Actions that end the scan: later scanners are not asked.
FINAL_ACTIONS = frozenset({"discard", "tempfail", "reject"})


@dataclass
class ScanContext:
    """One message and its envelope, as the scanners see (and edit) it."""

    message: MessageEdit
    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str] = field(default_factory=list)
    client_address: str | None = None
    client_port: int = 0
    client_name: str | None = None  # a verified reverse-DNS name, when known
    helo: str | None = None
    user: str | None = None  # the SMTP AUTH login, when authenticated
    tls_version: str | None = None
    tls_cipher: str | None = None
    hostname: str = "localhost"  # ours ({j}, MTA-Name)
    queue_id: str = ""  # ours for this message ({i}, Queue-Id)
    #: Set by a milter's quarantine request: the reason.
    quarantine: str | None = None
    #: Envelope changes a milter made (change from, add/delete rcpt).
    envelope_changed: bool = False

    @classmethod
    def from_session(
        cls, message: MessageEdit, session: Any, envelope: Any, hostname: str, queue_id: str
    ) -> ScanContext:
        """Gather the facts from the engine's ``session`` and ``envelope``."""
        peer = session.peer
        address, port = (peer[0], int(peer[1])) if isinstance(peer, tuple) else (None, 0)
        if address is not None and address.startswith("::ffff:") and "." in address:
            address = address[7:]
        tls = session.ssl or {}
        cipher = tls.get("cipher")
        return cls(
            message=message,
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            mail_options=list(envelope.mail_options or ()),
            client_address=address,
            client_port=port,
            helo=session.host_name,
            user=_login(session) if session.authenticated else None,
            tls_version=tls.get("version"),
            tls_cipher=cipher[0] if isinstance(cipher, tuple) and cipher else None,
            hostname=hostname,
            queue_id=queue_id,
        )


def _login(session: Any) -> str | None:
    """The authenticated login name, never the password."""
    data = session.auth_data
    login = getattr(data, "login", data)
    if isinstance(login, bytes):
        return login.decode("utf-8", "replace")
    return login if isinstance(login, str) else None


@dataclass(frozen=True)
class Verdict:
    """One scanner's answer: an action from :data:`ACTIONS`, and the SMTP reply if final."""

    action: str
    reply: str | None = None
    detail: str = ""  # for the log: rspamd's score, a milter's error...

    @property
    def final(self) -> bool:
        return self.action in FINAL_ACTIONS

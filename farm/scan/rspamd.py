"""rspamd over its HTTP protocol (``POST /checkv2``), with one reused connection pool.

The client is aiohttp's: asyncio-native (no anyio layer in between, so it costs less per
request than httpx on our loop, uvloop included), with a C HTTP parser, keep-alive pooling in
its ``TCPConnector`` and Unix-socket connectors. One :class:`RspamdClient` per worker; its
session is created in the worker's loop on first use and reused for every message.

The envelope travels in rspamd's request headers (``IP``, ``Helo``, ``From``, one ``Rcpt`` per
recipient, ``User``, ``TLS-Version``/``TLS-Cipher``, ``Queue-Id``, ``MTA-Name``); our own
``Authentication-Results`` header is in the message itself when the authentication stage ran
first. The answer's action maps to a :class:`~farm.scan.verdict.Verdict`; its ``milter``
block (``remove_headers``, ``add_headers``) is applied to the message whatever the action, as
rspamd's own milter proxy does, so ``milter_headers`` routines reach the handler.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

from farm.scan.errors import ScanError
from farm.scan.message import HeaderError, MessageEdit
from farm.scan.replies import reply_text
from farm.scan.verdict import ScanContext, Verdict

__all__ = ["RspamdClient"]

log = logging.getLogger("farm.scan")

#: The header rspamd's proxy adds for "add header" (its ``spam_header`` default).
SPAM_HEADER = b"X-Spam"


class RspamdClient:
    """Scan messages with the rspamd normal worker at ``url`` (``http://HOST:PORT``)."""

    name = "rspamd"

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") + "/checkv2"
        self._session: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the session's

    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            import aiohttp  # imported on first use: farms without [scan] never load it

            self._loop = loop

            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def scan(self, context: ScanContext) -> Verdict:
        """Ask rspamd about the message; apply its header changes; return its verdict."""
        import aiohttp

        body = context.message.content()
        try:
            async with self._client().post(
                self.url, data=body, headers=request_headers(context)
            ) as response:
                payload = await response.read()
                status = response.status
        except aiohttp.ClientError as error:
            raise ScanError(f"rspamd at {self.url}: {error or type(error).__name__}") from None
        if status != 200:
            raise ScanError(f"rspamd at {self.url}: HTTP {status}")
        return apply_reply(context.message, parse_reply(payload))


def request_headers(context: ScanContext) -> Any:
    """The envelope as rspamd's request headers (``Rcpt`` repeated)."""
    from multidict import CIMultiDict

    headers: CIMultiDict[str] = CIMultiDict()
    if context.client_address:
        headers["IP"] = context.client_address
    if context.helo:
        headers["Helo"] = context.helo
    if context.client_name:
        headers["Hostname"] = context.client_name
    headers["From"] = context.mail_from
    for rcpt in context.rcpt_tos:
        headers.add("Rcpt", rcpt)
    if context.user:
        headers["User"] = context.user
    if context.tls_version:
        headers["TLS-Version"] = context.tls_version
    if context.tls_cipher:
        headers["TLS-Cipher"] = context.tls_cipher
    if context.queue_id:
        headers["Queue-Id"] = context.queue_id
    headers["MTA-Name"] = context.hostname
    for key, value in headers.items():
        if any(c in value for c in "\r\n\x00"):  # an address can't, but never inject a header
            headers[key] = value.replace("\r", "").replace("\n", "").replace("\x00", "")
    return headers


def parse_reply(payload: bytes) -> Mapping[str, Any]:
    """rspamd's JSON answer, checked enough to be used."""
    try:
        reply = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise ScanError(f"rspamd: malformed reply {payload[:80]!r}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("action"), str):
        raise ScanError(f"rspamd: reply without an action {payload[:80]!r}")
    return reply


def _smtp_message(reply: Mapping[str, Any], default: str) -> str:
    messages = reply.get("messages")
    text = messages.get("smtp_message") if isinstance(messages, dict) else None
    return reply_text(text if isinstance(text, str) else "", default)


def apply_reply(message: MessageEdit, reply: Mapping[str, Any]) -> Verdict:
    """Apply the ``milter`` block and the action's own edits; map the action to a verdict."""
    action = reply["action"]
    detail = f"action={action.replace(' ', '_')} score={reply.get('score', '?')}"
    if action == "reject":
        text = _smtp_message(reply, "Spam message rejected")
        return Verdict("reject", f"550 5.7.1 {text}", detail)
    if action in ("soft reject", "greylist"):
        default = "Greylisted, try again later" if action == "greylist" else "Try again later"
        return Verdict("tempfail", f"451 4.7.1 {_smtp_message(reply, default)}", detail)
    if action not in ("no action", "add header", "rewrite subject"):
        raise ScanError(f"rspamd: unknown action {action[:40]!r}")
    try:
        _apply_milter_block(message, reply.get("milter"))
        if action == "add header":
            message.remove(SPAM_HEADER)
            message.add(SPAM_HEADER, b"Yes")
            return Verdict("add_header", None, detail)
        if action == "rewrite subject":
            subject = reply.get("subject")
            if isinstance(subject, str) and subject:
                message.change(b"Subject", 1, subject.encode("utf-8"))
            return Verdict("rewrite_subject", None, detail)
    except HeaderError as error:
        raise ScanError(f"rspamd: {error}") from None
    return Verdict("accept", None, detail)


def _apply_milter_block(message: MessageEdit, block: Any) -> None:
    """rspamd's ``milter`` block: ``remove_headers`` {name: n}, then ``add_headers``.

    ``remove_headers`` n: 0 removes every instance, n > 0 the n-th, n < 0 counts from the end.
    ``add_headers`` values: a string, ``{"value", "order"}`` (order >= 0 inserts at that
    position, otherwise appends) or a list of either.
    """
    if not isinstance(block, dict):
        return
    removals = block.get("remove_headers")
    if isinstance(removals, dict):
        for name, index in removals.items():
            message.remove(name.encode("utf-8"), index if isinstance(index, int) else 0)
    additions = block.get("add_headers")
    if isinstance(additions, dict):
        for name, spec in additions.items():
            for item in spec if isinstance(spec, list) else [spec]:
                _add_header(message, name.encode("utf-8"), item)


def _add_header(message: MessageEdit, name: bytes, item: Any) -> None:
    if isinstance(item, str):
        message.add(name, item.encode("utf-8"))
    elif isinstance(item, dict) and isinstance(item.get("value"), str):
        value = item["value"].encode("utf-8")
        order = item.get("order")
        if isinstance(order, int) and order >= 0:
            message.insert(order, name, value)
        else:
            message.add(name, value)

"""Scanning as an end-of-data stage: rspamd, then each milter, before the handler's handle_DATA.

:class:`ScanStage` is a :class:`farm.smtp.stages.Stage` (``farm.pipeline`` puts it after
sender authentication, so scanners see our Authentication-Results header). Its ``end_of_data``
lets the message go on to the handler (with the scanners' header, body and envelope edits
applied to the envelope directly: they go beyond :class:`EndOfData`'s prepend/remove) or ends
it with a reply: a scanner's reject or tempfail, ``on_error``'s 451, or a 250 for a message a
milter discarded (the handler then does not run). One verdict per message, for all recipients.
The verdicts go into the engine's per-message log line (``scan=rspamd:reject,...``).

Scanners run in order, each seeing the message as the earlier ones left it, within one
``timeout`` for all of them; the first reject, tempfail or discard ends the scan. A failed
scanner (refused connection, timeout, broken reply) is logged and counted, and ``on_error``
decides: ``tempfail`` answers 451 4.7.1, ``accept`` goes on as if it had not been asked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from farm.scan.errors import ScanError
from farm.scan.message import MessageEdit
from farm.scan.milter import MilterClient
from farm.scan.rspamd import RspamdClient
from farm.scan.verdict import ScanContext, Verdict
from farm.smtp.body import envelope_body
from farm.smtp.stages import GO_ON, EndOfData, Stage

__all__ = ["SCAN_FAILED", "ScanStage", "message_bytes"]

log = logging.getLogger("farm.scan")

SCAN_FAILED = "451 4.7.1 Content scanning failed, try again later"
DISCARDED = "250 2.7.0 Ok, discarded"
#: The header a message too large to scan gets.
SKIPPED_HEADER = b"X-Farm-Scan"


class Scanner(Protocol):
    name: str

    async def scan(self, context: ScanContext) -> Verdict: ...

    async def close(self) -> None: ...


def message_bytes(envelope: Any) -> bytes:
    """The message the scanners read, through body spooling's API (``envelope_body``).

    Read whole (a spooled body counts in the worker's body memory budget while it is
    scanned); streaming it to the scanners in chunks is not done yet.
    """
    return envelope_body(envelope).read_all()


def store_message(envelope: Any, content: bytes) -> None:
    """Put the edited message back where the handler reads it (``content`` as it was typed)."""
    envelope.original_content = content
    encoding = getattr(envelope, "content_encoding", None)
    envelope.content = content if encoding is None else content.decode(encoding, "surrogateescape")


class ScanStage(Stage):
    """The ``[scan]`` settings turned into scanners, asked once per message."""

    name = "scan"

    def __init__(self, settings: Any, hostname: str = "localhost", stats: Any = None) -> None:
        self.settings = settings
        self.hostname = hostname
        self.stats = stats
        self.scanners: list[Scanner] = []
        if settings.rspamd:
            self.scanners.append(RspamdClient(settings.rspamd))
        self.scanners += [MilterClient(spec) for spec in settings.milters]

    async def shutdown(self) -> None:
        """The worker is ending: close the scanners' connections (``close`` is per session)."""
        for scanner in self.scanners:
            await scanner.close()

    def message_log(self, session: Any, envelope: Any) -> str:
        results = getattr(envelope, "scan_results", None)
        return f"scan={','.join(results)}" if results else ""

    async def end_of_data(self, session: Any, envelope: Any) -> EndOfData:
        # The engine's message number in this session (its log line's ``msg=<session>.<n>``).
        session.scan_messages = getattr(session, "scan_messages", 0) + 1
        reply = await self._scan(session, envelope)
        return GO_ON if reply is None else EndOfData(reply)

    async def _scan(self, session: Any, envelope: Any) -> str | None:
        stats = self.stats
        raw = message_bytes(envelope)
        settings = self.settings
        if len(raw) > settings.max_size:
            for scanner in self.scanners:
                _count(stats, scanner.name, "skipped")
            message = MessageEdit(raw)
            note = f"not scanned; size {len(raw)} > max_size {settings.max_size}".encode()
            message.insert(0, SKIPPED_HEADER, note)
            store_message(envelope, message.content())
            envelope.scan_results = ["skipped"]
            log.info("session=%s scan skipped: %d bytes > max_size", session.id, len(raw))
            return None
        queue_id = f"{session.id}.{session.scan_messages}"
        context = ScanContext.from_session(
            MessageEdit(raw), session, envelope, self.hostname, queue_id
        )
        reply, results = await self._run(context, stats)
        envelope.scan_results = results
        if reply is not None:
            return reply
        if context.quarantine is not None:
            envelope.quarantine = context.quarantine
        if context.message.changed:
            store_message(envelope, context.message.content())
        if context.envelope_changed:
            envelope.mail_from = context.mail_from
            envelope.mail_options = context.mail_options
            envelope.rcpt_tos = context.rcpt_tos
            if not context.rcpt_tos:
                log.warning("session=%s scan: every recipient deleted; discarded", session.id)
                return DISCARDED
        return None

    async def _run(self, context: ScanContext, stats: Any) -> tuple[str | None, list[str]]:
        """Ask each scanner in turn; return the reply that ends the message (or None)."""
        results: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeout
        for scanner in self.scanners:
            started = time.perf_counter()
            try:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    verdict = await scanner.scan(context)
            except (ScanError, TimeoutError) as error:
                verdict = Verdict("error", None, str(error) or "timed out")
            _count(stats, scanner.name, verdict.action, time.perf_counter() - started)
            results.append(f"{scanner.name}:{verdict.action}")
            if verdict.action == "error":
                log.warning(
                    "scan: %s failed (%s); on_error=%s",
                    scanner.name,
                    verdict.detail,
                    self.settings.on_error,
                )
                if self.settings.on_error == "tempfail":
                    return SCAN_FAILED, results
                continue
            if verdict.final:
                return (verdict.reply or DISCARDED), results
        return None, results


def _count(stats: Any, scanner: str, action: str, seconds: float | None = None) -> None:
    if stats is not None:
        stats.scan_result(scanner, action, seconds)

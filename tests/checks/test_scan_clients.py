"""The scanners against real rspamd (HTTP and milter paths) and real OpenDKIM (a second milter).

Each test builds a :class:`ScanContext` as the engine would and runs one scanner on it, then
checks the verdict and the message the handler would get. The end-to-end tests (smtplib ->
farm serve -> Maildir) are in test_scan_serve.py.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import pytest

from farm.scan.errors import ScanError
from farm.scan.message import MessageEdit
from farm.scan.milter import MilterClient
from farm.scan.rspamd import RspamdClient
from farm.scan.verdict import ScanContext, Verdict
from tests.support.rspamd import GTUBE, OpenDKIM, Rspamd, needs_opendkim, needs_rspamd
from tests.support.wait import wait_for

pytestmark = needs_rspamd


def message(subject: str, body: bytes = b"hello\r\n", sender: str = "a@example.com") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <b@example.org>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject[:20]}@example.com>\r\nDate: Sat, 05 Dec 2026 14:00:00 +0000\r\n\r\n"
    ).encode() + body


def context(raw: bytes, client: str = "127.0.0.2", queue_id: str = "Q1") -> ScanContext:
    return ScanContext(
        MessageEdit(raw),
        mail_from="a@example.com",
        rcpt_tos=["b@example.org", "c@example.org"],
        client_address=client,
        client_port=40000,
        helo="client.example.net",
        hostname="mx.farm.test",
        queue_id=queue_id,
    )


def scan(make: Callable[[], Any], ctx: ScanContext) -> Verdict:
    async def run() -> Verdict:
        scanner = make()
        try:
            return await scanner.scan(ctx)
        finally:
            await scanner.close()

    return asyncio.run(run())


@pytest.fixture(params=["http", "milter"])
def scanner(request: pytest.FixtureRequest, rspamd: Rspamd) -> Callable[[], Any]:
    """rspamd through its HTTP protocol, or through its proxy in milter mode."""
    if request.param == "http":
        return lambda: RspamdClient(rspamd.url)
    return lambda: MilterClient(rspamd.milter)


def header_values(raw: bytes, name: str) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    unfolded = re.sub(r"\r\n[ \t]+", " ", head)
    prefix = name.lower() + ":"
    return [
        line[len(prefix) :].strip()
        for line in unfolded.split("\r\n")
        if line.lower().startswith(prefix)
    ]


def test_gtube_is_rejected(scanner: Callable[[], Any]) -> None:
    ctx = context(message("gtube", GTUBE + b"\r\n"))
    verdict = scan(scanner, ctx)
    assert verdict.action == "reject"
    # rspamd's HTTP reply -> our 550; its milter proxy answers 554 itself (passed on as is).
    assert re.fullmatch(r"55[04] 5\.7\.1 Gtube pattern", verdict.reply or ""), verdict


def test_clean_message_gets_rspamds_headers(scanner: Callable[[], Any]) -> None:
    raw = message("hello")
    ctx = context(raw)
    verdict = scan(scanner, ctx)
    assert verdict.action == "accept" and verdict.reply is None
    out = ctx.message.content()
    assert header_values(out, "X-Spam-Status") == ["No, score=0.00"]
    assert header_values(out, "X-Spamd-Result")[0].startswith("default: False [0.00 / 15.00]")
    assert header_values(out, "X-Spam") == []
    assert out.endswith(b"\r\n\r\nhello\r\n") and out.startswith(raw.split(b"\r\n\r\n")[0])


def test_soft_reject_is_a_tempfail(scanner: Callable[[], Any]) -> None:
    verdict = scan(scanner, context(message("FARM-SOFT-REJECT now")))
    assert verdict.action == "tempfail"
    assert verdict.reply == "451 4.7.1 Try again later (farm test)"


def test_add_header_marks_the_message(scanner: Callable[[], Any]) -> None:
    ctx = context(message("FARM-ADD-HEADER please"))
    verdict = scan(scanner, ctx)
    assert verdict.action in ("add_header", "accept")  # a milter does not name the action
    assert verdict.reply is None
    out = ctx.message.content()
    assert header_values(out, "X-Spam") == ["Yes"]
    assert header_values(out, "X-Spam-Status") == ["Yes, score=7.00"]
    assert "FARM_TEST_ADD_HEADER(7.00)" in header_values(out, "X-Spamd-Result")[0]


def test_rewrite_subject(scanner: Callable[[], Any]) -> None:
    ctx = context(message("FARM-REWRITE-SUBJECT offer"))
    verdict = scan(scanner, ctx)
    assert verdict.reply is None
    assert header_values(ctx.message.content(), "Subject") == ["[SPAM] FARM-REWRITE-SUBJECT offer"]


def test_envelope_reaches_rspamd(scanner: Callable[[], Any], rspamd: Rspamd) -> None:
    """rspamd logs the client address, sender, recipients and our queue id it was given."""
    queue_id = f"QENV{id(scanner)}"
    scan(scanner, context(message("envelope"), client="127.0.0.7", queue_id=queue_id))

    def logged() -> str | None:
        for line in rspamd.log().splitlines():
            if f"qid: <{queue_id}>" in line:
                return line
        return None

    line = wait_for(logged, what="rspamd's task log line")
    assert "ip: 127.0.0.7" in line
    assert "from: <a@example.com>" in line
    assert "rcpts: <b@example.org,c@example.org>" in line


def test_ten_megabyte_message_is_scanned(scanner: Callable[[], Any]) -> None:
    line = b"x" * 998 + b"\r\n"
    body = line * (10 * 1024 * 1024 // len(line))
    ctx = context(message("big", body))
    verdict = scan(scanner, ctx)
    assert verdict.action == "accept"
    out = ctx.message.content()
    assert header_values(out, "X-Spam-Status") == ["No, score=0.00"]
    assert out.endswith(b"\r\n\r\n" + body)


def test_stopped_rspamd_is_an_error_not_a_hang(own_rspamd: Rspamd) -> None:
    """Both paths: a clean scan first (the HTTP connection is then pooled), then rspamd stops."""

    async def run() -> list[str]:
        http, milter = RspamdClient(own_rspamd.url), MilterClient(own_rspamd.milter)
        try:
            for client in (http, milter):
                assert (await client.scan(context(message("before")))).action == "accept"
            own_rspamd.stop()
            errors = []
            for client in (http, milter):
                with pytest.raises(ScanError) as raised:
                    async with asyncio.timeout(20):
                        await client.scan(context(message("after")))
                errors.append(str(raised.value))
            return errors
        finally:
            await http.close()

    http_error, milter_error = asyncio.run(run())
    assert "rspamd at http://127.0.0.1" in http_error
    assert milter_error.startswith(f"milter {own_rspamd.milter}: ")


@needs_opendkim
def test_opendkim_signs_with_an_inserted_header(opendkim: OpenDKIM) -> None:
    """OpenDKIM signs for a client in InternalHosts: DKIM-Signature inserted at the top."""
    ctx = context(message("sign me"), client="127.0.0.1")
    verdict = scan(lambda: MilterClient(opendkim.milter), ctx)
    assert verdict.action == "accept"
    out = ctx.message.content()
    assert out.startswith(b"DKIM-Signature:"), out[:200]
    signature = header_values(out, "DKIM-Signature")[0]
    assert "d=example.com" in signature and "s=farm" in signature


@needs_opendkim
def test_opendkim_verifies_with_an_added_header(opendkim: OpenDKIM) -> None:
    ctx = context(message("unsigned"), client="127.0.0.2")
    verdict = scan(lambda: MilterClient(opendkim.milter), ctx)
    assert verdict.action == "accept"
    results = header_values(ctx.message.content(), "Authentication-Results")
    assert results and results[0].startswith("farm-test;") and "dkim=none" in results[0]


@needs_opendkim
def test_two_milters_in_order(rspamd: Rspamd, opendkim: OpenDKIM) -> None:
    """rspamd's milter, then OpenDKIM on the message rspamd's edits left: both edits land."""

    async def run(ctx: ScanContext) -> list[Verdict]:
        return [await MilterClient(spec).scan(ctx) for spec in (rspamd.milter, opendkim.milter)]

    ctx = context(message("chain"), client="127.0.0.1")
    verdicts = asyncio.run(run(ctx))
    assert [v.action for v in verdicts] == ["accept", "accept"]
    out = ctx.message.content()
    assert header_values(out, "X-Spam-Status") == ["No, score=0.00"]
    assert out.startswith(b"DKIM-Signature:")
    assert "d=example.com" in header_values(out, "DKIM-Signature")[0]

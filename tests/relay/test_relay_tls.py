"""TLS to the next hop: none, starttls, required and implicit, with certificates from trustme,
farm's own engine as a TLS-capable next hop (smtp-sink has no TLS), and the STARTTLS
response-injection guard (security notes 6.1 item 37)."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import RecordingHandler
from tests.support.loops import both_loops  # noqa: F401  (loop_kind: asyncio and uvloop)
from tests.support.relay import (
    DOMAIN,
    HAVE_SINK,
    FakeNextHop,
    LoopThread,
    attempt,
    message,
    smtp_dialogue,
)
from tests.support.relay import make_relay as relay

TLS_FAILED = 451, b"4.7.5"


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture(scope="module")
def loopback_context(ca: trustme.CA) -> ssl.SSLContext:
    return server_context(ca, "127.0.0.1", "farm.test")


def tls_next_hop(make_controller: Any, context: ssl.SSLContext, implicit: bool = False) -> Any:
    """farm's engine with a recording handler: STARTTLS offered, or TLS from the connect."""
    recorder = RecordingHandler()
    keyword = "ssl_context" if implicit else "tls_context"
    controller = make_controller(recorder, **{keyword: context})
    return recorder, f"127.0.0.1:{controller.port}"


@pytest.mark.parametrize("mode", ["none", "starttls", "required", "implicit"])
def test_tls_modes(
    make_controller: Any, serve: Any, loopback_context: Any, ca_file: str, mode: str
) -> None:
    recorder, next_hop = tls_next_hop(make_controller, loopback_context, mode == "implicit")
    controller = serve(relay(next_hop, tls=mode, tls_ca_file=ca_file))
    result = attempt(controller.port, [f"r@{DOMAIN}"], message(f"tls-{mode}"))
    assert result.accepted, result
    assert recorder.received.wait(5)
    session = recorder.sessions[0]
    assert (session.ssl is not None) == (mode != "none")
    assert b"Subject: tls-" + mode.encode() in recorder.envelopes[0].original_content


@pytest.mark.skipif(not HAVE_SINK, reason="smtp-sink not installed")
def test_starttls_not_offered(serve: Any, sink: Any, ca_file: str) -> None:
    """smtp-sink offers no STARTTLS: ``starttls`` goes on in plain text, ``required`` does not
    (and ``implicit`` cannot even handshake)."""
    next_hop = sink()
    plain = serve(relay(next_hop.next_hop, tls="starttls", tls_ca_file=ca_file))
    assert attempt(plain.port, [f"r@{DOMAIN}"], message("opportunistic")).accepted
    next_hop.wait_for(b"Subject: opportunistic")
    for mode in ("required", "implicit"):
        strict = serve(relay(next_hop.next_hop, tls=mode, tls_ca_file=ca_file))
        result = attempt(strict.port, [f"r@{DOMAIN}"], message(f"strict-{mode}"))
        assert result.final is None and result.rcpt[0][0] == 451, result
        assert b"strict-" not in next_hop.text()
    assert result.rcpt[0][1].startswith(b"4.7.5") or result.rcpt[0][1].startswith(b"4.4")


def test_certificate_verification(
    make_controller: Any, serve: Any, loopback_context: Any, ca_file: str
) -> None:
    recorder, next_hop = tls_next_hop(make_controller, loopback_context)
    untrusted = serve(relay(next_hop, tls="required"))  # system CAs: trustme's is not one
    result = attempt(untrusted.port, [f"r@{DOMAIN}"], message("untrusted"))
    assert result.final is None and result.rcpt[0][1][:5] == TLS_FAILED[1], result
    unverified = serve(relay(next_hop, tls="required", tls_verify=False))
    assert attempt(unverified.port, [f"r@{DOMAIN}"], message("unverified")).accepted
    assert recorder.received.wait(5) and len(recorder.envelopes) == 1


def test_tls_server_name(make_controller: Any, serve: Any, ca: Any, ca_file: str) -> None:
    """A certificate for mx.farm.test only: checked against the next hop's host by default,
    against ``tls_server_name`` when set."""
    context = server_context(ca, "mx.farm.test")
    recorder, next_hop = tls_next_hop(make_controller, context, implicit=True)
    by_host = serve(relay(next_hop, tls="implicit", tls_ca_file=ca_file))
    result = attempt(by_host.port, [f"r@{DOMAIN}"], message("by-host"))
    assert result.final is None and result.rcpt[0][0] == 451, result
    named = serve(
        relay(next_hop, tls="implicit", tls_ca_file=ca_file, tls_server_name="mx.farm.test")
    )
    assert attempt(named.port, [f"r@{DOMAIN}"], message("named")).accepted
    assert recorder.received.wait(5) and len(recorder.envelopes) == 1


def test_starttls_response_injection(
    serve: Any, loop_thread: LoopThread, ca_file: str, caplog: Any
) -> None:
    """The next hop answers STARTTLS with ``220 Go ahead\\r\\n250 x\\r\\n`` in one segment: the
    relay must not take the ``250`` as a reply read over TLS; it gives up, temporarily."""

    async def injector(reader: Any, writer: Any, hop: FakeNextHop) -> None:
        writer.write(b"220 fake ESMTP\r\n")
        while line := await reader.readline():
            hop.lines.append(line)
            verb = line[:8].upper()
            if verb.startswith(b"EHLO"):
                writer.write(b"250-fake\r\n250 STARTTLS\r\n")
            elif verb.startswith(b"STARTTLS"):
                writer.write(b"220 Go ahead\r\n250 x\r\n")
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    hop = FakeNextHop(injector, loop_thread).start()
    for mode in ("starttls", "required"):
        controller = serve(relay(hop.next_hop, tls=mode, tls_ca_file=ca_file))
        with caplog.at_level(logging.INFO, logger="farm.relay"):
            result = attempt(controller.port, [f"r@{DOMAIN}"], message("injected"))
        assert result.final is None and result.rcpt[0][0] == 451, result
        assert result.rcpt[0][1].startswith(b"4.7.5"), result
    assert not any(line.upper().startswith(b"MAIL") for line in hop.lines), hop.lines
    assert any("response injection" in r.getMessage() for r in caplog.records)


def starttls_then(context: ssl.SSLContext, before: bytes, **after: bool) -> Any:
    """A fake next hop offering ``before`` and STARTTLS; after the handshake ``smtp_dialogue``
    with ``after`` (``pipelining``, ``chunking``) as its extensions."""

    async def script(reader: Any, writer: Any, hop: FakeNextHop) -> None:
        writer.write(b"220 fake ESMTP\r\n")
        hop.lines.append(await reader.readline())
        writer.write(b"250-fake\r\n" + before + b"250 STARTTLS\r\n")
        hop.lines.append(await reader.readline())
        writer.write(b"220 go ahead\r\n")
        await writer.drain()
        await writer.start_tls(context)
        await smtp_dialogue(reader, writer, hop, greet=False, **after)

    return script


@pytest.mark.parametrize("offered", ["before TLS", "after TLS"])
def test_extensions_as_offered_over_tls(
    serve: Any, loop_thread: LoopThread, loopback_context: Any, ca_file: str, offered: str
) -> None:
    """PIPELINING and CHUNKING are used as the next hop offers them after STARTTLS: offered
    only before, a BDAT would get ``502``; offered only after, the fake insists on them (its
    MAIL is answered only with the RCPT sent in the same write)."""
    both = b"250-PIPELINING\r\n250-CHUNKING\r\n"
    after = offered == "after TLS"
    script = starttls_then(
        loopback_context, b"" if after else both, pipelining=after, chunking=after
    )
    hop = FakeNextHop(script, loop_thread).start()
    controller = serve(relay(hop.next_hop, tls="required", tls_ca_file=ca_file, timeout=3.0))
    result = attempt(controller.port, [f"r@{DOMAIN}"], message("over-tls"))
    assert result.accepted, result
    verbs = [line.split()[0].split(b":")[0].upper() for line in hop.lines]
    assert verbs == [b"EHLO", b"STARTTLS", b"EHLO", b"MAIL", b"RCPT"] + (
        [b"BDAT"] if after else [b"DATA"]
    )
    assert len(hop.messages) == 1 and b"Subject: over-tls" in hop.messages[0]


def test_tls_failure_log_has_no_traceback(
    make_controller: Any, serve: Any, loopback_context: Any, caplog: Any
) -> None:
    _, next_hop = tls_next_hop(make_controller, loopback_context)
    controller = serve(relay(next_hop, tls="required"))
    with caplog.at_level(logging.INFO, logger="farm.relay"):
        attempt(controller.port, [f"r@{DOMAIN}"], message("x"))
    records = [r for r in caplog.records if r.name == "farm.relay"]
    assert records and all(r.exc_info is None for r in records)
    assert any("SSLCertVerificationError" in r.getMessage() for r in records), records


def test_ca_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        relay("127.0.0.1:25", tls="required", tls_ca_file=str(tmp_path / "missing.pem"))

"""Sender authentication ([authentication]) against a real unbound serving SPF, DKIM and DMARC
records (tests/support/mail_auth_zones.py): every SPF result class, DKIM signatures made by dkimpy
here, an ARC chain sealed here, DMARC reject/quarantine/pct/subdomain policy, the forged
header removal, deadlines (a server that never answers, a dead resolver), and three kinds of
handler. Clients connect from 127.0.0.3 (SPF pass) and 127.0.0.4 (SPF fail).
"""

from __future__ import annotations

import logging
import re
import smtplib
import threading
from pathlib import Path
from typing import Any

import pytest

from farm.authentication import AuthenticationStage
from farm.maildir import Maildir
from farm.metrics import WorkerStats
from farm.resolver import Resolver
from farm.smtp import AuthResult
from tests.support import mail_auth_zones as zones
from tests.support.client import SMTPClient
from tests.support.loops import both_loops  # noqa: F401 (every engine test on asyncio and uvloop)
from tests.support.wait import WAIT

ID = "mx.test"


def stage(dns: Any, stats: WorkerStats | None = None, **options: Any) -> AuthenticationStage:
    settings: dict[str, Any] = {"dmarc": "enforce", "timeout": 5.0}
    settings.update(options)
    return AuthenticationStage(
        Resolver([dns.address], observe=stats.dns_time if stats else None),
        ID,
        stats=stats,
        **settings,
    )


def send(
    port: int,
    source: str,
    sender: str,
    content: bytes,
    helo: str = "client.test",
) -> tuple[tuple[int, bytes], tuple[int, bytes] | None]:
    """(MAIL reply, DATA reply or None when MAIL was refused)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT, source_address=(source, 0)) as client:
        client.ehlo(helo)
        mail = client.docmd(f"MAIL FROM:<{sender}>")
        if mail[0] != 250:
            return mail, None
        assert client.rcpt("bob@mx.test")[0] == 250
        code, text = client.data(content)  # the reply after the final dot
        return mail, (code, b"" if code == 250 else text)


def send_bdat(port: int, source: str, sender: str, content: bytes) -> str:
    """The reply to BDAT LAST (the whole message in one chunk)."""
    with SMTPClient(port, source=source) as client:
        client.reply()
        for command in ("EHLO client.test", f"MAIL FROM:<{sender}>", "RCPT TO:<bob@mx.test>"):
            assert client.command(command).startswith("250")
        client.send(f"BDAT {len(content)} LAST\r\n".encode() + content)
        return client.reply()


def results(content: bytes) -> list[str]:
    """The resinfo items of the message's first header field, which must be ours."""
    first = re.match(rb"Authentication-Results: (.*?)\r\n(?![ \t])", content, re.DOTALL)
    assert first is not None, content[:300]
    value = re.sub(r"\r\n[ \t]+", " ", first[1].decode())
    authserv_id, *items = [item.strip() for item in value.split(";")]
    assert authserv_id == ID
    return items


def delivered(handler: Any) -> list[str]:
    return results(handler.envelopes[-1].original_content)


def method(items: list[str], name: str) -> list[str]:
    return [item for item in items if item.startswith(name + "=")]


# -- SPF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "domain", "result"),
    [
        (zones.SPF_PASS, "example.test", "pass"),
        (zones.SPF_FAIL, "example.test", "fail"),
        (zones.SPF_FAIL, "softfail.test", "softfail"),
        (zones.SPF_FAIL, "neutral.test", "neutral"),
        (zones.SPF_FAIL, "nospf.test", "none"),
        (zones.SPF_FAIL, "permerror.test", "permerror"),
        (zones.SPF_FAIL, "temperror.test", "temperror"),  # a name the resolver refuses
    ],
)
def test_every_spf_result(
    make_controller: Any, handler: Any, mail_dns: Any, source: str, domain: str, result: str
) -> None:
    stats = WorkerStats()
    controller = make_controller(
        handler, stages=[stage(mail_dns, stats, dkim=False, dmarc="off", arc=False)]
    )
    mail, data = send(controller.port, source, f"alice@{domain}", zones.message())
    assert mail[0] == 250 and data == (250, b"")
    (spf,) = method(delivered(handler), "spf")
    assert re.fullmatch(rf"spf={result}( \(.*\))? smtp\.mailfrom={re.escape(domain)}", spf), spf
    assert handler.envelopes[-1].authentication.spf.result == result
    assert stats.authentication == {("spf", result): 1}


def test_the_helo_name_is_checked_for_the_null_sender(
    make_controller: Any, handler: Any, mail_dns: Any
) -> None:
    controller = make_controller(handler, stages=[stage(mail_dns, dkim=False, dmarc="off")])
    send(controller.port, zones.SPF_PASS, "", zones.message(), helo="helo.test")
    assert method(delivered(handler), "spf") == ["spf=pass smtp.helo=helo.test"]
    send(controller.port, zones.SPF_FAIL, "", zones.message(), helo="helo.test")
    assert method(delivered(handler), "spf") == ["spf=fail smtp.helo=helo.test"]


def test_spf_reject_fail_refuses_at_mail(
    make_controller: Any, handler: Any, mail_dns: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stats = WorkerStats()
    controller = make_controller(
        handler,
        stages=[stage(mail_dns, stats, spf_reject_fail=True)],
        enhanced_status_codes=True,
    )
    mail, data = send(controller.port, zones.SPF_FAIL, "alice@example.test", zones.message())
    assert mail == (
        550,
        b"5.7.23 SPF validation failed: example.test does not allow [127.0.0.4] to send its mail",
    )
    assert data is None and not handler.envelopes
    assert "MAIL from=<alice@example.test> refused: SPF fail for 127.0.0.4" in caplog.text
    assert stats.authentication_actions["spf_reject"] == 1
    # softfail is not fail
    assert send(controller.port, zones.SPF_FAIL, "a@softfail.test", zones.message())[1]


# -- DKIM and ARC ---------------------------------------------------------------------------------


def test_dkim_every_signature_and_every_result(
    make_controller: Any, handler: Any, mail_dns: Any
) -> None:
    controller = make_controller(handler, stages=[stage(mail_dns, dmarc="off")])
    port, source = controller.port, zones.SPF_PASS

    def dkim_of(content: bytes) -> list[str]:
        send(port, source, "alice@example.test", content)
        return method(delivered(handler), "dkim")

    signed = zones.dkim_signed(zones.message())
    (good,) = dkim_of(signed)
    b_start = r'([A-Za-z0-9+]{8}|"[A-Za-z0-9+/=]{8}")'  # a token, or quoted (with / or =)
    assert re.fullmatch(
        r"dkim=pass header\.d=example\.test header\.s=sel header\.b=" + b_start, good
    )

    tampered = signed.replace(b"Hello there.", b"Hello THERE.")
    assert dkim_of(tampered)[0].startswith("dkim=fail (body hash mismatch) header.d=")

    no_key = zones.dkim_signed(zones.message(), selector="nokey")
    assert dkim_of(no_key)[0].startswith("dkim=permerror (no key) header.d=example.test")

    bad_key = zones.dkim_signed(zones.message(), selector="broken")
    assert dkim_of(bad_key)[0].startswith("dkim=permerror (bad key")

    refused = zones.dkim_signed(zones.message(), domain="example.net")  # not served: REFUSED
    assert dkim_of(refused)[0].startswith("dkim=temperror (key lookup failed) header.d=example.net")

    garbled = b"DKIM-Signature: v=1; a=rsa-sha256; this is not a tag list\r\n" + zones.message()
    assert dkim_of(garbled) == ["dkim=neutral (signature syntax error)"]

    twice = zones.dkim_signed(tampered)  # a good signature over an older, broken one
    assert [item.split()[0] for item in dkim_of(twice)] == ["dkim=pass", "dkim=fail"]

    assert dkim_of(zones.message()) == ["dkim=none"]


def test_arc_chains(make_controller: Any, handler: Any, mail_dns: Any) -> None:
    controller = make_controller(handler, stages=[stage(mail_dns, dmarc="off")])
    sealed = zones.arc_sealed(zones.dkim_signed(zones.message()))
    send(controller.port, "127.0.0.5", "alice@forwarder.test", sealed)
    assert method(delivered(handler), "arc") == ["arc=pass"]

    broken = sealed.replace(b"Hello there.", b"Changed on the way.")
    send(controller.port, "127.0.0.5", "alice@forwarder.test", broken)
    (arc,) = method(delivered(handler), "arc")
    assert arc.startswith("arc=fail")

    send(controller.port, "127.0.0.5", "alice@forwarder.test", zones.message())
    assert method(delivered(handler), "arc") == ["arc=none"]


# -- DMARC ----------------------------------------------------------------------------------------


def test_dmarc_reject_is_refused_after_data_and_after_bdat_last(
    make_controller: Any, handler: Any, mail_dns: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stats = WorkerStats()
    controller = make_controller(
        handler, stages=[stage(mail_dns, stats)], enhanced_status_codes=True, chunking=True
    )
    refusal = b"5.7.1 Message rejected per the DMARC policy of example.test"
    _, data = send(controller.port, zones.SPF_FAIL, "alice@example.test", zones.message())
    assert data == (550, refusal)
    reply = send_bdat(controller.port, zones.SPF_FAIL, "alice@example.test", zones.message())
    assert reply == "550 " + refusal.decode() + "\r\n"
    assert not handler.envelopes
    assert stats.authentication_actions["dmarc_reject"] == 2
    assert "outcome=550" in caplog.text and "spf=fail dkim=none arc=none dmarc=fail/reject" in (
        caplog.text
    )
    # DKIM aligned: a pass whatever SPF says.
    _, data = send(
        controller.port, zones.SPF_FAIL, "a@example.test", zones.dkim_signed(zones.message())
    )
    assert data == (250, b"")
    assert method(delivered(handler), "dmarc") == [
        "dmarc=pass (p=reject dis=none) header.from=example.test"
    ]


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        (
            "a@quarantine.test",
            "dmarc=fail (p=quarantine dis=quarantine) header.from=quarantine.test",
        ),
        # no record of its own: the organizational domain's, and its subdomain policy sp=
        (
            "a@sub.example.test",
            "dmarc=fail (p=quarantine dis=quarantine) header.from=sub.example.test",
        ),
        # p=reject with pct=0: sampled out, so quarantine (RFC 7489 6.6.4)
        (
            "a@sampled.test",
            "dmarc=fail (p=reject dis=quarantine sampled_out) header.from=sampled.test",
        ),
        ("a@nospf.test", "dmarc=none header.from=nospf.test"),
    ],
)
def test_dmarc_policies_that_deliver(
    make_controller: Any, handler: Any, mail_dns: Any, sender: str, expected: str
) -> None:
    stats = WorkerStats()
    controller = make_controller(handler, stages=[stage(mail_dns, stats)])
    _, data = send(controller.port, zones.SPF_FAIL, sender, zones.message(sender=sender))
    assert data == (250, b"")
    assert method(delivered(handler), "dmarc") == [expected]
    if "dis=quarantine" in expected:
        assert stats.authentication_actions["dmarc_quarantine"] == 1


def test_dmarc_report_only_marks(make_controller: Any, handler: Any, mail_dns: Any) -> None:
    controller = make_controller(handler, stages=[stage(mail_dns, dmarc="report")])
    _, data = send(controller.port, zones.SPF_FAIL, "alice@example.test", zones.message())
    assert data == (250, b"")
    assert method(delivered(handler), "dmarc") == [
        "dmarc=fail (p=reject dis=reject) header.from=example.test"
    ]


def test_several_from_fields_are_a_dmarc_permerror(
    make_controller: Any, handler: Any, mail_dns: Any
) -> None:
    controller = make_controller(handler, stages=[stage(mail_dns)])
    content = zones.message(extra_headers="From: mallory@elsewhere.test\r\n")
    _, data = send(controller.port, zones.SPF_PASS, "alice@example.test", content)
    assert data == (250, b"")
    assert method(delivered(handler), "dmarc") == ["dmarc=permerror (several From fields)"]


# -- the header ---------------------------------------------------------------------------------


def test_forged_results_for_our_id_are_removed_others_kept(
    make_controller: Any, handler: Any, mail_dns: Any
) -> None:
    controller = make_controller(handler, stages=[stage(mail_dns)])
    forged = (
        "Authentication-Results: mx.test; spf=pass smtp.mailfrom=example.test\r\n"
        "Authentication-Results: (looks legit)\r\n MX.Test;\r\n\tdmarc=pass\r\n"
        "Authentication-Results: relay.other.test; spf=pass smtp.mailfrom=example.test\r\n"
    )
    content = zones.message(sender="alice@softfail.test", extra_headers=forged)
    send(controller.port, zones.SPF_FAIL, "alice@softfail.test", content)
    received = handler.envelopes[-1].original_content
    assert method(results(received), "spf") == ["spf=softfail smtp.mailfrom=softfail.test"]
    fields = re.findall(rb"^Authentication-Results:", received, re.MULTILINE)
    assert len(fields) == 2
    assert b"Authentication-Results: relay.other.test; spf=pass" in received
    assert b"looks legit" not in received
    assert handler.envelopes[-1].content == received  # bytes handler: the same message


# -- deadlines and DNS failures -------------------------------------------------------------------


def test_a_server_that_never_answers_gives_temperror_and_delays_nobody_else(
    make_controller: Any, handler: Any, mail_dns: Any
) -> None:
    controller = make_controller(handler, stages=[stage(mail_dns, timeout=4.0)])
    outcome: dict[str, Any] = {}

    def slow() -> None:
        outcome["slow"] = send(controller.port, zones.SPF_PASS, "a@slowspf.test", zones.message())

    thread = threading.Thread(target=slow)
    thread.start()
    fast = send(
        controller.port,
        zones.SPF_PASS,
        "alice@example.test",
        zones.dkim_signed(zones.message(subject="fast")),
    )
    assert fast[1] == (250, b"")
    assert "slow" not in outcome, "a session waited for another session's DNS"
    assert method(results(handler.envelopes[-1].original_content), "spf") == [
        "spf=pass smtp.mailfrom=example.test"
    ]
    thread.join(WAIT)
    assert outcome["slow"][1] == (250, b"")  # delivered: a DNS problem is not the sender's
    (spf,) = method(results(handler.envelopes[-1].original_content), "spf")
    assert spf.startswith("spf=temperror") and "smtp.mailfrom" in spf


def test_a_dead_resolver_gives_temperror_and_the_message_is_delivered(
    make_controller: Any, handler: Any, own_dns: Any
) -> None:
    dns = own_dns()
    controller = make_controller(handler, stages=[stage(dns, timeout=3.0)])
    dns.stop()  # by PID
    content = zones.arc_sealed(zones.dkim_signed(zones.message()))
    _, data = send(controller.port, zones.SPF_FAIL, "alice@example.test", content)
    assert data == (250, b"")
    items = delivered(handler)
    assert method(items, "spf")[0].startswith("spf=temperror")
    assert method(items, "dkim")[0].startswith("dkim=temperror")
    assert method(items, "arc")[0].startswith("arc=temperror")
    assert method(items, "dmarc")[0].startswith("dmarc=temperror")


# -- sessions and handlers ------------------------------------------------------------------------


def test_authenticated_sessions_are_not_checked(
    make_controller: Any, handler: Any, mail_dns: Any
) -> None:
    def authenticator(*args: Any) -> AuthResult:
        return AuthResult(success=True)

    stats = WorkerStats()
    controller = make_controller(
        handler,
        stages=[stage(mail_dns, stats, spf_reject_fail=True)],
        auth_require_tls=False,
        authenticator=authenticator,
    )
    with smtplib.SMTP(
        "127.0.0.1", controller.port, timeout=WAIT, source_address=(zones.SPF_FAIL, 0)
    ) as client:
        client.ehlo("client.test")
        client.login("user", "pass")
        client.sendmail("alice@example.test", ["bob@mx.test"], zones.message())
    assert delivered(handler) == ["auth=pass"]
    assert stats.authentication == {} and not stats.dns


def test_any_handler_gets_the_header(make_controller: Any, mail_dns: Any, tmp_path: Path) -> None:
    maildir = Maildir(tmp_path / "Maildir")
    controller = make_controller(maildir, stages=[stage(mail_dns)])
    send(controller.port, zones.SPF_PASS, "alice@example.test", zones.dkim_signed(zones.message()))
    (stored,) = (tmp_path / "Maildir" / "new").iterdir()
    assert "dmarc=pass" in " ".join(results(stored.read_bytes()))

    class NoHooks:
        """A handler with no hooks at all: the engine answers 250 itself."""

    controller = make_controller(NoHooks(), stages=[stage(mail_dns)])
    _, data = send(controller.port, zones.SPF_FAIL, "alice@example.test", zones.message())
    assert data is not None and data[0] == 550  # the DMARC stage still runs


def test_decoded_content_gets_the_header_too(
    make_controller: Any, handler: Any, mail_dns: Any
) -> None:
    controller = make_controller(handler, stages=[stage(mail_dns)], decode_data=True)
    send(controller.port, zones.SPF_PASS, "alice@example.test", zones.message())
    content = handler.envelopes[-1].content
    assert isinstance(content, str) and content.startswith("Authentication-Results: mx.test;")
    assert handler.envelopes[-1].authentication.spf.result == "pass"


def test_a_spooled_message_is_checked_and_delivered_with_the_header(
    make_controller: Any, mail_dns: Any, tmp_path: Path
) -> None:
    """A body past spool_threshold (a spool file): DKIM verifies it, and the Maildir handler,
    which streams, writes the edited message (the header first, the body intact)."""
    body = "".join(f"line {n:06d} of a long message\r\n" for n in range(5000))  # ~150 KB
    signed = zones.dkim_signed(zones.message(body=body))
    controller = make_controller(
        Maildir(tmp_path / "Maildir"), stages=[stage(mail_dns)], spool_threshold=4096
    )
    _, data = send(controller.port, zones.SPF_PASS, "alice@example.test", signed)
    assert data == (250, b"")
    (stored,) = (tmp_path / "Maildir" / "new").iterdir()
    content = stored.read_bytes()
    assert method(results(content), "dkim")[0].startswith("dkim=pass")
    assert content.endswith(signed)

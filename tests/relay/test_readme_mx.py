"""The README's inbound-MX example, run for real: ``farm check`` accepts it, and a farm started
from it relays our domains to Postfix's ``smtp-sink`` next hops and refuses the rest; its
screening refuses a client the test DNS lists list, and its authentication checks write the
Authentication-Results header the next hop gets and refuse a DMARC p=reject failure.

Only the addresses, certificate paths, the greeting delay, TLS towards the next hop (smtp-sink
offers STARTTLS without being able to do it), the DNS list names and the resolver (a real
unbound serving tests/support/mail_auth_zones.py) and the exempt networks (the test's clients are on
loopback) are swapped for test values; every other line is the README's.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support import mail_auth_zones as zones
from tests.support.farms import farm_env
from tests.support.relay import SMTP_SINK, Sink, sinks
from tests.support.wait import WAIT

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- inbound-mx-example -->"

pytestmark = pytest.mark.skipif(not Path(SMTP_SINK).exists(), reason="smtp-sink not installed")


def readme_example() -> str:
    text = README.read_text()
    assert MARKER in text, "the README lost its inbound-MX example"
    block = re.search(r"```toml\n(.*?)```", text[text.index(MARKER) :], re.DOTALL)
    assert block is not None
    return block[1]


@pytest.fixture
def next_hops() -> Iterator[tuple[Sink, Sink]]:
    with sinks() as start:
        yield start(), start("-L")


def test_readme_inbound_mx_example_runs(
    farms: Any, tmp_path: Path, next_hops: Any, mail_dns: Any
) -> None:
    smtp_sink, lmtp_sink = next_hops
    ca = trustme.CA()
    cert = ca.issue_cert("mx1.example.com")
    cert_path, key_path = tmp_path / "mx1.pem", tmp_path / "mx1.key"
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    swaps = {
        '"10.0.0.5:25"': f'"{smtp_sink.next_hop}"',
        '"lmtp:10.0.0.6:24"': f'"lmtp:{lmtp_sink.next_hop}"',
        '"/etc/farm/mx1.example.com.pem"': f'"{cert_path}"',
        '"/etc/farm/mx1.example.com.key"': f'"{key_path}"',
        "greeting_delay = 2 ": "greeting_delay = 0.2 ",
        '"/var/log/farm/farm.log"': f'"{tmp_path / "farm.log"}"',
        # smtp-sink advertises STARTTLS but cannot do TLS: the next hop leg stays plain here.
        'tls = "starttls"': 'tls = "none"',
        '"zen.spamhaus.org=127.0.0.[2..11]*3"': '"bl.test=127.0.0.[2..11]*3"',
        '"bl.spamcop.net=127.0.0.2*2"': '"bl2.test=127.0.0.10*2"',
        '"list.dnswl.org=127.0.[0..255].[1..3]*-5"': '"wl.test=127.0.[0..255].[1..3]*-5"',
        'resolver = ["127.0.0.1:53"]': f'resolver = ["{mail_dns.address}"]',
        '"127.0.0.0/8", "::1/128"]': '"127.0.0.1/32"]',  # the test's probes; clients are .2-.9
    }
    text = readme_example()
    for old, new in swaps.items():
        assert old in text, f"the README example no longer has {old}"
        text = text.replace(old, new)
    config = tmp_path / "farm.toml"
    config.write_text(text)

    check = subprocess.run(
        [sys.executable, "-m", "farm", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        env=farm_env(),
        timeout=WAIT,
    )
    assert check.returncode == 0, check.stderr

    # bind and metrics come from the command line here (free ports), workers 2 for 2 cores.
    farm = farms.start(config=config, workers=2)
    farm.wait_ready(2)

    def send(
        rcpt: str,
        source: str = zones.CLEAN,
        sender: str = "someone@sender.test",
        content: Callable[[str], bytes] | None = None,
    ) -> tuple[int, bytes, str]:
        """One message; ``content(marker)`` makes it (default: a bare one with the marker)."""
        marker = uuid.uuid4().hex
        with smtplib.SMTP(
            "127.0.0.1", farm.port, timeout=WAIT, source_address=(source, 0)
        ) as client:
            client.ehlo("sender.test")
            assert client.has_extn("starttls")
            client.mail(sender)
            code, text = client.rcpt(rcpt)
            if code == 250:
                if content is None:
                    message = f"Subject: {marker}\r\n\r\nhello\r\n".encode()
                else:
                    message = content(marker)
                code, text = client.data(message)
            return code, text, marker

    code, _, marker = send("postmaster@example.com")
    assert code == 250
    dump = smtp_sink.wait_for(marker.encode())
    assert dump.count(marker.encode()) == 1
    assert b"Received: from sender.test ([127.0.0.9])" in dump
    assert b"Authentication-Results: mx1.example.com;\n\tspf=none" in dump

    # A listed client (ZEN's stand-in: 3) is refused at every RCPT.
    code, text, _ = send("postmaster@example.com", source=zones.LISTED)
    assert (code, text) == (
        550,
        b"5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test=127.0.0.[2..11]",
    )

    # Signed by an SPF-authorised server: pass all along, in the header the next hop gets.
    def signed(marker: str) -> bytes:
        return zones.dkim_signed(zones.message(subject=marker))

    code, _, marker = send("postmaster@example.com", zones.SPF_PASS, "a@example.test", signed)
    assert code == 250
    dump = smtp_sink.wait_for(marker.encode())
    assert b"\tspf=pass smtp.mailfrom=example.test;\n\tdkim=pass header.d=example.test" in dump
    assert b"\tdmarc=pass (p=reject dis=none) header.from=example.test" in dump

    # Forged: the From domain's p=reject policy refuses it after the data.
    code, text, _ = send(
        "postmaster@example.com", zones.SPF_FAIL, "a@example.test", lambda m: zones.message()
    )
    assert (code, text) == (550, b"5.7.1 Message rejected per the DMARC policy of example.test")
    samples = farm.metrics()
    listed = [
        v
        for (name, labels), v in samples.items()
        if name == "farm_screening_verdicts_total" and ("verdict", "listed") in labels
    ]
    assert sum(listed) == 1
    rejected = [
        v
        for (name, labels), v in samples.items()
        if name == "farm_authentication_actions_total" and ("action", "dmarc_reject") in labels
    ]
    assert sum(rejected) == 1

    code, text, marker = send("someone@mail.example.com")  # a subdomain: ours too
    assert code == 250
    smtp_sink.wait_for(marker.encode())

    code, _, marker = send("someone@example.org")  # routed to the LMTP next hop
    assert code == 250
    lmtp_sink.wait_for(marker.encode())
    assert smtp_sink.count(marker.encode()) == 0

    code, text, _ = send("someone@elsewhere.test")
    assert (code, text) == (550, b"5.7.1 Relay access denied")

"""The README's inbound-MX example, run for real: ``farm check`` accepts it, and a farm started
from it relays our domains to Postfix's ``smtp-sink`` next hops and refuses the rest.

Only the addresses, certificate paths, the greeting delay and TLS towards the next hop (smtp-sink
offers STARTTLS without being able to do it) are swapped for test values; every other line is
the README's.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.farm_helpers import farm_env
from tests.relay_support import SMTP_SINK, Sink, sinks

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- inbound-mx-example -->"
WAIT = 30.0

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


def test_readme_inbound_mx_example_runs(farms: Any, tmp_path: Path, next_hops: Any) -> None:
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
        # smtp-sink advertises STARTTLS but cannot do TLS: the next hop leg stays plain here.
        'tls = "starttls"': 'tls = "none"',
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

    def send(rcpt: str, source: str = "127.0.0.2") -> tuple[int, bytes, str]:
        marker = uuid.uuid4().hex
        with smtplib.SMTP(
            "127.0.0.1", farm.port, timeout=WAIT, source_address=(source, 0)
        ) as client:
            client.ehlo("sender.test")
            assert client.has_extn("starttls")
            client.mail("someone@sender.test")
            code, text = client.rcpt(rcpt)
            if code == 250:
                client.data(f"Subject: {marker}\r\n\r\nhello\r\n".encode())
            return code, text, marker

    code, _, marker = send("postmaster@example.com")
    assert code == 250
    dump = smtp_sink.wait_for(marker.encode())
    assert dump.count(marker.encode()) == 1
    assert b"Received: from sender.test ([127.0.0.2])" in dump

    code, text, marker = send("someone@mail.example.com")  # a subdomain: ours too
    assert code == 250
    smtp_sink.wait_for(marker.encode())

    code, _, marker = send("someone@example.org")  # routed to the LMTP next hop
    assert code == 250
    lmtp_sink.wait_for(marker.encode())
    assert smtp_sink.count(marker.encode()) == 0

    code, text, _ = send("someone@elsewhere.test")
    assert (code, text) == (550, b"5.7.1 Relay access denied")

"""The DNS data of the screening and authentication tests, and messages signed for them.

All names live under ``test.`` (unbound refuses every other name, so a lookup outside them is a
DNS failure: that is how the tests make a temperror without waiting). ``slow.test`` is
forwarded to a server that never answers.

Client addresses (connect from them with a bound source address):

* 127.0.0.2: listed by ``bl.test`` (and by ``bl2.test`` with code 127.0.0.10)
* 127.0.0.3: SPF pass for example.test (and the other SPF domains' ``ip4:127.0.0.3``)
* 127.0.0.4: SPF fail for example.test
* 127.0.0.7: listed by ``bl.test`` and allowed by ``wl.test`` (weight -5)
* anything else: unlisted
"""

from __future__ import annotations

import base64
import functools
import time
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.dns_server import txt

ZONES = ["test"]
SLOW_ZONE = "slow.test"

LISTED = "127.0.0.2"
SPF_PASS = "127.0.0.3"
SPF_FAIL = "127.0.0.4"
ALLOWED_AND_LISTED = "127.0.0.7"
CLEAN = "127.0.0.9"


@dataclass(frozen=True)
class Key:
    private_pem: bytes
    public_b64: str


@functools.cache
def key(name: str) -> Key:
    """An RSA key (one per name, made once per test run)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(pem, base64.b64encode(public).decode())


def records(dnsbl_ttl: int = 300) -> list[str]:
    """The zone: DNS lists, SPF, DKIM keys, DMARC policies."""
    soa = "test. 300 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 30"
    lines = [
        soa,
        # DNS lists
        f"2.0.0.127.bl.test. {dnsbl_ttl} IN A 127.0.0.2",
        f"7.0.0.127.bl.test. {dnsbl_ttl} IN A 127.0.0.2",
        f"2.0.0.127.bl2.test. {dnsbl_ttl} IN A 127.0.0.10",
        f"7.0.0.127.wl.test. {dnsbl_ttl} IN A 127.0.10.2",
        # SPF: one domain per result class
        "example.test. 300 IN TXT " + txt("v=spf1 ip4:127.0.0.3 -all"),
        "sub.example.test. 300 IN TXT " + txt("v=spf1 ip4:127.0.0.3 -all"),
        "softfail.test. 300 IN TXT " + txt("v=spf1 ip4:127.0.0.3 ~all"),
        "neutral.test. 300 IN TXT " + txt("v=spf1 ip4:127.0.0.3 ?all"),
        "nospf.test. 300 IN A 127.0.0.1",
        "permerror.test. 300 IN TXT " + txt("v=spf1 include:nospf.test ip4:127.0.0.3 -all"),
        "temperror.test. 300 IN TXT " + txt("v=spf1 include:spf.example.net -all"),
        "slowspf.test. 300 IN TXT " + txt("v=spf1 include:x.slow.test -all"),
        "helo.test. 300 IN TXT " + txt("v=spf1 ip4:127.0.0.3 -all"),
        "quarantine.test. 300 IN TXT " + txt("v=spf1 ip4:127.0.0.3 -all"),
        "sampled.test. 300 IN TXT " + txt("v=spf1 ip4:127.0.0.3 -all"),
        "forwarder.test. 300 IN TXT " + txt("v=spf1 ip4:127.0.0.5 -all"),
        # DKIM keys
        "sel._domainkey.example.test. 300 IN TXT "
        + txt(f"v=DKIM1; k=rsa; p={key('example').public_b64}"),
        "arc._domainkey.forwarder.test. 300 IN TXT "
        + txt(f"v=DKIM1; k=rsa; p={key('forwarder').public_b64}"),
        "broken._domainkey.example.test. 300 IN TXT " + txt("v=DKIM1; k=rsa; p=notbase64!!"),
        # DMARC
        "_dmarc.example.test. 300 IN TXT " + txt("v=DMARC1; p=reject; sp=quarantine"),
        "_dmarc.quarantine.test. 300 IN TXT " + txt("v=DMARC1; p=quarantine"),
        "_dmarc.sampled.test. 300 IN TXT " + txt("v=DMARC1; p=reject; pct=0"),
        "_dmarc.softfail.test. 300 IN TXT " + txt("v=DMARC1; p=none"),
    ]
    return lines


def message(
    sender: str = "alice@example.test",
    subject: str = "hello",
    extra_headers: str = "",
    body: str = "Hello there.\r\n",
) -> bytes:
    """A plain message (CRLF line ends)."""
    head = (
        f"From: Alice <{sender}>\r\n"
        "To: bob@mx.test\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: <{time.monotonic_ns()}@example.test>\r\n"
    )
    return (extra_headers + head + "\r\n" + body).encode()


def dkim_signed(content: bytes, domain: str = "example.test", selector: str = "sel") -> bytes:
    """``content`` with a DKIM-Signature by ``selector._domainkey.domain`` (dkimpy)."""
    name = "example" if domain in ("example.test", "example.net") else domain
    signature = dkim.sign(
        content,
        selector.encode(),
        domain.encode(),
        key(name).private_pem,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return signature + content


def arc_sealed(content: bytes) -> bytes:
    """``content`` as forwarder.test passes it on: its Authentication-Results and an ARC set."""
    with_results = (
        b"Authentication-Results: forwarder.test; spf=pass smtp.mailfrom=example.test\r\n" + content
    )
    headers = dkim.arc_sign(
        with_results,
        b"arc",
        b"forwarder.test",
        key("forwarder").private_pem,
        b"forwarder.test",
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return b"".join(headers) + with_results

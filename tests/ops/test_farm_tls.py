"""TLS in the farm: STARTTLS on `bind` listeners, TLS from the first byte on `tls_bind` ones."""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
from pathlib import Path

import pytest
import trustme

from tests.support.farms import FarmRunner, toml_config
from tests.support.wait import WAIT, wait_for


def _certificate(tmp_path: Path) -> tuple[Path, Path, ssl.SSLContext]:
    """A test CA's certificate for the loopback addresses (chain and key files in
    ``tmp_path``), and a client context that trusts it."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "127.0.0.2")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return chain, key, client_context


def test_starttls_and_implicit_tls_listeners(farms: FarmRunner, tmp_path: Path) -> None:
    chain, key, client_context = _certificate(tmp_path)
    config = toml_config(
        tmp_path / "farm.toml",
        {"handler": "farm.handlers:Sink", "tls_bind": ["127.0.0.2:0"]},
        smtp={"tls_cert": str(chain), "tls_key": str(key)},
    )
    farm = farms.start(config=config, workers=2)
    farm.wait_ready(2)
    banner = farm.log()
    first_line = banner.split("\n", 1)[0]
    plain_port = int(re.findall(r"127\.0\.0\.1:(\d+)", first_line)[0])
    implicit_port = int(re.findall(r"127\.0\.0\.2:(\d+)", first_line)[0])
    with smtplib.SMTP("127.0.0.1", plain_port, timeout=10) as client:
        client.ehlo("me")
        assert client.has_extn("starttls")
        client.starttls(context=client_context)
        client.ehlo("me")
        assert not client.has_extn("starttls")
        client.sendmail("a@farm.test", ["b@farm.test"], b"over STARTTLS\r\n")
    with smtplib.SMTP_SSL("127.0.0.2", implicit_port, context=client_context, timeout=10) as c:
        c.ehlo("me")
        assert not c.has_extn("starttls")  # already TLS
        c.sendmail("a@farm.test", ["b@farm.test"], b"over implicit TLS\r\n")
    samples = farm.metrics()
    accepted = sum(
        v
        for (name, labels), v in samples.items()
        if name == "farm_messages_total" and ("outcome", "accepted") in labels
    )
    assert accepted == 2


def test_tls_bind_needs_a_certificate(tmp_path: Path) -> None:
    from farm.config import ConfigError, load_config

    config = toml_config(tmp_path / "farm.toml", {"tls_bind": ["127.0.0.1:0"]})
    with pytest.raises(ConfigError, match=r"tls_bind: needs smtp\.tls_cert and smtp\.tls_key"):
        load_config(config)


def test_failed_implicit_tls_handshakes_count_for_nothing(
    farms: FarmRunner, tmp_path: Path
) -> None:
    """A client that fails the handshake on a TLS-from-the-first-byte listener never reaches
    the session (neither made nor lost): it must not take one of the worker's max_sessions
    places for ever (more failures than places, then a real session is still served)."""
    chain, key, client_context = _certificate(tmp_path)
    config = toml_config(
        tmp_path / "farm.toml",
        {"handler": "farm.handlers:Sink", "tls_bind": ["127.0.0.2:0"], "max_sessions": 2},
        smtp={"tls_cert": str(chain), "tls_key": str(key)},
    )
    farm = farms.start(config=config, workers=1)
    farm.wait_ready(1)
    first_line = farm.log().split("\n", 1)[0]
    implicit_port = int(re.findall(r"127\.0\.0\.2:(\d+)", first_line)[0])
    for _ in range(5):  # plain text where a ClientHello belongs: the handshake fails
        with socket.create_connection(("127.0.0.2", implicit_port), timeout=WAIT) as sock:
            sock.sendall(b"EHLO not-tls\r\n" * 40)
            while sock.recv(4096):
                pass  # until the server closes
    with smtplib.SMTP_SSL("127.0.0.2", implicit_port, context=client_context, timeout=WAIT) as c:
        c.ehlo("me")
        c.sendmail("a@farm.test", ["b@farm.test"], b"after five failed handshakes\r\n")

    def settled() -> tuple[float, float] | None:
        samples = farm.metrics()
        active = sum(v for (name, _), v in samples.items() if name == "farm_sessions_active")
        made = sum(
            v for (name, _), v in samples.items() if name == "farm_connections_accepted_total"
        )
        ended = sum(v for (name, _), v in samples.items() if name == "farm_sessions_ended_total")
        # (made: the TLS session and the farm's readiness probe; no failed handshake)
        return (active, made) if active == 0 and made == ended == 2 else None

    wait_for(settled, "no session left active, the failed handshakes not counted")

"""TLS in the farm: STARTTLS on `bind` listeners, TLS from the first byte on `tls_bind` ones."""

from __future__ import annotations

import re
import smtplib
import ssl
from pathlib import Path

import pytest
import trustme

from tests.support.farms import FarmRunner, toml_config


def test_starttls_and_implicit_tls_listeners(farms: FarmRunner, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "127.0.0.2")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
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

"""Per-domain routes: recipients by domain to their own next hop, one next hop per transaction."""

from __future__ import annotations

import smtplib
import ssl
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import trustme

from farm.config import load_config
from farm.handler_loading import load_handler
from farm.relay import Relay
from farm.relay.routes import Route, RouteTable, parse_route
from tests.support.net import free_port
from tests.support.relay import HAVE_SINK, SWAKS, attempt, message
from tests.support.wait import WAIT

DOMAINS = ["a.test", ".b.test", "c.test"]


def test_parse_route() -> None:
    assert parse_route("10.0.0.5:25") == Route("10.0.0.5", 25, False)
    assert parse_route("smtp:mx.example:2525") == Route("mx.example", 2525, False)
    assert parse_route("LMTP:10.0.0.6:24") == Route("10.0.0.6", 24, True)
    assert parse_route("[2001:db8::1]:24", lmtp=True) == Route("2001:db8::1", 24, True)
    assert parse_route("lmtp:[::1]:24").text == "lmtp:[::1]:24"
    assert parse_route("smtp:h:25", lmtp=True).lmtp is False  # an explicit scheme wins
    for bad in ("10.0.0.5", "lmtp:10.0.0.5", "unix:/run/x", "h:99999", "ftp:h:21", "", "h:0"):
        with pytest.raises(ValueError):
            parse_route(bad)


def test_route_table_matching() -> None:
    default = Route("default", 25)
    table = RouteTable(
        default,
        {
            "Example.COM.": "10.0.0.5:25",
            ".example.org": "lmtp:10.0.0.6:24",
            ".deep.example.org": "10.0.0.7:25",
        },
    )
    assert table.for_address("r@example.com") == Route("10.0.0.5", 25)
    assert table.for_address("r@EXAMPLE.com.") == Route("10.0.0.5", 25)
    assert table.for_address("r@sub.example.com") == default  # exact entry: no subdomains
    assert table.for_address("r@a.example.org") == Route("10.0.0.6", 24, True)
    assert table.for_address("r@example.org") == default  # .parent: only below it
    assert table.for_address("r@x.deep.example.org") == Route("10.0.0.7", 25)  # longest wins
    assert table.for_address('"a@b"@example.com') == Route("10.0.0.5", 25)
    assert table.for_address("postmaster") == default
    assert table.for_address("r@[10.0.0.5]") == default
    assert table.for_address("r@xexample.com") == default
    for bad in ({".": "h:25"}, {"": "h:25"}, {"[1.2.3.4]": "h:25"}, {"a.test": "nope"}):
        with pytest.raises(ValueError):
            RouteTable(default, bad)
    with pytest.raises(TypeError):
        RouteTable(default, ["a.test"])  # type: ignore[arg-type]


def test_relay_from_toml_like_arguments() -> None:
    relay = Relay(
        next_hop="127.0.0.1:25",
        domains=["a.test"],
        routes={"a.test": "lmtp:127.0.0.1:24"},
        lmtp=True,
    )
    assert relay.next_hop == "lmtp:127.0.0.1:25"
    assert relay.routes.for_address("r@a.test").text == "lmtp:127.0.0.1:24"
    with pytest.raises(ValueError):
        Relay("127.0.0.1:25", domains=["a.test"], tls="sometimes")
    with pytest.raises(ValueError):
        Relay("127.0.0.1:25", domains=["a.test"], pool_max_messages=0)


@pytest.mark.skipif(not HAVE_SINK, reason="smtp-sink not installed")
def test_two_routes_and_mixed_transactions(serve: Any, sink: Any) -> None:
    smtp_hop, lmtp_hop, default_hop = sink(), sink("-L"), sink()
    routes = {"a.test": smtp_hop.next_hop, ".b.test": f"lmtp:{lmtp_hop.next_hop}"}
    controller = serve(Relay(default_hop.next_hop, domains=DOMAINS, routes=routes, timeout=5))
    marker = f"routes-{uuid.uuid4().hex}"
    # One transaction, three routes: the first accepted recipient decides, the others get 452.
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        refused = client.sendmail(
            "a@ext.test", ["r@a.test", "s@x.b.test", "t@A.TEST", "u@c.test"], message(marker)
        )
    assert set(refused) == {"s@x.b.test", "u@c.test"}, refused
    for code, text in refused.values():
        assert (code, text[:5]) == (452, b"4.5.3"), text
    dump = smtp_hop.wait_for(f"Subject: {marker}".encode())
    assert b"X-Rcpt-Args: <r@a.test>" in dump and b"X-Rcpt-Args: <t@A.TEST>" in dump
    assert b"x.b.test" not in dump and b"c.test" not in dump
    # The sender retries the 452 recipients in new transactions: they go through.
    if SWAKS is not None:
        server = f"127.0.0.1:{controller.port}"
        result = subprocess.run(
            [SWAKS, "--server", server, "--to", "s@x.b.test", "--header", f"Subject: {marker}"],
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stdout.decode()
    else:
        assert attempt(controller.port, ["s@x.b.test"], message(marker)).accepted
    assert attempt(controller.port, ["u@c.test"], message(marker)).accepted
    lmtp_dump = lmtp_hop.wait_for(f"Subject: {marker}".encode())
    assert b"X-Client-Proto: LMTP" in lmtp_dump and b"X-Rcpt-Args: <s@x.b.test>" in lmtp_dump
    assert b"X-Rcpt-Args: <u@c.test>" in default_hop.wait_for(f"Subject: {marker}".encode())
    for hop in (smtp_hop, lmtp_hop, default_hop):
        assert hop.count(f"Subject: {marker}".encode()) == 1


@pytest.mark.skipif(not HAVE_SINK, reason="smtp-sink not installed")
def test_refused_first_recipient_does_not_pin_the_route(serve: Any, sink: Any) -> None:
    """A transaction whose recipients so far were all refused may still switch next hop."""
    default_hop = sink()
    routes = {"a.test": f"127.0.0.1:{free_port()}"}  # nobody listens there
    controller = serve(Relay(default_hop.next_hop, domains=DOMAINS, routes=routes, timeout=5))
    result = attempt(controller.port, ["r@a.test", "u@c.test"], message("switch"))
    assert result.rcpt[0][0] == 451 and result.rcpt[1][0] == 250
    assert result.accepted
    assert b"X-Rcpt-Args: <u@c.test>" in default_hop.wait_for(b"Subject: switch")


FARM_TOML = """
handler = "farm.relay:Relay"

[handler_args]
next_hop = "10.0.0.4:25"
domains = ["example.com", ".example.org", "example.net"]
trusted_networks = ["10.0.0.0/8"]
timeout = 60
pool_size = 10
pool_idle_timeout = 30
pool_max_messages = 100
tls = "starttls"
tls_verify = true
tls_ca_file = "CA_FILE"

[handler_args.routes]
"example.com" = "10.0.0.5:25"
".example.org" = "lmtp:10.0.0.6:24"
"""


def test_relay_from_farm_toml(tmp_path: Path) -> None:
    """Every argument is expressible in farm.toml's [handler_args] (the operator's example)."""
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    path = tmp_path / "farm.toml"
    path.write_text(FARM_TOML.replace("CA_FILE", str(ca_file)))
    config = load_config(path)
    relay = load_handler(config.handler, config.handler_args)
    assert isinstance(relay, Relay)
    assert relay.routes.for_address("r@example.com").text == "10.0.0.5:25"
    assert relay.routes.for_address("r@mx.Example.ORG").text == "lmtp:10.0.0.6:24"
    assert relay.routes.for_address("r@example.net").text == "10.0.0.4:25"
    assert relay.settings.tls == "starttls" and relay.settings.ssl_context is not None
    assert relay.settings.ssl_context.verify_mode == ssl.CERT_REQUIRED

"""Per-client-IP limits: the Anvil's arithmetic, the engine's replies with a LocalLimiter, and a
real two-worker farm whose limits hold across workers (and survive a worker's death).

Clients connect from several loopback addresses (127.0.0.2, 127.0.0.3, ...): Linux routes the
whole 127.0.0.0/8 to lo, so each is a distinct client address for the server.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from farm.config import ConfigError, load_config
from farm.limits import Anvil, ClientLimits, LocalLimiter, client_address
from tests.support.client import SMTPClient
from tests.support.clock import FakeClock
from tests.support.farms import toml_config
from tests.support.wait import WAIT, wait_for, wait_for_async

# -- the Anvil ------------------------------------------------------------------------------------


def test_sessions_are_counted_and_given_back() -> None:
    anvil = Anvil(ClientLimits(sessions_per_ip=2, exempt_networks=()))
    assert anvil.open_session("192.0.2.1") == (True, 1)
    assert anvil.open_session("192.0.2.1") == (True, 2)
    assert anvil.open_session("192.0.2.1") == (False, 2)
    assert anvil.open_session("192.0.2.2") == (True, 1)  # another client is not affected
    anvil.close_session("192.0.2.1")
    assert anvil.open_session("192.0.2.1") == (True, 2)
    for _ in range(5):  # more closes than opens never go negative
        anvil.close_session("192.0.2.1")
    assert "192.0.2.1" not in anvil.sessions


def test_message_rate_is_a_token_bucket() -> None:
    clock = FakeClock()
    anvil = Anvil(ClientLimits(messages_per_ip=3, interval=60.0), clock)
    assert [anvil.count_message("a") for _ in range(4)] == [True, True, True, False]
    clock.now += 19.0  # one message comes back every 20 s
    assert not anvil.count_message("a")
    clock.now += 1.0
    assert anvil.count_message("a")
    assert not anvil.count_message("a")
    assert anvil.count_message("b")
    clock.now += 3600  # refilled: a sweep forgets both clients
    anvil.sweep()
    assert anvil.tracked == 0


def test_auth_attempts_are_taken_and_successes_given_back() -> None:
    clock = FakeClock()
    anvil = Anvil(ClientLimits(auth_failures_per_ip=2, interval=60.0), clock)
    assert anvil.take_auth("a")
    anvil.give_back_auth("a")  # a success does not count
    assert anvil.take_auth("a")
    assert anvil.take_auth("a")  # two failures
    assert not anvil.take_auth("a")
    assert anvil.take_auth("b")
    clock.now += 30.0  # one comes back every 30 s
    assert anvil.take_auth("a")
    assert not anvil.take_auth("a")


def test_zero_switches_a_limit_off() -> None:
    anvil = Anvil(ClientLimits(sessions_per_ip=0))
    assert all(anvil.open_session("a")[0] for _ in range(10_000))
    assert all(anvil.count_message("a") for _ in range(10_000))
    assert not ClientLimits(sessions_per_ip=0).active
    with pytest.raises(ValueError):
        ClientLimits(sessions_per_ip=-1)


def test_client_address_prefers_a_valid_proxy_header() -> None:
    assert client_address(("127.0.0.2", 25)) == ipaddress.ip_address("127.0.0.2")
    assert client_address(("::ffff:192.0.2.7", 25, 0, 0)) == ipaddress.ip_address("192.0.2.7")
    assert client_address("/run/farm.sock") is None
    proxied = SimpleNamespace(valid=True, src_addr=ipaddress.ip_address("198.51.100.9"))
    assert client_address(("127.0.0.1", 1), proxied) == ipaddress.ip_address("198.51.100.9")
    # A header without a usable source is never the peer (the balancer): issue 12 item 15.
    broken = SimpleNamespace(valid=False, src_addr=ipaddress.ip_address("198.51.100.9"))
    assert client_address(("127.0.0.1", 1), broken) is None
    unknown = SimpleNamespace(valid=True, src_addr=None)
    assert client_address(("127.0.0.1", 1), unknown) is None


def test_loopback_is_exempt_by_default() -> None:
    limiter = LocalLimiter()
    assert limiter.key(ipaddress.ip_address("127.0.0.2")) is None
    assert limiter.key(ipaddress.ip_address("::1")) is None
    assert limiter.key(ipaddress.ip_address("192.0.2.1")) == "192.0.2.1"
    assert LocalLimiter(exempt_networks=()).key(ipaddress.ip_address("127.0.0.2")) == "127.0.0.2"


# -- the engine with a LocalLimiter --------------------------------------------------------------


def _greeted(client: SMTPClient) -> str:
    return client.reply()


def test_too_many_connections_from_one_address(make_controller: Any, handler: Any) -> None:
    limiter = LocalLimiter(sessions_per_ip=2, exempt_networks=())
    controller = make_controller(handler, limiter=limiter)
    port = controller.port
    held = [SMTPClient(port, source="127.0.0.2") for _ in range(2)]
    assert all(_greeted(c).startswith("220 ") for c in held)
    refused = SMTPClient(port, source="127.0.0.2")
    reply = refused.reply()
    assert reply.startswith("421 4.7.0 ") and "too many connections from 127.0.0.2" in reply
    assert refused.at_eof()
    other = SMTPClient(port, source="127.0.0.3")
    assert other.reply().startswith("220 ")  # other clients are not affected
    held[0].command("QUIT")
    held[0].close()

    def admitted_again() -> bool:
        client = SMTPClient(port, source="127.0.0.2")
        try:
            return client.reply().startswith("220 ")
        finally:
            client.close()

    wait_for(admitted_again, what="a session slot given back after QUIT")
    for client in (*held, refused, other):
        client.close()


def test_message_rate_per_address(make_controller: Any, handler: Any) -> None:
    limiter = LocalLimiter(sessions_per_ip=0, messages_per_ip=2, exempt_networks=())
    controller = make_controller(handler, limiter=limiter, enhanced_status_codes=True)
    client = SMTPClient(controller.port, source="127.0.0.4")
    client.reply()
    client.command("EHLO client.test")
    for _ in range(2):
        assert client.command("MAIL FROM:<a@example.com>").startswith("250")
        assert client.command("RSET").startswith("250")
    reply = client.command("MAIL FROM:<a@example.com>")
    assert reply.startswith("450 4.7.1 Error: too much mail from 127.0.0.4"), reply
    assert client.command("NOOP").startswith("250")  # the session goes on
    other = SMTPClient(controller.port, source="127.0.0.5")
    other.reply()
    other.command("EHLO client.test")
    assert other.command("MAIL FROM:<a@example.com>").startswith("250")
    client.close()
    other.close()


class RefusingAuthenticator:
    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        from farm.smtp import AuthResult

        return AuthResult(success=False, handled=False)


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_auth_failures_per_address_across_sessions(make_controller: Any, handler: Any) -> None:
    limiter = LocalLimiter(sessions_per_ip=0, auth_failures_per_ip=2, exempt_networks=())
    controller = make_controller(
        handler,
        limiter=limiter,
        authenticator=RefusingAuthenticator(),
        auth_require_tls=False,
    )
    for _ in range(2):  # two sessions, one failure each
        client = SMTPClient(controller.port, source="127.0.0.6")
        client.reply()
        client.command("EHLO client.test")
        assert client.command(f"AUTH PLAIN {_plain('u', 'wrong')}").startswith("535")
        client.close()
    client = SMTPClient(controller.port, source="127.0.0.6")
    client.reply()
    client.command("EHLO client.test")
    reply = client.command(f"AUTH PLAIN {_plain('u', 'right?')}")
    assert reply.startswith("454 4.7.0 Error: too many AUTH failures from 127.0.0.6"), reply
    assert client.command("NOOP").startswith("250")
    client.close()


def test_proxy_header_source_is_the_limited_address(make_controller: Any) -> None:
    class ProxyHandler:
        async def handle_PROXY(self, server: Any, session: Any, envelope: Any, data: Any) -> bool:
            return True

    limiter = LocalLimiter(sessions_per_ip=1, exempt_networks=())
    controller = make_controller(
        ProxyHandler(),
        limiter=limiter,
        proxy_protocol_timeout=5.0,
        proxy_trusted_networks=["127.0.0.1/32"],
    )

    def via_proxy(source: str) -> SMTPClient:
        client = SMTPClient(controller.port)
        client.send(f"PROXY TCP4 {source} 192.0.2.25 40000 25\r\n")
        return client

    first = via_proxy("198.51.100.7")
    assert first.reply().startswith("220 ")
    second = via_proxy("198.51.100.7")
    assert "too many connections from 198.51.100.7" in second.reply()
    third = via_proxy("198.51.100.8")  # same proxy peer, another real client
    assert third.reply().startswith("220 ")
    for client in (first, second, third):
        client.close()


# -- configuration --------------------------------------------------------------------------------


def test_limits_table(tmp_path: Path) -> None:
    path = toml_config(
        tmp_path / "farm.toml",
        {},
        limits={"sessions_per_ip": 3, "messages_per_ip": 100, "exempt_networks": ["10.0.0.0/8"]},
    )
    config = load_config(path)
    limits = config.limits.client_limits()
    assert (limits.sessions_per_ip, limits.messages_per_ip) == (3, 100)
    assert limits.exempt(ipaddress.ip_address("10.1.2.3"))
    assert not limits.exempt(ipaddress.ip_address("127.0.0.1"))
    assert load_config(path, {"limits.sessions_per_ip": 7}).limits.sessions_per_ip == 7
    assert "[limits]" in config.describe()
    bad = toml_config(tmp_path / "bad.toml", {}, limits={"session_per_ip": 3})
    with pytest.raises(ConfigError, match=r"did you mean 'limits\.sessions_per_ip'"):
        load_config(bad)
    bad = toml_config(tmp_path / "bad2.toml", {}, limits={"exempt_networks": ["nonsense"]})
    with pytest.raises(ConfigError, match=r"limits\.exempt_networks"):
        load_config(bad)


# -- a real farm: limits across workers ------------------------------------------------------------


def _open_until_refused(port: int, source: str, most: int) -> tuple[list[SMTPClient], str]:
    """Open sessions from ``source`` until one is refused; (the greeted ones, the refusal)."""
    greeted: list[SMTPClient] = []
    for _ in range(most):
        client = SMTPClient(port, source=source)
        reply = client.reply()
        if not reply.startswith("220 "):
            client.close()
            return greeted, reply
        greeted.append(client)
    return greeted, ""


def test_farm_limits_hold_across_workers_and_survive_a_worker_kill(
    farms: Any, tmp_path: Path
) -> None:
    # max_sessions = 2: a worker stops accepting at 2 sessions, so 3 sessions need 2 workers.
    config = toml_config(
        tmp_path / "farm.toml",
        {"max_sessions": 2},
        limits={"sessions_per_ip": 3, "messages_per_ip": 4, "exempt_networks": []},
    )
    farm = farms.start(config=config, workers=2)
    farm.wait_ready(2)
    held, refusal = _open_until_refused(farm.port, "127.0.0.2", 10)
    assert len(held) == 3, refusal
    assert refusal.startswith("421 4.7.0 ") and "too many connections from 127.0.0.2" in refusal
    active = {
        dict(labels).get("worker"): value
        for (name, labels), value in farm.metrics().items()
        if name == "farm_sessions_active"
    }
    assert sum(1 for value in active.values() if value > 0) == 2, active  # both workers hold some
    assert farm.metric_total("farm_client_limit_refusals_total", limit="sessions") == 1

    # A worker's death gives its sessions back: kill both, and 3 new sessions fit again.
    for pid in farm.slots().values():
        os.kill(pid, signal.SIGKILL)
    for client in held:
        client.close()
    farm.wait_metric("farm_workers_ready", 2)
    farm.wait_ready(2)
    held, refusal = _open_until_refused(farm.port, "127.0.0.2", 10)
    assert len(held) == 3, refusal
    for client in held:
        client.command("QUIT")
        client.close()

    # The message rate is counted farm-wide: 4 messages, then 450, whichever worker serves.
    outcomes = []
    for _ in range(5):

        def greeted() -> SMTPClient | None:
            client = SMTPClient(farm.port, source="127.0.0.3")
            if client.reply().startswith("220 "):
                return client
            client.close()
            return None

        client = wait_for(greeted, what="a session from 127.0.0.3")
        client.command("EHLO client.test")
        outcomes.append(client.command("MAIL FROM:<a@example.com>")[:3])
        client.command("QUIT")
        client.close()
    assert outcomes == ["250"] * 4 + ["450"]


def test_unknown_command_limit(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, unknown_command_limit=2)
    client = SMTPClient(controller.port)
    client.reply()
    assert client.command("FOO").startswith("500")
    assert client.command("BAR").startswith("502 5.5.1 Too many unrecognized commands")
    assert client.at_eof()
    client.close()


@pytest.mark.parametrize("in_session", [False, True])
def test_messages_never_exceed_the_farm_wide_limit(in_session: bool) -> None:
    """Two forked processes (as two workers) taking messages from one shared table at once
    (``in_session``: within a session each, whose MAILs lease several at a time)."""
    from farm.supervisor.anvil import AnvilTable, SharedLimiter

    limits = ClientLimits(sessions_per_ip=0, messages_per_ip=100, exempt_networks=())
    table = AnvilTable()
    children = []
    for _ in range(2):
        read_end, write_end = os.pipe()
        region = table.new_region()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                limiter = SharedLimiter(limits, table, region)
                if in_session:
                    assert limiter.open_session("192.0.2.1")
                taken = sum([limiter.count_message("192.0.2.1") for _ in range(150)])
                os.write(write_end, str(taken).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        table.adopt(pid, region)
        children.append((pid, read_end))
    sent = []
    for pid, read_end in children:
        with os.fdopen(read_end, "rb") as pipe:
            sent.append(int(pipe.read() or b"-1"))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        table.worker_gone(pid)
    assert sum(sent) == 100, sent  # whoever asked first, never more than the limit


def test_parallel_sessions_cannot_multiply_the_auth_allowance(
    make_controller: Any, handler: Any
) -> None:
    """Every AUTH takes from the allowance before its check: 5 sessions at once, 2 checks."""
    import threading

    release = threading.Event()
    checks: list[str] = []

    class SlowRefusal:
        async def __call__(self, server: Any, session: Any, envelope: Any, *args: Any) -> Any:
            import asyncio

            from farm.smtp import AuthResult

            checks.append(session.id)
            await asyncio.get_running_loop().run_in_executor(None, release.wait, WAIT)
            return AuthResult(success=False, handled=False)

    limiter = LocalLimiter(sessions_per_ip=0, auth_failures_per_ip=2, exempt_networks=())
    controller = make_controller(
        handler, limiter=limiter, authenticator=SlowRefusal(), auth_require_tls=False
    )
    clients = [SMTPClient(controller.port, source="127.0.0.7") for _ in range(5)]
    for client in clients:
        client.reply()
        client.command("EHLO client.test")
        client.send(f"AUTH PLAIN {_plain('u', 'guess')}\r\n")
    refused = [c for c in clients[2:] if c.reply().startswith("454 4.7.0 ")]
    assert len(refused) == 3
    release.set()
    assert all(c.reply().startswith("535") for c in clients[:2])
    assert len(checks) == 2
    for client in clients:
        client.close()


def test_a_client_gone_at_once_gives_its_session_back() -> None:
    """Clients that reset right after connecting: their admissions are all given back."""
    import asyncio

    from farm.smtp import SMTP
    from farm.supervisor.anvil import AnvilTable, SharedLimiter

    limits = ClientLimits(sessions_per_ip=2, exempt_networks=())
    table = AnvilTable()
    limiter = SharedLimiter(limits, table, table.new_region())

    async def scenario() -> str:
        loop = asyncio.get_running_loop()
        closed = asyncio.Event()

        class Closing(SMTP):
            def connection_lost(self, exc: Exception | None) -> None:
                super().connection_lost(exc)
                closed.set()

        server = await loop.create_server(
            lambda: Closing(object(), limiter=limiter, hostname="farm.test"), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        for _ in range(3):  # more than the limit
            closed.clear()
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.transport.abort()  # an RST at once
            await asyncio.wait_for(closed.wait(), WAIT)
        # closes reach the table within CLOSE_DELAY
        await wait_for_async(lambda: table.sessions("127.0.0.1") == 0, "the closes in the table")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        greeting = await asyncio.wait_for(reader.readline(), WAIT)
        assert table.sessions("127.0.0.1") == 1
        writer.close()
        server.close()
        return greeting.decode()

    greeting = asyncio.run(scenario())
    assert greeting.startswith("220 "), greeting


class SlowLimiter(LocalLimiter):
    """Answers the admission question only after ``delay`` seconds (a busy supervisor)."""

    def __init__(self, delay: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delay = delay

    async def open_session(self, key: str) -> bool:
        import asyncio

        await asyncio.sleep(self.delay)
        return await super().open_session(key)


def test_early_talker_refused_while_the_limiter_is_asked(
    make_controller: Any, handler: Any
) -> None:
    limiter = SlowLimiter(1.0, sessions_per_ip=5, exempt_networks=())
    controller = make_controller(handler, limiter=limiter, greeting_delay=0.2)
    client = SMTPClient(controller.port, source="127.0.0.8")
    client.send("EHLO bot.test\r\nMAIL FROM:<a@b.test>\r\n")  # before any greeting
    assert client.reply() == "554 5.5.0 Error: SMTP protocol synchronization\r\n"
    assert client.at_eof()
    client.close()
    patient = SMTPClient(controller.port, source="127.0.0.8")
    assert patient.reply().startswith("220 ")  # one that waits is greeted
    assert patient.command("EHLO ok.test").startswith("250")
    patient.close()


def test_early_talker_after_a_proxy_header(make_controller: Any) -> None:
    class ProxyHandler:
        async def handle_PROXY(self, server: Any, session: Any, envelope: Any, data: Any) -> bool:
            return True

    controller = make_controller(
        ProxyHandler(),
        greeting_delay=0.2,
        proxy_protocol_timeout=5.0,
        proxy_trusted_networks=["127.0.0.1/32"],
    )
    client = SMTPClient(controller.port)
    client.send("PROXY TCP4 198.51.100.7 192.0.2.25 40000 25\r\nEHLO bot.test\r\n")
    assert client.reply() == "554 5.5.0 Error: SMTP protocol synchronization\r\n"
    client.close()
    patient = SMTPClient(controller.port)
    patient.send("PROXY TCP4 198.51.100.7 192.0.2.25 40000 25\r\n")
    assert patient.reply().startswith("220 ")
    patient.close()


# -- IPv6 clients per prefix (issue 12, item 13) --------------------------------------------------


def test_ipv6_key_is_the_prefix() -> None:
    from farm.limits import Limiter

    limiter = Limiter(ClientLimits(exempt_networks=()))
    assert limiter.key(ipaddress.ip_address("2001:db8:0:1:aaaa::1")) == "2001:db8:0:1::/64"
    assert limiter.key(ipaddress.ip_address("192.0.2.1")) == "192.0.2.1"
    alone = Limiter(ClientLimits(exempt_networks=(), ipv6_prefix=128))
    assert alone.key(ipaddress.ip_address("2001:db8::1")) == "2001:db8::1"
    with pytest.raises(ValueError, match="ipv6_prefix"):
        ClientLimits(ipv6_prefix=0)


def test_ipv6_clients_of_one_prefix_share_the_limit_across_workers(
    farms: Any, tmp_path: Path
) -> None:
    """Clients behind a trusted PROXY sender, from one /64: one client for the limits."""
    config = toml_config(
        tmp_path / "farm.toml",
        {"handler": "tests.support.handlers.proxied:ProxiedCounting", "max_sessions": 1},
        handler_args={"path": str(tmp_path / "out")},
        smtp={"proxy_protocol_timeout": 5, "proxy_trusted_networks": ["127.0.0.1/32"]},
        limits={"sessions_per_ip": 1, "exempt_networks": []},
    )
    farm = farms.start(config=config, workers=2)
    farm.wait_metric("farm_workers_ready", 2)  # (a greeting needs a PROXY header here)

    def via_proxy(source: str) -> tuple[SMTPClient, str]:
        client = SMTPClient(farm.port)
        client.send(f"PROXY TCP6 {source} 2001:db8::25 40000 25\r\n")
        return client, client.reply()

    first, reply = via_proxy("2001:db8:0:1::1")
    assert reply.startswith("220 "), reply
    # max_sessions = 1: the other worker serves the next one; the limit is farm-wide.
    second, reply = via_proxy("2001:db8:0:1:ffff::2")
    assert reply.startswith("421 4.7.0 ") and "from 2001:db8:0:1::/64" in reply, reply
    third, reply = via_proxy("2001:db8:0:2::1")  # another /64: another client
    assert reply.startswith("220 "), reply
    for client in (first, second, third):
        client.close()


def test_ipv6_prefix_setting(make_controller: Any, tmp_path: Path) -> None:
    path = toml_config(tmp_path / "farm.toml", {}, limits={"ipv6_prefix": 56})
    assert load_config(path).limits.client_limits().ipv6_prefix == 56
    bad = toml_config(tmp_path / "bad.toml", {}, limits={"ipv6_prefix": 129})
    with pytest.raises(ConfigError, match=r"limits\.ipv6_prefix: expected an integer from 1"):
        load_config(bad)

    class ProxyHandler:
        async def handle_PROXY(self, server: Any, session: Any, envelope: Any, data: Any) -> bool:
            return True

    limiter = LocalLimiter(sessions_per_ip=1, exempt_networks=(), ipv6_prefix=128)
    controller = make_controller(
        ProxyHandler(),
        limiter=limiter,
        proxy_protocol_timeout=5.0,
        proxy_trusted_networks=["127.0.0.1/32"],
    )
    clients = []
    for source in ("2001:db8::1", "2001:db8::2"):  # per address: two clients
        client = SMTPClient(controller.port)
        client.send(f"PROXY TCP6 {source} 2001:db8::25 40000 25\r\n")
        assert client.reply().startswith("220 ")
        clients.append(client)
    for client in clients:
        client.close()

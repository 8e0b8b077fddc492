"""Connection screening ([screening]): DNS lists in postscreen's syntax, looked up in a real
unbound (tests/support/dns_server.py) by clients connecting from 127.0.0.2-127.0.0.9, each action
(enforce, drop, ignore), weights, filters, allow lists, exemptions, fail-open on a slow or dead
resolver, and the farm-wide verdict cache across two real workers.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from farm.limits import ClientLimits
from farm.metrics import WorkerStats
from farm.resolver import Resolver
from farm.screening import parse_site, screening_stage
from farm.screening.cache import SLOT_SIZE, VerdictCache
from farm.smtp import AuthResult
from tests.support import mail_auth_zones as zones
from tests.support.client import SMTPClient
from tests.support.farms import toml_config
from tests.support.loops import both_loops  # noqa: F401 (every engine test on asyncio and uvloop)
from tests.support.wait import WAIT, wait_for


def stage(
    dns: Any,
    action: str = "enforce",
    lists: tuple[str, ...] = ("bl.test*2",),
    allow: tuple[str, ...] = (),
    threshold: int = 2,
    exempt: tuple[str, ...] = ("127.0.0.1/32",),  # the controller's readiness probe
    timeout: float = 5.0,
    stats: WorkerStats | None = None,
) -> Any:
    sites = [parse_site(entry, 1) for entry in lists] + [parse_site(e, -1) for e in allow]
    return screening_stage(
        action,
        sites,
        Resolver([dns.address], observe=stats.dns_time if stats else None),
        threshold=threshold,
        timeout=timeout,
        exempt=ClientLimits(exempt_networks=exempt).exempt,
        stats=stats,
    )


def transaction(port: int, source: str, rcpts: tuple[str, ...] = ("bob@mx.test",)) -> list[str]:
    """Greeting, EHLO, MAIL, each RCPT, and (if one was accepted) DATA: the replies."""
    client = SMTPClient(port, source=source)
    try:
        replies = [client.reply()]
        replies.append(client.command("EHLO client.test"))
        replies.append(client.command("MAIL FROM:<alice@example.test>"))
        replies += [client.command(f"RCPT TO:<{rcpt}>") for rcpt in rcpts]
        if any(reply.startswith("250") for reply in replies[3:]):
            replies.append(client.command("DATA"))
            replies.append(client.command("Subject: hi\r\n\r\nhello\r\n."))
        client.command("QUIT")
        return replies
    finally:
        client.close()


# -- the syntax and the cache --------------------------------------------------------------------


def test_postscreen_site_syntax() -> None:
    site = parse_site("b.barracudacentral.org=127.0.0.2*2")
    assert (site.domain, site.weight, site.text) == ("b.barracudacentral.org", 2, site.text)
    assert site.matches(["127.0.0.2"]) and not site.matches(["127.0.0.3"])
    allow = parse_site("list.dnswl.org=127.0.[0..255].[1;3]", -1)
    assert allow.weight == -1
    assert allow.matches(["127.0.15.3"]) and not allow.matches(["127.0.15.2"])
    assert parse_site("zen.spamhaus.org").matches(["127.0.0.4"])  # no filter: any A record
    for bad, why in [
        ("zen", "not a DNS list domain"),
        ("a.test*x", "must be an integer"),
        ("a.test=127.0.0", "four octets"),
        ("a.test=127.0.0.[9..2]", "empty"),
        ("a.test=127.0.0.300", "not an octet"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_site(bad)


def test_verdict_cache_honours_ttl_and_fingerprint_and_stays_bounded() -> None:
    now = [1000.0]
    cache = VerdictCache(8, memory=bytearray(8 * SLOT_SIZE), clock=lambda: now[0])
    client = ipaddress.ip_address("192.0.2.1")
    cache.put(client, 7, 0b101, ttl=60)
    assert cache.get(client, 7) == 0b101
    assert cache.get(client, 8) is None  # other lists: not this verdict
    assert cache.get(ipaddress.ip_address("::ffff:192.0.2.1"), 7) == 0b101  # the same client
    now[0] += 61
    assert cache.get(client, 7) is None  # expired
    for n in range(100):  # far more clients than slots: the memory does not grow
        cache.put(ipaddress.ip_address(f"198.51.100.{n}"), 7, n, ttl=60)
    assert cache.live() <= 8
    assert cache.get(ipaddress.ip_address("198.51.100.99"), 7) == 99  # the newest is there


def test_a_torn_slot_is_a_miss_not_a_wrong_verdict() -> None:
    memory = bytearray(4 * SLOT_SIZE)
    cache = VerdictCache(4, memory=memory)
    client = ipaddress.ip_address("192.0.2.9")
    cache.put(client, 1, 0b1, ttl=60)
    slot = next(i for i in range(4) if memory[i * SLOT_SIZE + 15] == 9)
    memory[slot * SLOT_SIZE + 30] ^= 0xFF  # half a write from another worker
    assert cache.get(client, 1) is None


def test_the_shared_table_is_seen_by_a_forked_process() -> None:
    cache = VerdictCache(64)  # an anonymous shared mapping, as the supervisor makes it
    pid = os.fork()
    if pid == 0:
        cache.put(ipaddress.ip_address("2001:db8::5"), 3, 0b11, ttl=60)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert cache.get(ipaddress.ip_address("2001:db8::5"), 3) == 0b11


# -- the actions ---------------------------------------------------------------------------------


def test_enforce_refuses_every_rcpt_of_a_listed_client(
    make_controller: Any, handler: Any, mail_dns: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stats = WorkerStats()
    controller = make_controller(
        handler, stages=[stage(mail_dns, stats=stats)], enhanced_status_codes=True
    )
    replies = transaction(controller.port, zones.LISTED, ("bob@mx.test", "carol@mx.test"))
    assert replies[0].startswith("220 ")
    refusal = "550 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test\r\n"
    assert replies[3:] == [refusal, refusal]
    assert "DATA" not in "".join(replies)
    assert "screening=listed score=2 lists=bl.test action=enforce" in caplog.text
    assert "screening=listed score=2 lists=bl.test" in caplog.text  # the disconnect line

    replies = transaction(controller.port, zones.CLEAN)
    assert replies[3].startswith("250") and replies[-1].startswith("250")
    assert handler.sessions[-1].screening.describe() == "screening=pass score=0"
    assert stats.screening_verdicts == {"pass": 1, "listed": 1, "exempt": 1}  # + the probe
    assert stats.screening == {("bl.test", "listed"): 1, ("bl.test", "unlisted"): 1}
    assert stats.dns["screening"].counts and sum(stats.dns["screening"].counts) == 2


def test_drop_answers_554_instead_of_the_greeting_and_closes(
    make_controller: Any, handler: Any, mail_dns: Any
) -> None:
    controller = make_controller(handler, stages=[stage(mail_dns, "drop")], greeting_delay=0.2)
    client = SMTPClient(controller.port, source=zones.LISTED)
    try:
        greeting = client.reply()
        assert greeting == (
            "554 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test\r\n"
        )
        assert client.at_eof()
    finally:
        client.close()
    assert transaction(controller.port, zones.CLEAN)[-1].startswith("250")


def test_a_client_that_talks_while_drop_decides_is_an_early_talker(
    make_controller: Any, handler: Any, mail_dns: Any
) -> None:
    controller = make_controller(
        handler, stages=[stage(mail_dns, "drop", lists=("list.slow.test",), timeout=10)]
    )
    client = SMTPClient(controller.port, source=zones.CLEAN)
    try:
        client.send("EHLO quick.test\r\n")  # the greeting waits for a list that never answers
        assert client.reply().startswith("554 5.5.0")
        assert client.at_eof()
    finally:
        client.close()


def test_ignore_only_logs_and_counts(
    make_controller: Any, handler: Any, mail_dns: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stats = WorkerStats()
    controller = make_controller(handler, stages=[stage(mail_dns, "ignore", stats=stats)])
    replies = transaction(controller.port, zones.LISTED)
    assert replies[3].startswith("250") and replies[-1].startswith("250")
    # The verdict may come after a quick session has ended: it is logged and counted anyway.
    line = "client=127.0.0.2 screening=listed score=2 lists=bl.test action=ignore"
    wait_for(lambda: line in caplog.text, what="the verdict's log line")
    assert handler.sessions[-1].screening.listed
    assert stats.screening_verdicts["listed"] == 1


def test_weights_filters_and_allow_lists_add_up(
    make_controller: Any, handler: Any, mail_dns: Any
) -> None:
    lists = ("bl.test*2", "bl2.test=127.0.0.10*1", "bl2.test=127.0.0.[2..9]*5")
    screening = stage(mail_dns, lists=lists, allow=("wl.test=127.0.10.[1..3]*-5",), threshold=3)
    controller = make_controller(handler, stages=[screening])
    # 127.0.0.2: bl.test (2) + bl2.test's 127.0.0.10 (1); the [2..9] filter does not match.
    replies = transaction(controller.port, zones.LISTED)
    assert replies[3].startswith("550 5.7.1 Service unavailable; client [127.0.0.2] blocked")
    # 127.0.0.7: bl.test (2) and the allow list (-5): -3, below the threshold.
    replies = transaction(controller.port, zones.ALLOWED_AND_LISTED)
    assert replies[-1].startswith("250")
    verdict = handler.sessions[-1].screening
    assert (verdict.score, verdict.listed, verdict.listed_by) == (
        -3,
        False,
        ("bl.test", "wl.test=127.0.10.[1..3]"),
    )


def test_exempt_networks_are_never_screened(
    make_controller: Any, handler: Any, mail_dns: Any
) -> None:
    stats = WorkerStats()
    screening = stage(mail_dns, exempt=("127.0.0.1/32", "127.0.0.2/32"), stats=stats)
    controller = make_controller(handler, stages=[screening])
    assert transaction(controller.port, zones.LISTED)[-1].startswith("250")
    assert handler.sessions[-1].screening.describe() == "screening=exempt"
    assert stats.screening == {}  # not even looked up


def test_authenticated_sessions_are_never_blocked(
    make_controller: Any, handler: Any, mail_dns: Any
) -> None:
    def authenticator(*args: Any) -> AuthResult:
        return AuthResult(success=True)

    controller = make_controller(
        handler,
        stages=[stage(mail_dns)],
        auth_require_tls=False,
        authenticator=authenticator,
    )
    client = SMTPClient(controller.port, source=zones.LISTED)
    try:
        client.reply()
        client.command("EHLO client.test")
        assert client.command("AUTH PLAIN AHVzZXIAcGFzcw==").startswith("235")
        client.command("MAIL FROM:<alice@example.test>")
        assert client.command("RCPT TO:<bob@mx.test>").startswith("250")
    finally:
        client.close()


# -- DNS failures ----------------------------------------------------------------------------------


def test_a_list_that_never_answers_fails_open_without_delaying_anyone(
    make_controller: Any, handler: Any, mail_dns: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """list.slow.test's server never answers: the greeting does not wait, RCPT waits at most
    ``timeout``, the list counts as not listing (the other list still counts), and sessions of
    other clients run meanwhile."""
    caplog.set_level(logging.INFO)
    stats = WorkerStats()
    screening = stage(
        mail_dns,
        lists=("bl.test*2", "list.slow.test*2"),
        exempt=("127.0.0.1/32", "127.0.0.5/32"),
        timeout=6.0,
        stats=stats,
    )
    controller = make_controller(handler, stages=[screening])
    slow = SMTPClient(controller.port, source=zones.CLEAN)
    listed = SMTPClient(controller.port, source=zones.LISTED)
    try:
        assert slow.reply().startswith("220")  # before any verdict
        assert listed.reply().startswith("220")
        assert stats.screening_verdicts["pass"] == stats.screening_verdicts["listed"] == 0
        for client in (slow, listed):
            client.command("EHLO client.test")
            client.command("MAIL FROM:<alice@example.test>")
        rcpt_replies: dict[str, str] = {}

        def rcpt(name: str, client: SMTPClient) -> None:
            rcpt_replies[name] = client.command("RCPT TO:<bob@mx.test>")

        waiting = [
            threading.Thread(target=rcpt, args=(name, client))
            for name, client in (("slow", slow), ("listed", listed))
        ]
        for thread in waiting:
            thread.start()
        # Another client's whole session runs while those two wait for the slow list.
        assert transaction(controller.port, "127.0.0.5")[-1].startswith("250")
        assert not rcpt_replies, "a session waited for another session's DNS"
        for thread in waiting:
            thread.join(WAIT)
        assert rcpt_replies["slow"].startswith("250")  # fail-open
        assert rcpt_replies["listed"].startswith("550")  # bl.test answered
    finally:
        slow.close()
        listed.close()
    assert stats.screening[("list.slow.test", "error")] == 2  # one per client
    assert "DNS list list.slow.test did not answer (timeout)" in caplog.text
    assert "failed=list.slow.test" in caplog.text


def test_a_dead_resolver_fails_open_and_cached_verdicts_still_hold(
    make_controller: Any, handler: Any, own_dns: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    dns = own_dns()
    stats = WorkerStats()
    controller = make_controller(handler, stages=[stage(dns, timeout=2.0, stats=stats)])
    assert transaction(controller.port, zones.LISTED)[3].startswith("550")
    dns.stop()  # by PID, mid-test
    assert transaction(controller.port, "127.0.0.8")[-1].startswith("250")  # fail-open
    assert transaction(controller.port, zones.LISTED)[3].startswith("550")  # from the cache
    assert stats.screening[("bl.test", "error")] == 1
    assert stats.screening_cache == {"hit": 1, "miss": 2}
    assert "DNS list bl.test did not answer" in caplog.text


# -- the farm ----------------------------------------------------------------------------------


def test_every_worker_sees_the_verdicts_until_their_ttl_ends(
    farms: Any, tmp_path: Path, own_dns: Any
) -> None:
    """Two workers of a real farm, one session each at most: the second connection of a
    listed client lands on the other worker, after the DNS server is gone, and is still
    refused (the first worker's verdict, in shared memory). Once the 1 s TTL is over the client
    is looked up again, and the dead resolver lets it through (fail-open)."""
    dns = own_dns(dnsbl_ttl=1)
    config = toml_config(
        tmp_path / "farm.toml",
        {"handler": "farm.handlers:Sink", "max_sessions": 1},
        smtp={"hostname": "mx.test"},
        limits={"exempt_networks": []},
        screening={
            "resolver": [dns.address],
            "dnsbl": ["bl.test"],
            "action": "enforce",
            "timeout": 2,
            "min_ttl": 0,
        },
    )
    farm = farms.start(config=config, workers=2)
    farm.wait_ready(2)
    first = SMTPClient(farm.port, source=zones.LISTED)
    second = None
    try:
        assert first.reply().startswith("220")
        first.command("EHLO client.test")
        first.command("MAIL FROM:<alice@example.test>")
        assert first.command("RCPT TO:<bob@mx.test>").startswith("550 5.7.1")
        dns.stop()
        # The first worker is at its cap: this connection is the other worker's.
        second = SMTPClient(farm.port, source=zones.LISTED)
        assert second.reply().startswith("220")
        second.command("EHLO client.test")
        second.command("MAIL FROM:<alice@example.test>")
        assert second.command("RCPT TO:<bob@mx.test>").startswith("550 5.7.1")
        looked_up = farm.wait_log(
            r"\[(\d+)\] farm\.screening: session=\S+ client=127\.0\.0\.2 "
            r"screening=listed score=1 lists=bl\.test action=enforce\n"
        )
        from_cache = farm.wait_log(
            r"\[(\d+)\] farm\.screening: session=\S+ client=127\.0\.0\.2 "
            r"screening=listed score=1 lists=bl\.test action=enforce cached"
        )
        assert looked_up[1] != from_cache[1], "both verdicts came from one worker"
    finally:
        first.close()
        if second is not None:
            second.close()

    def let_through() -> bool:
        return transaction(farm.port, zones.LISTED)[3].startswith("250")

    wait_for(let_through, interval=0.2, what="the verdict to expire")
    farm.wait_log(r"DNS list bl\.test did not answer")

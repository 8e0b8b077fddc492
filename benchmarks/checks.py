"""CPU cost of the mail checks per message (or per client): screening, SPF, DKIM, ARC, DMARC.

Usage: ``.venv/bin/python benchmarks/checks.py [--n 300] [--reps 3]`` (``make bench-checks``)

A real unbound (Debian's, as the tests run it: ``tests/support/dns_server.py``) serves the
test zones of ``tests/support/mail_auth_zones.py`` on a free loopback port. Each check runs ``--n``
times in a row on one asyncio event loop, exactly as a worker runs it (the same functions, the
same resolver, the same thread pool for signatures), and the process's CPU time (user + system,
all threads: ``time.process_time``) is divided by ``--n``; the median of ``--reps`` repetitions
is reported.
unbound's own CPU is not counted (it stands for the recursive resolver an MX asks).

Two DNS conditions: *cold*, the worker's DNS cache off (every lookup is a UDP round trip to
unbound; a new sender domain), and *warm*, the cache on and filled (a repeat sender within its
records' TTL). Screening is measured per new client (three lists looked up, the verdict written
to the shared table) and for a client whose verdict is in the shared table.

The table is printed and written to ``benchmarks/results/checks.md`` (raw figures in
``checks.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from farm.authentication import AuthenticationStage  # noqa: E402
from farm.authentication.dkim import check_signatures  # noqa: E402
from farm.authentication.dmarc import check_dmarc  # noqa: E402
from farm.authentication.spf import SPFResult, check_spf  # noqa: E402
from farm.resolver import Resolver  # noqa: E402
from farm.screening import parse_site, screening_stage  # noqa: E402
from farm.screening.cache import VerdictCache  # noqa: E402
from farm.smtp.stages import edit_header  # noqa: E402
from tests.support import mail_auth_zones as zones  # noqa: E402
from tests.support.dns_server import Unbound  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEADLINE = 5.0

Check = Callable[[int], Awaitable[Any]]


def measure(loop: asyncio.AbstractEventLoop, check: Check, n: int, reps: int) -> list[float]:
    """CPU µs per call of ``check(i)``, one figure per repetition (after a warm-up call)."""
    loop.run_until_complete(check(-1))
    figures = []
    for _ in range(reps):
        started = time.process_time()

        async def run() -> None:
            for i in range(n):
                await check(i)

        loop.run_until_complete(run())
        figures.append((time.process_time() - started) / n * 1e6)
    return figures


def checks(address: str, executor: ThreadPoolExecutor) -> dict[str, tuple[str, Check]]:
    """{name: (what, check)}; each check takes the iteration number."""
    cold = Resolver([address], cache_size=0)
    warm = Resolver([address])
    loop_time = asyncio.get_event_loop_policy().get_event_loop().time
    small = zones.dkim_signed(zones.message())
    large = zones.dkim_signed(zones.message(body=("x" * 76 + "\r\n") * 1300))  # ~100 KB
    sealed = zones.arc_sealed(zones.dkim_signed(zones.message()))
    from_fields = [b" Alice <alice@example.test>"]
    spf_pass = SPFResult("pass", "example.test", "mailfrom")

    def deadline() -> float:
        return loop_time() + DEADLINE

    sites = [parse_site("bl.test*2"), parse_site("bl2.test*1"), parse_site("wl.test*-5", -1)]

    def screening(resolver: Resolver) -> Any:
        return screening_stage("enforce", sites, resolver, cache=VerdictCache(1 << 16))

    screen = screening(cold)
    cached = screening(cold)
    cached.cache.put(ipaddress.ip_address("127.0.0.2"), cached.fingerprint, 1, 3600)

    async def new_client(i: int) -> Any:
        return await screen._look_up(ipaddress.ip_address(f"127.1.{i // 250 % 250}.{i % 250}"))

    async def known_client(i: int) -> Any:
        return cached.cache.get(ipaddress.ip_address("127.0.0.2"), cached.fingerprint)

    def spf(resolver: Resolver) -> Check:
        async def check(i: int) -> Any:
            result = await check_spf(resolver, "127.0.0.3", "a@example.test", "c.test", deadline())
            assert result.result == "pass", result
            return result

        return check

    def signatures(resolver: Resolver, message: bytes, arc: bool, dkim: bool = True) -> Check:
        async def check(i: int) -> Any:
            sigs, chain = await check_signatures(
                message, resolver, executor, deadline(), check_dkim=dkim, check_arc=arc
            )
            assert all(s.result == "pass" for s in sigs), sigs
            assert not arc or chain.result == "pass", chain
            return sigs

        return check

    def dmarc(resolver: Resolver) -> Check:
        async def check(i: int) -> Any:
            result = await check_dmarc(resolver, from_fields, spf_pass, [], deadline())
            assert result.result == "pass", result
            return result

        return check

    stage = AuthenticationStage(warm, "mx.test", dmarc="enforce", arc=True, executor=executor)

    class Session:
        peer = ("127.0.0.3", 25)
        proxy_data = None
        authenticated = False
        host_name = "client.test"
        id = "bench"

    class Envelope:
        authentication = None

    async def whole_stage(i: int) -> Any:
        session, envelope = Session(), Envelope()
        await stage.mail(session, envelope, "alice@example.test")
        envelope.original_content = small
        decision = await stage.end_of_data(session, envelope)
        assert decision.reply is None
        return edit_header(small, decision.add_headers, decision.remove_headers)

    return {
        "screening-new": ("screening, a new client (3 lists, cold)", new_client),
        "screening-cached": ("screening, verdict in the shared table", known_client),
        "spf-cold": ("SPF pass (1 TXT lookup, cold)", spf(cold)),
        "spf-warm": ("SPF pass (warm)", spf(warm)),
        "dkim-cold": ("DKIM, 1 signature RSA-2048, 2 KB (cold)", signatures(cold, small, False)),
        "dkim-warm": ("DKIM, 1 signature RSA-2048, 2 KB (warm)", signatures(warm, small, False)),
        "dkim-100k": ("DKIM, 1 signature, 100 KB body (warm)", signatures(warm, large, False)),
        "arc-warm": (
            "ARC chain of 1 set, no DKIM (warm)",
            signatures(warm, sealed, True, dkim=False),
        ),
        "dmarc-cold": ("DMARC policy lookup + evaluation (cold)", dmarc(cold)),
        "dmarc-warm": ("DMARC (warm)", dmarc(warm)),
        "all-warm": (
            "the whole stage: SPF+DKIM+ARC+DMARC, header (warm)",
            whole_stage,
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="calls per repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated check names")
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    executor = ThreadPoolExecutor(2)
    with tempfile.TemporaryDirectory() as directory:
        server = Unbound(Path(directory), zones.ZONES, zones.records(), zones.SLOW_ZONE).start()
        try:
            rows = []
            for name, (what, check) in checks(server.address, executor).items():
                if args.only and name not in args.only.split(","):
                    continue
                figures = measure(loop, check, args.n, args.reps)
                rows.append((name, what, statistics.median(figures), figures))
                print(f"{name:18} {statistics.median(figures):9.1f} µs  {what}", file=sys.stderr)
        finally:
            server.stop()
    executor.shutdown()
    loop.close()
    load = os.getloadavg()
    table = "\n".join(
        [
            "| check | CPU µs (median) | what |",
            "|---|---:|---|",
            *(f"| {name} | {median:.0f} | {what} |" for name, what, median, _ in rows),
            "",
            f"n={args.n} per repetition, {args.reps} repetitions; load average at the end "
            f"{load[0]:.1f} on {os.cpu_count()} CPUs.",
        ]
    )
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checks.md").write_text(table + "\n")
    raw = {
        "n": args.n,
        "reps": args.reps,
        "loadavg": load,
        "checks": [
            {"name": name, "what": what, "cpu_us_median": median, "cpu_us": figures}
            for name, what, median, figures in rows
        ],
    }
    (RESULTS / "checks.json").write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

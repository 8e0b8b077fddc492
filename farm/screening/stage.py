"""Connection screening against DNS block and allow lists, as Postfix's postscreen does it.

When a connection is accepted, the client's address is looked up in every list at once (before
the greeting, while ``greeting_delay`` runs). Its score is the sum of the weights of the lists
that list it; at ``threshold`` or above the client is *listed*, and the ``action`` applies:

* ``enforce``: the session goes on, and every RCPT gets ``550 5.7.1 Service unavailable;
  client [IP] blocked using LIST`` (the log shows whom the client wanted to reach);
* ``drop``: the greeting waits for the verdict; a listed client gets that reply as a ``554``
  greeting instead of the 220, and is disconnected;
* ``ignore``: the verdict is logged and counted, nothing else.

A list that does not answer within ``timeout`` (or fails) counts as not listing the client
(fail-open), logged and counted. Clients in the exempt networks, and (for ``enforce``)
sessions that authenticated, are never blocked. Verdicts are cached for the farm as a whole
(:mod:`farm.screening.cache`) for the smallest TTL of the answers, within [min_ttl, max_ttl];
a verdict with a failed list is not cached.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from farm.limits import client_address
from farm.resolver import NODATA, NXDOMAIN, OK, Lookup, Resolver
from farm.screening.cache import VerdictCache
from farm.screening.sites import Site, query_name
from farm.smtp.stages import Stage

log = logging.getLogger("farm.screening")

__all__ = ["ACTIONS", "ScreeningStage", "Verdict", "screening_stage"]

ACTIONS = ("enforce", "drop", "ignore")
#: At most one warning per list about failed lookups per this many seconds.
WARN_INTERVAL = 10.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Verdict:
    """What screening found about a client (``session.screening``)."""

    address: str
    score: int = 0
    #: The lists that list the client (as configured), highest weight first.
    listed_by: tuple[str, ...] = ()
    #: The lists that failed to answer (not counted).
    failed: tuple[str, ...] = ()
    #: At or above the threshold.
    listed: bool = False
    exempt: bool = False
    cached: bool = False

    def describe(self) -> str:
        if self.exempt:
            return "screening=exempt"
        text = f"screening={'listed' if self.listed else 'pass'} score={self.score}"
        if self.listed_by:
            text += f" lists={','.join(self.listed_by)}"
        if self.failed:
            text += f" failed={','.join(self.failed)}"
        return text


def _fingerprint(sites: Sequence[Site]) -> int:
    """Identifies the lists a cached verdict's bit mask refers to (order included)."""
    return zlib.crc32("\n".join(site.text for site in sites).encode())


class ScreeningStage(Stage):
    """``action = "ignore"``: look up, log, count. Subclasses enforce or drop."""

    name = "screening"
    action = "ignore"

    def __init__(
        self,
        sites: Sequence[Site],
        resolver: Resolver,
        *,
        threshold: int = 1,
        timeout: float = 2.0,
        exempt: Callable[[IPAddress], bool] = lambda address: False,
        cache: VerdictCache | None = None,
        min_ttl: float = 60.0,
        max_ttl: float = 3600.0,
        stats: Any = None,
    ) -> None:
        if len(sites) > 64:
            raise ValueError("at most 64 DNS lists")
        self.sites = tuple(sites)
        self.domains = tuple(dict.fromkeys(site.domain for site in self.sites))
        self.resolver = resolver
        self.threshold = threshold
        self.timeout = timeout
        self.exempt = exempt
        self.cache = cache if cache is not None else VerdictCache(4096)
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.stats = stats
        self.fingerprint = _fingerprint(self.sites)
        #: Sessions screening now: session -> the verdict's task (or the verdict).
        self._sessions: dict[Any, asyncio.Future[Verdict] | Verdict] = {}
        #: Lookups in flight per address (sessions from one client share them).
        self._inflight: dict[IPAddress, asyncio.Task[Verdict]] = {}
        self._warned: dict[str, float] = {}

    # -- the stage -------------------------------------------------------------------------

    def connect(self, session: Any) -> None:
        address = client_address(session.peer, session.proxy_data)
        if address is None or self.exempt(address):
            verdict = Verdict(str(address or "-"), exempt=True)
            self._count_verdict(verdict)
            session.screening = verdict
            self._sessions[session] = verdict
            return
        listed = self.cache.get(address, self.fingerprint)
        if self.stats is not None:
            self.stats.screening_cache["miss" if listed is None else "hit"] += 1
        if listed is not None:
            self._settle(session, self._verdict(address, listed, (), cached=True))
            return
        task = self._inflight.get(address)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._look_up(address))
            self._inflight[address] = task
            task.add_done_callback(lambda _: self._inflight.pop(address, None))
        waiter = asyncio.ensure_future(_shielded(task))
        self._sessions[session] = waiter
        waiter.add_done_callback(lambda done: self._done(session, done))

    def _done(self, session: Any, waiter: asyncio.Future[Verdict]) -> None:
        if waiter.cancelled() or waiter.exception() is not None:
            return
        # A session that ended first is still counted and logged (action ignore: a bot that
        # leaves quickly is exactly what the log should show).
        self._settle(session, waiter.result(), open_=self._sessions.get(session) is waiter)

    def _settle(self, session: Any, verdict: Verdict, open_: bool = True) -> None:
        session.screening = verdict
        if open_:
            self._sessions[session] = verdict
        self._count_verdict(verdict)
        if verdict.listed or verdict.failed:
            log.info(
                "session=%s client=%s %s action=%s%s",
                session.id,
                verdict.address,
                verdict.describe(),
                self.action,
                " cached" if verdict.cached else "",
            )

    async def verdict(self, session: Any) -> Verdict | None:
        """The session's verdict, once known (within ``timeout``)."""
        entry = self._sessions.get(session)
        if entry is None or isinstance(entry, Verdict):
            return entry
        return await entry

    def close(self, session: Any) -> None:
        self._sessions.pop(session, None)  # a lookup under way still ends in the log

    def session_log(self, session: Any) -> str:
        verdict = getattr(session, "screening", None)
        return verdict.describe() if isinstance(verdict, Verdict) else ""

    def refusal(self, verdict: Verdict) -> str:
        """The 5.7.1 text naming the (heaviest) list."""
        lists = verdict.listed_by[0] if verdict.listed_by else "DNS lists"
        return f"5.7.1 Service unavailable; client [{verdict.address}] blocked using {lists}"

    # -- lookups ---------------------------------------------------------------------------

    async def _look_up(self, address: IPAddress) -> Verdict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        tasks = {
            domain: loop.create_task(
                self.resolver.query(query_name(address, domain), "A", deadline, "screening")
            )
            for domain in self.domains
        }
        done, pending = await asyncio.wait(tasks.values(), timeout=self.timeout)
        for task in pending:
            task.cancel()
        answers: dict[str, Lookup] = {}
        for domain, task in tasks.items():
            if task in done and not task.cancelled() and task.exception() is None:
                answers[domain] = task.result()
            else:
                answers[domain] = Lookup("error", error="timeout")
        listed, failed, ttl = 0, [], self.max_ttl
        for index, site in enumerate(self.sites):
            answer = answers[site.domain]
            if answer.status == OK:
                found = site.matches(str(record) for record in answer.records)
                result = "listed" if found else "unlisted"
                listed |= (1 << index) if found else 0
                ttl = min(ttl, answer.ttl)
            elif answer.status in (NXDOMAIN, NODATA):
                result = "unlisted"
                ttl = min(ttl, answer.ttl)
            else:
                result = "error"
                failed.append(site.text)
                self._warn(site.text, answer.error)
            if self.stats is not None:
                self.stats.count(self.stats.screening, (site.text, result))
        if not failed:
            self.cache.put(address, self.fingerprint, listed, max(self.min_ttl, ttl))
        return self._verdict(address, listed, tuple(failed), cached=False)

    def _verdict(
        self, address: IPAddress, listed: int, failed: tuple[str, ...], cached: bool
    ) -> Verdict:
        hits = [site for index, site in enumerate(self.sites) if listed >> index & 1]
        score = sum(site.weight for site in hits)
        hits.sort(key=lambda site: -site.weight)
        return Verdict(
            str(address),
            score,
            tuple(site.text for site in hits),
            failed,
            listed=score >= self.threshold,
            cached=cached,
        )

    def _count_verdict(self, verdict: Verdict) -> None:
        if self.stats is not None:
            key = "exempt" if verdict.exempt else "listed" if verdict.listed else "pass"
            self.stats.screening_verdicts[key] += 1

    def _warn(self, site: str, error: str) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._warned.get(site, -WARN_INTERVAL) >= WARN_INTERVAL:
            self._warned[site] = now
            log.warning(
                "DNS list %s did not answer (%s): its clients count as not listed", site, error
            )


async def _shielded(task: asyncio.Task[Verdict]) -> Verdict:
    """Wait for a shared lookup; cancelling the waiter leaves the lookup running."""
    return await asyncio.shield(task)


class EnforcingScreening(ScreeningStage):
    """``action = "enforce"``: every RCPT of a listed client is refused."""

    action = "enforce"

    async def rcpt(self, session: Any, envelope: Any, address: str) -> str | None:
        if session.authenticated:
            return None
        verdict = await self.verdict(session)
        if verdict is None or not verdict.listed:
            return None
        return "550 " + self.refusal(verdict)


class DroppingScreening(ScreeningStage):
    """``action = "drop"``: a listed client gets a 554 greeting and is disconnected."""

    action = "drop"

    async def greet(self, session: Any) -> str | None:
        verdict = await self.verdict(session)
        if verdict is None or not verdict.listed:
            return None
        return "554 " + self.refusal(verdict)


def screening_stage(action: str, *args: Any, **kwargs: Any) -> ScreeningStage:
    """The stage for ``action`` (enforce, drop or ignore)."""
    kinds = {"enforce": EnforcingScreening, "drop": DroppingScreening, "ignore": ScreeningStage}
    if action not in kinds:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    return kinds[action](*args, **kwargs)

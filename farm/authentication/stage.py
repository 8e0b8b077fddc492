"""Sender authentication as an engine stage: SPF at MAIL, DKIM/ARC/DMARC at the end of data,
one Authentication-Results header prepended to the message the handler gets.

* MAIL: the SPF check of the sender (of the HELO name for ``<>``) starts in the background,
  so the reply does not wait for DNS; with ``spf_reject_fail`` it does wait, and a ``fail``
  is refused with ``550 5.7.23``.
* End of data: DKIM (every signature), ARC and DMARC run by one deadline (``timeout``
  seconds; what is not done by then is ``temperror``); Authentication-Results fields that
  claim our ``authserv_id`` are removed, ours is prepended. With ``dmarc = "enforce"``, a
  failing message whose policy (after ``pct``) is reject gets ``550 5.7.1``; quarantine is
  delivered, marked in the header.
* Sessions that authenticated (AUTH) are not checked (``auth=pass``); clients in the exempt
  networks are checked but never refused.

The results are on ``envelope.authentication`` (:class:`Results`) for the handler.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from farm.authentication.dkim import ARCResult, SignatureResult, check_signatures
from farm.authentication.dmarc import DMARCResult, check_dmarc
from farm.authentication.header import HEADER, format_header, is_forged, resinfo
from farm.authentication.spf import SPFResult, check_spf
from farm.limits import client_address
from farm.resolver import Resolver
from farm.smtp.logline import quote
from farm.smtp.stages import EndOfData, Stage, header_fields

log = logging.getLogger("farm.authentication")

__all__ = ["DMARC_MODES", "AuthenticationStage", "Results"]

DMARC_MODES = ("off", "report", "enforce")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class Results:
    """A message's authentication results (``envelope.authentication``)."""

    spf: SPFResult | None = None
    dkim: list[SignatureResult] = field(default_factory=list)
    arc: ARCResult | None = None
    dmarc: DMARCResult | None = None
    #: The session authenticated with AUTH (nothing else was checked).
    authenticated: bool = False
    #: Whether DKIM was checked (an empty ``dkim`` then means: no signature).
    dkim_checked: bool = False
    #: The SPF check started at MAIL, and its (domain, identity) (internal).
    spf_task: asyncio.Future[SPFResult] | None = field(default=None, repr=False)
    spf_for: tuple[str, str] = field(default=("", "mailfrom"), repr=False)

    def summary(self) -> str:
        """``spf=pass dkim=pass,fail arc=none dmarc=fail/quarantine`` for the log line."""
        if self.authenticated:
            return "auth=pass"
        parts = []
        if self.spf is not None:
            parts.append(f"spf={self.spf.result}")
        if self.dkim or self.dkim_checked:
            parts.append("dkim=" + (",".join(sig.result for sig in self.dkim) or "none"))
        if self.arc is not None:
            parts.append(f"arc={self.arc.result}")
        if self.dmarc is not None:
            dmarc = f"dmarc={self.dmarc.result}"
            if self.dmarc.result == "fail":
                dmarc += f"/{self.dmarc.disposition}"
            parts.append(dmarc)
        return " ".join(parts)


class AuthenticationStage(Stage):
    """SPF, DKIM, ARC and DMARC for every message (see the module docstring)."""

    name = "authentication"

    def __init__(
        self,
        resolver: Resolver,
        authserv_id: str,
        *,
        spf: bool = True,
        dkim: bool = True,
        arc: bool = True,
        dmarc: str = "report",
        spf_reject_fail: bool = False,
        timeout: float = 5.0,
        executor: Executor | None = None,
        threads: int = 2,
        exempt: Callable[[IPAddress], bool] = lambda address: False,
        stats: Any = None,
        sample: random.Random | None = None,
    ) -> None:
        if dmarc not in DMARC_MODES:
            raise ValueError(f"dmarc must be one of {', '.join(DMARC_MODES)}, not {dmarc!r}")
        if dmarc != "off" and not (spf and dkim):
            raise ValueError("DMARC needs the SPF and DKIM results: turn spf and dkim on")
        self.resolver = resolver
        self.authserv_id = authserv_id
        self.spf = spf
        self.dkim = dkim
        self.arc = arc
        self.dmarc = dmarc
        self.spf_reject_fail = spf_reject_fail
        self.timeout = timeout
        self.exempt = exempt
        self.stats = stats
        self.sample = sample
        self._executor = executor
        self._threads = threads
        self._forged = is_forged(authserv_id)
        #: Per session: the last SPF check (its key and task), reused for the same sender.
        self._spf_checks: dict[Any, tuple[tuple[str, str, str], asyncio.Task[SPFResult]]] = {}

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, "farm-authentication")
        return self._executor

    # -- MAIL ------------------------------------------------------------------------------

    async def mail(self, session: Any, envelope: Any, address: str) -> str | None:
        results = envelope.authentication = Results()
        if session.authenticated:
            results.authenticated = True
            return None
        if not self.spf:
            return None
        address_ip = client_address(session.peer, session.proxy_data)
        if address_ip is None:
            return None
        sender = "" if address == "<>" else address  # the engine keeps the null path as <>
        task = self._spf_task(session, str(address_ip), sender)
        results.spf_task = task
        if sender:
            results.spf_for = (sender.rpartition("@")[2].lower(), "mailfrom")
        else:
            results.spf_for = ((session.host_name or "").lower(), "helo")
        if not self.spf_reject_fail or self.exempt(address_ip):
            return None
        result = await asyncio.shield(task)
        if result.result != "fail":
            return None
        if self.stats is not None:
            self.stats.authentication_actions["spf_reject"] += 1
        log.info(
            "session=%s MAIL from=%s refused: SPF fail for %s",
            session.id,
            quote(f"<{address}>"),
            address_ip,
        )
        return (
            f"550 5.7.23 SPF validation failed: {result.domain} does not allow "
            f"[{address_ip}] to send its mail"
        )

    def _spf_task(self, session: Any, ip: str, sender: str) -> asyncio.Task[SPFResult]:
        key = (ip, sender.lower(), (session.host_name or "").lower())
        previous = self._spf_checks.get(session)
        if previous is not None:
            if previous[0] == key:
                return previous[1]
            previous[1].cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        task = loop.create_task(check_spf(self.resolver, ip, sender, session.host_name, deadline))
        self._spf_checks[session] = (key, task)
        return task

    def close(self, session: Any) -> None:
        previous = self._spf_checks.pop(session, None)
        if previous is not None:
            previous[1].cancel()

    # -- end of data -----------------------------------------------------------------------

    async def end_of_data(self, session: Any, envelope: Any) -> EndOfData:
        results = envelope.authentication
        if not isinstance(results, Results):
            results = envelope.authentication = Results()
        if session.authenticated:
            results.authenticated = True
            header = format_header(self.authserv_id, [resinfo("auth", "pass")])
            return EndOfData(add_headers=((HEADER, header),), remove_headers=self._forged)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        message: bytes = envelope.original_content
        spf_wait = self._spf_result(results, deadline)
        if self.dkim or self.arc:
            signatures = check_signatures(
                message,
                self.resolver,
                self.executor,
                deadline,
                check_dkim=self.dkim,
                check_arc=self.arc,
            )
            results.spf, (results.dkim, results.arc) = await asyncio.gather(spf_wait, signatures)
            results.dkim_checked = self.dkim
        else:
            results.spf = await spf_wait
        if self.dmarc != "off":
            from_fields = [
                value for name, value, _, _ in header_fields(message) if name.lower() == "from"
            ]
            results.dmarc = await check_dmarc(
                self.resolver, from_fields, results.spf, results.dkim, deadline, self.sample
            )
        self._count(results)
        header = format_header(self.authserv_id, self._resinfo(results))
        decision = EndOfData(add_headers=((HEADER, header),), remove_headers=self._forged)
        dmarc = results.dmarc
        if dmarc is None or dmarc.result != "fail":
            return decision
        if dmarc.sampled_out and self.stats is not None:
            self.stats.authentication_actions["dmarc_sampled_out"] += 1
        if dmarc.disposition == "quarantine" and self.stats is not None:
            self.stats.authentication_actions["dmarc_quarantine"] += 1
        if dmarc.disposition != "reject" or self.dmarc != "enforce":
            return decision
        address = client_address(session.peer, session.proxy_data)
        if address is not None and self.exempt(address):
            return decision
        if self.stats is not None:
            self.stats.authentication_actions["dmarc_reject"] += 1
        return EndOfData(
            reply=f"550 5.7.1 Message rejected per the DMARC policy of {dmarc.header_from}"
        )

    async def _spf_result(self, results: Results, deadline: float) -> SPFResult | None:
        task = results.spf_task
        if task is None:
            return None
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(task)
        except (TimeoutError, asyncio.CancelledError):
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            return SPFResult("temperror", *results.spf_for, "SPF check timed out")

    def _resinfo(self, results: Results) -> list[str]:
        items = []
        spf = results.spf
        if spf is not None:
            identity = "smtp.mailfrom" if spf.identity == "mailfrom" else "smtp.helo"
            items.append(resinfo("spf", spf.result, [(identity, spf.domain)], spf.reason))
        if self.dkim:
            if not results.dkim:
                items.append(resinfo("dkim", "none"))
            for sig in results.dkim:
                properties = [("header.d", sig.domain), ("header.s", sig.selector)]
                properties.append(("header.b", sig.b))
                reason = sig.reason if sig.result != "pass" else ""
                items.append(resinfo("dkim", sig.result, properties, reason))
        if results.arc is not None:
            items.append(resinfo("arc", results.arc.result, (), results.arc.reason))
        dmarc = results.dmarc
        if dmarc is not None:
            reason = dmarc.reason if dmarc.result != "fail" else ""
            if dmarc.policy:
                reason = f"p={dmarc.policy} dis={dmarc.disposition}"
                if dmarc.sampled_out:
                    reason += " sampled_out"
            items.append(
                resinfo("dmarc", dmarc.result, [("header.from", dmarc.header_from)], reason)
            )
        return items

    def _count(self, results: Results) -> None:
        stats = self.stats
        if stats is None:
            return
        table = stats.authentication
        if results.spf is not None:
            stats.count(table, ("spf", results.spf.result))
        if self.dkim:
            for sig in results.dkim or [SignatureResult("none")]:
                stats.count(table, ("dkim", sig.result))
        if results.arc is not None:
            stats.count(table, ("arc", results.arc.result))
        if results.dmarc is not None:
            stats.count(table, ("dmarc", results.dmarc.result))

    def message_log(self, session: Any, envelope: Any) -> str:
        results = getattr(envelope, "authentication", None)
        return results.summary() if isinstance(results, Results) else ""

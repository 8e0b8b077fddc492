"""SPF (RFC 7208) with pyspf, its DNS asynchronous.

pyspf evaluates synchronously and asks its module-level ``DNSLookup`` for every name. Here that
function answers from the answers gathered so far, and for a name not yet looked up it notes
the name and stops the evaluation. :func:`check_spf` then looks the noted names up with the
asynchronous resolver and evaluates again from the start, until an evaluation needs nothing
new. An evaluation costs microseconds and SPF allows at most 10 DNS-querying terms, so this
stays cheap; the event loop never waits for DNS, and no thread does either.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
from dataclasses import dataclass
from typing import Any

import spf

from farm.resolver import ERROR, OK, Resolver

__all__ = ["SPFResult", "check_spf"]

#: Evaluations of one check at most (each adds at least one answer).
MAX_ROUNDS = 40
#: pyspf's own per-lookup timeout; unused (lookups are ours), but it must be positive.
_PYSPF_TIMEOUT = 20


@dataclass(frozen=True, slots=True)
class SPFResult:
    """One SPF check: its RFC 8601 result, and the identity checked."""

    #: pass, fail, softfail, neutral, none, temperror or permerror.
    result: str
    #: The domain whose policy was checked (the MAIL FROM domain, or the HELO name for <>).
    domain: str
    #: ``mailfrom`` or ``helo``.
    identity: str
    #: Why (pyspf's explanation of errors; never the sender's exp= text).
    reason: str = ""


class _Pending(BaseException):
    """Raised inside pyspf for a name not looked up yet (a BaseException: nothing in pyspf's
    ``except Exception`` paths may take it for an SPF error)."""


@dataclass
class _Answers:
    known: dict[tuple[str, str], list[Any] | None]
    wanted: set[tuple[str, str]]


_answers: contextvars.ContextVar[_Answers | None] = contextvars.ContextVar(
    "farm_spf_answers", default=None
)
_original_lookup = spf.DNSLookup


def _lookup(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> list[Any]:
    """pyspf's DNSLookup: answers from the current check, or a note of what is missing."""
    answers = _answers.get()
    if answers is None:  # someone else's pyspf use in this process
        return _original_lookup(name, qtype, strict, timeout)
    key = (name.lower().rstrip("."), qtype)
    if key not in answers.known:
        answers.wanted.add(key)
        raise _Pending
    records = answers.known[key]
    if records is None:
        raise spf.TempError(f"DNS lookup of {key[0]} {qtype} failed")
    return records


spf.DNSLookup = _lookup


def _pyspf_records(name: str, qtype: str, records: tuple[Any, ...]) -> list[Any]:
    """dnspython rdata in the shape pyspf's own dnspython lookup gives it."""
    key = (name, qtype)
    if qtype in ("A", "AAAA"):
        return [(key, rdata.address) for rdata in records]
    if qtype == "MX":
        return [(key, (rdata.preference, rdata.exchange)) for rdata in records]
    if qtype == "PTR":
        return [(key, rdata.target.to_text(True)) for rdata in records]
    if qtype in ("TXT", "SPF"):
        return [(key, rdata.strings) for rdata in records]
    return []


def _evaluate(ip: str, sender: str, helo: str, answers: _Answers) -> tuple[str, str] | None:
    """One evaluation: (result, reason), or None when it needs names looked up."""
    token = _answers.set(answers)
    try:
        query = spf.query(i=ip, s=sender, h=helo, timeout=_PYSPF_TIMEOUT, querytime=0)
        result, _code, explanation = query.check()
    except _Pending:
        return None
    finally:
        _answers.reset(token)
    if answers.wanted:  # a lookup went missing inside a branch that swallowed it
        return None
    reason = explanation if result in ("permerror", "temperror") else ""
    return result, reason


def _is_domain(name: str) -> bool:
    if not name or name.startswith("[") or "." not in name:
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return True
    return False


async def check_spf(
    resolver: Resolver,
    ip: str,
    mail_from: str,
    helo: str | None,
    deadline: float,
) -> SPFResult:
    """Check ``mail_from`` (or, for ``<>``, the HELO name) for client ``ip``, by ``deadline``
    (the loop's clock): past it the result is temperror."""
    helo = (helo or "").strip()
    if mail_from:
        identity, domain = "mailfrom", mail_from.rpartition("@")[2].lower()
    else:
        identity, domain = "helo", helo.lower()
        if not _is_domain(domain):
            return SPFResult("none", domain, identity, "no HELO domain to check")
    if not domain:
        return SPFResult("none", domain, identity, "no domain to check")
    answers = _Answers({}, set())
    loop = asyncio.get_running_loop()
    for _ in range(MAX_ROUNDS):
        outcome = _evaluate(ip, mail_from, helo, answers)
        if outcome is not None:
            return SPFResult(outcome[0], domain, identity, outcome[1])
        if loop.time() >= deadline:
            break
        wanted = sorted(answers.wanted)
        answers.wanted.clear()
        lookups = await asyncio.gather(
            *(resolver.query(name, qtype, deadline, "spf") for name, qtype in wanted)
        )
        for (name, qtype), lookup in zip(wanted, lookups, strict=True):
            if lookup.status == ERROR:
                answers.known[(name, qtype)] = None
            elif lookup.status == OK:
                answers.known[(name, qtype)] = _pyspf_records(name, qtype, lookup.records)
            else:
                answers.known[(name, qtype)] = []
    return SPFResult("temperror", domain, identity, "SPF check timed out")

"""DMARC (RFC 7489): policy discovery, the ``dmarc`` package's evaluation, ``pct`` sampling.

The From domain's record is looked up at ``_dmarc.<domain>``, else at the organizational
domain's (the registrable domain per the Public Suffix List, from the ``publicsuffixlist``
package, which ships the list). The ``dmarc`` package parses the record and evaluates SPF and
DKIM alignment, taking the subdomain policy (``sp``) when the record is the organizational
domain's. What is left here: when a policy applies, ``pct`` decides whether it is sampled
out, and then (RFC 7489 6.6.4) reject becomes quarantine and quarantine becomes none.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import dmarc
from publicsuffixlist import PublicSuffixList

from farm.authentication.dkim import SignatureResult
from farm.authentication.spf import SPFResult
from farm.resolver import ERROR, OK, Resolver

__all__ = ["DMARCResult", "check_dmarc", "from_domain", "organizational_domain"]

_DOWNGRADE = {"reject": "quarantine", "quarantine": "none"}


@dataclass(frozen=True, slots=True)
class DMARCResult:
    """A message's DMARC result and what its policy asks for."""

    #: pass, fail, none, temperror or permerror.
    result: str
    #: The RFC5322.From domain.
    header_from: str = ""
    #: The policy that applies (p, or sp for a subdomain): none, quarantine, reject ("" if no
    #: policy was found).
    policy: str = ""
    #: What to do with a failing message after ``pct``: none, quarantine or reject.
    disposition: str = "none"
    #: A policy sampled out by pct.
    sampled_out: bool = False
    reason: str = ""


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """The registrable domain of ``domain`` (``example.co.uk`` for ``a.example.co.uk``);
    ``domain`` itself when it is a public suffix or unknown to the list."""
    return _public_suffixes().privatesuffix(domain) or domain


def is_public_suffix(domain: str) -> bool:
    return bool(_public_suffixes().is_public(domain))


class _OrganizationalDomains:
    """The PSL interface the ``dmarc`` package asks for alignment."""

    def get_public_suffix(self, domain: str) -> str:
        return organizational_domain(domain)


def from_domain(values: Sequence[bytes]) -> tuple[str | None, str]:
    """The single From domain of a message's From fields (their raw values), or (None, why)."""
    if len(values) != 1:
        return None, "no From field" if not values else "several From fields"
    text = values[0].decode("utf-8", "replace").replace("\r", "").replace("\n", "")
    domains = {
        address.rpartition("@")[2].strip().rstrip(".").lower()
        for _, address in email.utils.getaddresses([text])
        if address
    }
    if len(domains) != 1 or "" in domains:
        return None, "no single From domain"
    domain = domains.pop()
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None, "unusable From domain"
    return domain, ""


async def _records(resolver: Resolver, domain: str, deadline: float) -> list[str] | None:
    """The DMARC records at ``_dmarc.<domain>`` (None: the lookup failed)."""
    lookup = await resolver.query(f"_dmarc.{domain}", "TXT", deadline, "dmarc")
    if lookup.status == ERROR:
        return None
    if lookup.status != OK:
        return []
    texts = [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in lookup.records]
    return [text for text in texts if text.startswith("v=DMARC1")]


async def check_dmarc(
    resolver: Resolver,
    from_fields: Sequence[bytes],
    spf: SPFResult | None,
    signatures: Sequence[SignatureResult],
    deadline: float,
    sample: random.Random | None = None,
) -> DMARCResult:
    """Evaluate the message's DMARC policy, by ``deadline`` (the loop's clock)."""
    domain, why = from_domain(from_fields)
    if domain is None:
        return DMARCResult("permerror", reason=why)
    organizational = organizational_domain(domain)
    records = await _records(resolver, domain, deadline)
    found_at_organizational = False
    if records == [] and organizational != domain:
        records = await _records(resolver, organizational, deadline)
        found_at_organizational = True
    if records is None:
        return DMARCResult("temperror", domain, reason="DNS lookup failed")
    if len(records) != 1:  # none, or several (RFC 7489 6.6.3: no policy)
        return DMARCResult("none", domain)
    try:
        policy = dmarc.DMARCPolicy(
            record=records[0],
            domain=domain,
            org_domain=organizational if found_at_organizational else None,
            publicsuffix=_OrganizationalDomains(),
            strict=False,
        )
    except dmarc.Error as error:
        return DMARCResult("permerror", domain, reason=f"bad record: {error}")
    auth_results: list[dmarc.AuthResult] = []
    if spf is not None and spf.domain and not is_public_suffix(spf.domain):
        auth_results.append(dmarc.SPF(spf.domain, _spf_result(spf.result)))
    for signature in signatures:
        if signature.domain and not is_public_suffix(signature.domain):
            auth_results.append(dmarc.DKIM(signature.domain, _dkim_result(signature.result)))
    with contextlib.suppress(dmarc.PolicyError):  # a failure: the result says what to do
        policy.verify(auth_results=auth_results)
    result = policy.result
    assert result is not None
    record = policy.policy
    applies = record.sp if found_at_organizational and record.sp.value else record.p
    published = applies.value or "none"
    if result.result is dmarc.DMARCResult.PASS:
        return DMARCResult("pass", domain, published)
    disposition, sampled_out = published, False
    pct = policy.policy.pct
    sampled = published in _DOWNGRADE and pct < 100
    if sampled and (sample or random).random() * 100 >= pct:
        disposition, sampled_out = _DOWNGRADE[published], True
    return DMARCResult(
        "fail", domain, published, disposition, sampled_out, "no aligned SPF or DKIM pass"
    )


def _spf_result(result: str) -> dmarc.SPFResult:
    try:
        return dmarc.SPFResult(result)
    except ValueError:
        return dmarc.SPFResult.NONE


def _dkim_result(result: str) -> dmarc.DKIMResult:
    try:
        return dmarc.DKIMResult(result)
    except ValueError:
        return dmarc.DKIMResult.NONE

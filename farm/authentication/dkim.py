"""DKIM (RFC 6376, every signature) and ARC (RFC 8617, the chain) with dkimpy.

Three steps, so that neither DNS nor the cryptography holds up the event loop:

1. on the loop, the header section is parsed for the key names the signatures need
   (``s=`` and ``d=`` of every DKIM-Signature, ARC-Seal and ARC-Message-Signature);
2. on the loop, those keys are looked up at once with the asynchronous resolver;
3. in a bounded thread pool, dkimpy verifies (canonicalisation, body hashes, RSA or Ed25519)
   with a DNS function that answers from step 2.

Results per signature: pass; fail (the signature does not verify); neutral (the signature
cannot be parsed); permerror (no key, or an unusable one); temperror (the key's lookup failed,
or the deadline passed).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from farm.resolver import ERROR, OK, Resolver
from farm.smtp.stages import header_fields

__all__ = ["ARCResult", "SignatureResult", "check_signatures"]

log = logging.getLogger("farm.authentication")

#: Signatures verified per message at most (the rest are not looked at).
MAX_SIGNATURES = 10
#: ARC sets looked at at most (RFC 8617 allows 50 instances).
MAX_ARC_KEYS = 100
_ARC_HEADERS = ("arc-seal", "arc-message-signature")

#: A key whose lookup failed.
_TEMP = object()


@dataclass(frozen=True, slots=True)
class SignatureResult:
    """One DKIM signature's result."""

    result: str
    #: The signing domain (d=) and selector (s=), and the start of the signature (b=).
    domain: str = ""
    selector: str = ""
    b: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ARCResult:
    """The ARC chain's validation: none, pass, fail or temperror."""

    result: str
    #: How many ARC sets the message has.
    instances: int = 0
    reason: str = ""


class _KeyTempError(Exception):
    """A key lookup failed (not a DKIMException, so dkimpy lets it through to us)."""


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    try:
        return parse_tag_value(b" ".join(value.split()))
    except (InvalidTagValueList, ValueError, IndexError):
        return None


def _text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "replace")


def _key_name(tags: dict[bytes, bytes]) -> str | None:
    selector, domain = tags.get(b"s"), tags.get(b"d")
    if not selector or not domain:
        return None
    return f"{_text(selector)}._domainkey.{_text(domain)}".lower().rstrip(".")


@dataclass
class _Plan:
    """What step 1 found: the DKIM signatures (parsed tags or None) and the keys to fetch."""

    signatures: list[dict[bytes, bytes] | None]
    arc_sets: int
    keys: set[str]
    #: Whether the ARC chain is checked at all.
    arc: bool


def _plan(message: bytes, with_dkim: bool, arc: bool) -> _Plan:
    signatures: list[dict[bytes, bytes] | None] = []
    keys: set[str] = set()
    arc_instances: set[bytes] = set()
    arc_keys: set[str] = set()
    for name, value, _start, _end in header_fields(message):
        lowered = name.lower()
        if with_dkim and lowered == "dkim-signature":
            tags = _tags(value)
            signatures.append(tags)
            key = _key_name(tags) if tags else None
            if key and len(signatures) <= MAX_SIGNATURES:
                keys.add(key)
        elif arc and lowered in _ARC_HEADERS:
            tags = _tags(value)
            if tags:
                arc_instances.add(tags.get(b"i", b""))
                key = _key_name(tags)
                if key and len(arc_keys) < MAX_ARC_KEYS:
                    arc_keys.add(key)
    return _Plan(signatures, len(arc_instances), keys | arc_keys, arc)


async def check_signatures(
    message: bytes,
    resolver: Resolver,
    executor: Executor,
    deadline: float,
    *,
    check_dkim: bool = True,
    check_arc: bool = True,
) -> tuple[list[SignatureResult], ARCResult | None]:
    """Verify every DKIM signature (if ``check_dkim``) and the ARC chain (if ``check_arc``)
    of ``message``, by ``deadline`` (the loop's clock)."""
    plan = _plan(message, check_dkim, check_arc)
    if not plan.signatures and not plan.arc_sets:
        return [], ARCResult("none") if check_arc else None
    loop = asyncio.get_running_loop()
    names = sorted(plan.keys)
    lookups = await asyncio.gather(
        *(resolver.query(name, "TXT", deadline, "dkim") for name in names)
    )
    records: dict[str, Any] = {}
    for name, lookup in zip(names, lookups, strict=True):
        if lookup.status == ERROR:
            records[name] = _TEMP
        elif lookup.status == OK:
            records[name] = b"".join(lookup.records[0].strings)
        else:
            records[name] = None
    remaining = deadline - loop.time()
    wall_deadline = time.monotonic() + remaining
    job = loop.run_in_executor(executor, _verify, message, plan, records, wall_deadline)
    try:
        async with asyncio.timeout(max(0.0, remaining)):
            return await asyncio.shield(job)
    except TimeoutError:
        job.cancel()  # if it has not started, it never will
        signatures = [
            _unparsed(tags) if tags is None else _result(tags, "temperror", "timed out")
            for tags in plan.signatures[:MAX_SIGNATURES]
        ]
        arc = ARCResult("temperror", plan.arc_sets, "timed out") if plan.arc_sets else None
        if arc is None and check_arc:
            arc = ARCResult("none")
        return signatures, arc


def _unparsed(tags: dict[bytes, bytes] | None) -> SignatureResult:
    return SignatureResult("neutral", reason="signature syntax error")


def _result(tags: dict[bytes, bytes], result: str, reason: str = "") -> SignatureResult:
    return SignatureResult(
        result,
        _text(tags.get(b"d")).lower(),
        _text(tags.get(b"s")),
        _text(b"".join(tags.get(b"b", b"").split()))[:8],
        reason,
    )


def _dns_function(records: dict[str, Any]) -> Callable[..., bytes | None]:
    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        record = records.get(name.decode("ascii", "replace").lower().rstrip("."), _TEMP)
        if record is _TEMP:
            raise _KeyTempError(name.decode("ascii", "replace"))
        return record  # type: ignore[no-any-return]

    return txt


def _verify(
    message: bytes, plan: _Plan, records: dict[str, Any], deadline: float
) -> tuple[list[SignatureResult], ARCResult | None]:
    """Step 3, in the thread pool: dkimpy's verification with the prefetched keys."""
    txt = _dns_function(records)
    late = time.monotonic() >= deadline
    signatures = []
    verifier = dkim.DKIM(message) if plan.signatures and not late else None
    for index, tags in enumerate(plan.signatures[:MAX_SIGNATURES]):
        if tags is None:
            signatures.append(_unparsed(tags))
        elif late:
            signatures.append(_result(tags, "temperror", "timed out"))
        else:
            signatures.append(_verify_one(verifier, index, tags, records, txt))
    return signatures, _verify_arc(message, plan, txt, late) if plan.arc else None


def _verify_one(
    verifier: Any,
    index: int,
    tags: dict[bytes, bytes],
    records: dict[str, Any],
    txt: Callable[..., bytes | None],
) -> SignatureResult:
    try:
        dkim.validate_signature_fields(tags)
    except dkim.DKIMException as error:
        return _result(tags, "neutral", str(error))
    key_name = _key_name(tags)
    record = records.get(key_name or "")
    if record is _TEMP:
        return _result(tags, "temperror", "key lookup failed")
    if not key_name or record is None:
        return _result(tags, "permerror", "no key")
    try:
        ok = verifier.verify(idx=index, dnsfunc=txt)
    except _KeyTempError:
        return _result(tags, "temperror", "key lookup failed")
    except (dkim.KeyFormatError, dkim.UnknownKeyTypeError, dkim.NaClNotFoundError) as error:
        return _result(tags, "permerror", str(error))
    except dkim.ValidationError as error:  # the fields were valid: a body hash mismatch
        return _result(tags, "fail", re.split(r"[^a-z ]", str(error), maxsplit=1)[0].strip())
    except dkim.DKIMException as error:
        return _result(tags, "neutral", str(error))
    except Exception as error:  # dkimpy on malformed input: never our traceback
        log.debug("DKIM signature %d: %r", index, error)
        return _result(tags, "neutral", type(error).__name__)
    if ok:
        return _result(tags, "pass")
    # dkimpy says False for an unusable key too: that is a permerror, not a fail.
    try:
        dkim.evaluate_pk(key_name.encode(), record)
    except dkim.DKIMException as error:
        return _result(tags, "permerror", f"bad key: {error}")
    except Exception as error:  # an unparsable key record
        return _result(tags, "permerror", f"bad key: {type(error).__name__}")
    return _result(tags, "fail", "signature did not verify")


def _verify_arc(
    message: bytes, plan: _Plan, txt: Callable[..., bytes | None], late: bool
) -> ARCResult:
    if not plan.arc_sets:
        return ARCResult("none")
    if late:
        return ARCResult("temperror", plan.arc_sets, "timed out")
    try:
        cv, _results, comment = dkim.ARC(message).verify(dnsfunc=txt)
    except _KeyTempError:
        return ARCResult("temperror", plan.arc_sets, "key lookup failed")
    except Exception as error:  # dkimpy on malformed input
        return ARCResult("fail", plan.arc_sets, type(error).__name__)
    if cv == dkim.CV_Pass:
        return ARCResult("pass", plan.arc_sets)
    if cv == dkim.CV_None:
        return ARCResult("none", plan.arc_sets)
    return ARCResult("fail", plan.arc_sets, str(comment or ""))

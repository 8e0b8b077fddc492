"""DNS list sites in Postfix postscreen's syntax: ``domain[=filter][*weight]``.

``filter`` is an IPv4 address pattern that the list's A records must match: each octet a number
or a bracketed set of numbers and ``low..high`` ranges separated by ``;``
(``127.0.0.[2..11]``, ``127.0.[0..255].[1;3]``). Without a filter any A record lists the
client. ``weight`` is an integer (default 1 for a block list, -1 for an allow list); a client's
score is the sum of the weights of the lists that list it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Site", "parse_site", "query_name"]

_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_WEIGHT = re.compile(r"-?\d{1,6}")
_NUMBER = re.compile(r"\d{1,3}")


@dataclass(frozen=True, slots=True)
class Site:
    """One list entry."""

    domain: str
    #: Per octet, the values allowed (None: no filter).
    filter: tuple[frozenset[int], ...] | None
    weight: int
    #: The entry as written (normalised): the ``list`` label of the metrics.
    text: str

    def matches(self, addresses: Iterable[str]) -> bool:
        """Whether one of the A records ``addresses`` lists the client."""
        if self.filter is None:
            return any(True for _ in addresses)
        for address in addresses:
            octets = address.split(".")
            if len(octets) == 4 and all(
                octet.isdigit() and int(octet) in allowed
                for octet, allowed in zip(octets, self.filter, strict=True)
            ):
                return True
        return False


def parse_site(text: str, default_weight: int = 1) -> Site:
    """Parse one entry; ValueError says what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected domain[=filter][*weight], got {text!r}")
    entry = text.strip()
    weight = default_weight
    star = entry.rfind("*")
    if star >= 0:
        weight_text = entry[star + 1 :]
        if not _WEIGHT.fullmatch(weight_text):
            raise ValueError(f"{text!r}: the weight after '*' must be an integer")
        weight = int(weight_text)
        entry = entry[:star]
    domain, equals, filter_text = entry.partition("=")
    domain = domain.strip().rstrip(".").lower()
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{text!r}: {domain!r} is not a DNS list domain")
    octets = _parse_filter(text, filter_text) if equals else None
    normalised = domain + (f"={filter_text}" if equals else "")
    return Site(domain, octets, weight, normalised)


def _parse_filter(text: str, pattern: str) -> tuple[frozenset[int], ...]:
    parts = _split_octets(pattern)
    if len(parts) != 4:
        raise ValueError(f"{text!r}: the filter must have four octets, like 127.0.0.[2..11]")
    return tuple(_parse_octet(text, part) for part in parts)


def _split_octets(pattern: str) -> list[str]:
    """Split at the dots outside brackets (``..`` inside brackets is a range)."""
    parts, depth, current = [], 0, ""
    for char in pattern:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "." and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _parse_octet(text: str, part: str) -> frozenset[int]:
    if _NUMBER.fullmatch(part):
        return frozenset({_octet(text, part)})
    if not (part.startswith("[") and part.endswith("]")) or len(part) < 3:
        raise ValueError(f"{text!r}: {part!r} is not a number or a [..] pattern")
    values: set[int] = set()
    for item in part[1:-1].split(";"):
        low, dots, high = item.partition("..")
        if dots:
            first, last = _octet(text, low), _octet(text, high)
            if first > last:
                raise ValueError(f"{text!r}: the range {item!r} is empty")
            values.update(range(first, last + 1))
        else:
            values.add(_octet(text, item))
    return frozenset(values)


def _octet(text: str, value: str) -> int:
    if not _NUMBER.fullmatch(value.strip()) or int(value) > 255:
        raise ValueError(f"{text!r}: {value!r} is not an octet (0..255)")
    return int(value)


def query_name(address: ipaddress.IPv4Address | ipaddress.IPv6Address, domain: str) -> str:
    """The name to look up: the address reversed (IPv4 octets, IPv6 nibbles) under ``domain``."""
    if isinstance(address, ipaddress.IPv4Address):
        reversed_address = ".".join(reversed(str(address).split(".")))
    else:
        reversed_address = ".".join(reversed(address.exploded.replace(":", "")))
    return f"{reversed_address}.{domain}"

"""The PROXY protocol header parser, under its aiosmtpd-style name.

It lives in the engine as :mod:`farm.smtp.proxy_header`; this module re-exports its public
names (``aiosmtpd.proxy_protocol``'s) for code that imports them from here.
"""

from __future__ import annotations

from farm.smtp.proxy_header import (
    AF,
    PROTO,
    V1_MAX_LENGTH,
    V2_CMD,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    AsyncReader,
    MalformedTLV,
    ProxyData,
    ProxyParser,
    ProxyTLV,
    UnknownTypeTLV,
    crc32c,
    get_proxy,
)

__all__ = [
    "AF",
    "PROTO",
    "V1_MAX_LENGTH",
    "V2_CMD",
    "V2_MAX_LENGTH",
    "V2_SIGNATURE",
    "AsyncReader",
    "MalformedTLV",
    "ProxyData",
    "ProxyParser",
    "ProxyTLV",
    "UnknownTypeTLV",
    "crc32c",
    "get_proxy",
]

"""HAProxy PROXY protocol, versions 1 (text) and 2 (binary), as a receiver.

Reference: ``doc/proxy-protocol.txt`` in the HAProxy source tree.

The public names follow ``aiosmtpd.proxy_protocol`` so that ``handle_PROXY`` hooks written for
aiosmtpd keep working: :class:`ProxyData`, :class:`ProxyTLV`, the :class:`AF`, :class:`PROTO`
and :class:`V2_CMD` enums, and :func:`get_proxy`.

The engine itself uses :class:`ProxyParser`, a sans-I/O incremental parser: feed it whatever
bytes arrived; it answers ``None`` until it has decided, then a :class:`ProxyData` (valid, or
invalid with a one-line ``error``). It never consumes a byte past the header: whatever followed
the header (an SMTP command, a TLS ClientHello...) is handed back in ``ProxyData.trailing``.
``rest`` means what it means in aiosmtpd: the undecoded TLV bytes of a v2 header (decoded as
``tlv``), or the text after ``UNKNOWN`` in a v1 header.

Differences from aiosmtpd worth knowing:

* The CRC32C TLV is verified: a header whose checksum does not match is invalid.
* Malformed TLVs make a PROXY-command header invalid instead of silently giving ``tlv=None``.
* A UNIX address is the socket path as bytes, cut at its terminating NUL (an abstract-namespace
  name keeps its leading NUL and loses only the trailing padding), not the 108 raw bytes.

Limits: a v1 line is at most 107 bytes including CRLF (the spec's worst case); a v2 header may
announce at most :data:`V2_MAX_LENGTH` (4096) bytes after its fixed 16-byte part, configurable
per :class:`ProxyParser`. The spec's own sizing target is one 536-byte segment, and the largest
address block (AF_UNIX) is 216 bytes, so 4096 leaves ample room for TLVs while bounding memory.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Protocol

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

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Longest v1 line, CRLF included (``PROXY UNKNOWN`` followed by two full IPv6 addresses and
#: two five-digit ports).
V1_MAX_LENGTH = 107
#: Default bound on the v2 length field (bytes after the fixed 16-byte part).
V2_MAX_LENGTH = 4096
V2_HEADER_LENGTH = 16  # signature (12) + ver/cmd + fam/proto + length (2)
UNIQUE_ID_MAX_LENGTH = 128

_CR = 0x0D
_LF = 0x0A


class V2_CMD(IntEnum):
    """The v2 command (low nibble of the 13th byte)."""

    LOCAL = 0
    PROXY = 1


class AF(IntEnum):
    """Address family. v1 ``UNKNOWN`` maps to ``UNSPEC``."""

    UNSPEC = 0
    INET = 1
    INET6 = 2
    UNIX = 3


class PROTO(IntEnum):
    """Transport protocol. v1 ``TCP4``/``TCP6`` map to ``STREAM``, ``UNKNOWN`` to ``UNSPEC``."""

    UNSPEC = 0
    STREAM = 1
    DGRAM = 2


# Length of the address block each family needs (v2), for the families that carry addresses.
_V2_ADDR_LENGTH = {AF.INET: 12, AF.INET6: 36, AF.UNIX: 216}


class MalformedTLV(RuntimeError):
    """A TLV vector is truncated or has an impossible length."""


class UnknownTypeTLV(KeyError):
    """A TLV type is not registered (raised only by strict parsing)."""


class AsyncReader(Protocol):
    """What :func:`get_proxy` needs from its reader (an ``asyncio.StreamReader`` fits)."""

    async def readexactly(self, n: int) -> bytes: ...


# -- CRC32C (Castagnoli) -------------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # reversed 0x1EDC6F41
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B) of ``data``; pass ``crc`` to continue one."""
    table = _CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- ProxyTLV --------------------------------------------------------------------------------------

_NOT_FOUND = object()


def _same_attribs(get: Any, raises: bool, kwargs: dict[str, Any]) -> bool:
    for name, expected in kwargs.items():
        actual = get(name)
        if actual is _NOT_FOUND:
            if raises:
                raise KeyError(f"notfound:{name}")
            return False
        if actual != expected:
            if raises:
                raise ValueError(f"mismatch:{name} actual={actual!r} expect={expected!r}")
            return False
    return True


class ProxyTLV(dict[str, Any]):
    """The TLV vectors of a v2 header, by name: ``tlv["AUTHORITY"]`` or ``tlv.AUTHORITY``.

    Names are the spec's without their ``PP2_TYPE_``/``PP2_SUBTYPE_`` prefix; values are the raw
    value bytes. An unregistered type ``0xNN`` is named ``"xNN"``. ``PP2_TYPE_SSL`` is
    flattened as aiosmtpd does: ``SSL`` is ``True``, ``SSL_CLIENT`` (int) and ``SSL_VERIFY``
    (int) are its fixed fields, and its sub-TLVs appear at top level (``SSL_VERSION``,
    ``SSL_CN``, ``SSL_CIPHER``, ``SSL_SIG_ALG``, ``SSL_KEY_ALG``). If a type repeats, the last
    one wins. Attribute access to an absent name gives ``None``.

    ``tlv_loc`` maps each name to the offset of its vector from the start of the TLV area.
    """

    __slots__ = ("tlv_loc",)

    PP2_TYPENAME: dict[int, str] = {
        0x01: "ALPN",
        0x02: "AUTHORITY",
        0x03: "CRC32C",
        0x04: "NOOP",
        0x05: "UNIQUE_ID",
        0x20: "SSL",
        0x21: "SSL_VERSION",
        0x22: "SSL_CN",
        0x23: "SSL_CIPHER",
        0x24: "SSL_SIG_ALG",
        0x25: "SSL_KEY_ALG",
        0x30: "NETNS",
    }

    def __init__(self, *args: Any, _tlv_loc: dict[str, int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tlv_loc: dict[str, int] = {} if _tlv_loc is None else _tlv_loc

    def __getattr__(self, item: str) -> Any:
        if item.startswith("_"):  # keep copy/pickle protocols (``__deepcopy__``...) working
            raise AttributeError(item)
        return self.get(item)

    def same_attribs(self, _raises: bool = False, **kwargs: Any) -> bool:
        """Whether every ``name=value`` given is present with that value."""
        return _same_attribs(lambda k: self.get(k, _NOT_FOUND), _raises, kwargs)

    @classmethod
    def parse(
        cls, data: bytes | bytearray, partial_ok: bool = True, strict: bool = False
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """Decode TLV vectors into ``(values, tlv_loc)``.

        :param partial_ok: on a malformed vector, return what was decoded before it instead of
            raising :class:`MalformedTLV`.
        :param strict: raise :class:`UnknownTypeTLV` on an unregistered type.
        """
        values: dict[str, Any] = {}
        locs: dict[str, int] = {}
        try:
            _parse_tlvs(bytes(data), 0, values, locs, [], strict)
        except MalformedTLV:
            if not partial_ok:
                raise
        return values, locs

    @classmethod
    def from_raw(cls, raw: bytes | bytearray, strict: bool = False) -> ProxyTLV | None:
        """A ProxyTLV of ``raw``; ``None`` if ``raw`` is empty or malformed."""
        if not raw:
            return None
        try:
            values, locs = cls.parse(raw, partial_ok=False, strict=strict)
        except MalformedTLV:
            return None
        return cls(values, _tlv_loc=locs)

    @classmethod
    def name_to_num(cls, name: str) -> int | None:
        """The numeric type of a TLV name, or ``None``."""
        for num, typename in cls.PP2_TYPENAME.items():
            if typename == name:
                return num
        return None


def _parse_tlvs(
    data: bytes,
    base: int,
    values: dict[str, Any],
    locs: dict[str, int],
    crc_offsets: list[int],
    strict: bool = False,
) -> None:
    """Decode ``data`` (TLVs starting ``base`` bytes into the TLV area) into ``values``/``locs``.

    Appends to ``crc_offsets`` the offset, within the TLV area, of each CRC32C *value*.
    Raises :class:`MalformedTLV` with a one-line reason.
    """
    i = 0
    end = len(data)
    while i < end:
        if end - i < 3:
            raise MalformedTLV(f"truncated TLV header at TLV offset {base + i}")
        typ = data[i]
        length = int.from_bytes(data[i + 1 : i + 3], "big")
        if i + 3 + length > end:
            raise MalformedTLV(
                f"TLV 0x{typ:02X} at TLV offset {base + i} declares {length} bytes"
                f" but only {end - i - 3} remain"
            )
        value = data[i + 3 : i + 3 + length]
        name = ProxyTLV.PP2_TYPENAME.get(typ)
        if name is None:
            name = f"x{typ:02X}"
            if strict:
                raise UnknownTypeTLV(name)
        locs[name] = base + i
        if name == "SSL":
            if length < 5:
                raise MalformedTLV(f"SSL TLV value is {length} bytes, at least 5 required")
            values["SSL_CLIENT"] = value[0]
            values["SSL_VERIFY"] = int.from_bytes(value[1:5], "big")
            try:
                _parse_tlvs(value[5:], base + i + 8, values, locs, crc_offsets, strict)
            except MalformedTLV:
                values["SSL"] = False  # what decoded before the fault stays (partial_ok)
                raise
            values["SSL"] = True
        else:
            if name == "CRC32C":
                if length != 4:
                    raise MalformedTLV(f"CRC32C TLV value is {length} bytes, 4 required")
                if crc_offsets:
                    raise MalformedTLV("more than one CRC32C TLV")
                crc_offsets.append(base + i + 3)
            elif name == "UNIQUE_ID" and length > UNIQUE_ID_MAX_LENGTH:
                raise MalformedTLV(
                    f"UNIQUE_ID TLV value is {length} bytes, at most {UNIQUE_ID_MAX_LENGTH} allowed"
                )
            values[name] = value
        i += 3 + length


# -- ProxyData -------------------------------------------------------------------------------------

EndpointAddress = IPv4Address | IPv6Address | bytes


@dataclass(eq=True)
class ProxyData:
    """A parsed PROXY header.

    ``version`` is 1 or 2 once the signature was recognised (even if the header turned out
    invalid), ``None`` if it never was. ``command`` is set for v2 only. ``src_addr``/``dst_addr``
    are ``IPv4Address``/``IPv6Address`` (or the socket path bytes for ``AF.UNIX``), and ports
    are ints, when the header carries them. ``rest`` is the undecoded TLV bytes (v2) or what
    followed ``UNKNOWN`` (v1); ``tlv`` the decoded TLVs (``None`` if none or malformed).
    ``whole_raw`` is the header itself (for an invalid one: the bytes up to where it was
    rejected); ``tlv_start`` the offset of the first TLV in ``whole_raw``, ``None`` if none.
    ``error`` is empty when the header is valid. ``trailing`` is the bytes that followed the
    header (farm's addition: the parser never consumes them).
    """

    version: int | None = None
    command: V2_CMD | None = None
    family: AF | None = None
    protocol: PROTO | None = None
    src_addr: EndpointAddress | None = None
    dst_addr: EndpointAddress | None = None
    src_port: int | None = None
    dst_port: int | None = None
    rest: bytes = b""
    whole_raw: bytearray = field(default_factory=bytearray)
    tlv_start: int | None = None
    error: str = ""
    trailing: bytes = b""
    _tlv: ProxyTLV | None = field(default=None, repr=False, compare=False)

    @property
    def tlv(self) -> ProxyTLV | None:
        """The TLVs of ``rest``, decoded once; ``None`` if there are none or they are malformed."""
        if self._tlv is None and self.rest:
            self._tlv = ProxyTLV.from_raw(self.rest)
        return self._tlv

    @property
    def valid(self) -> bool:
        return not self.error and self.version is not None and self.protocol is not None

    def with_error(self, error_msg: str) -> ProxyData:
        """Set ``error`` and return self."""
        self.error = error_msg
        return self

    def same_attribs(self, _raises: bool = False, **kwargs: Any) -> bool:
        """Whether every attribute ``name=value`` given exists with that value."""
        return _same_attribs(lambda k: getattr(self, k, _NOT_FOUND), _raises, kwargs)

    def __bool__(self) -> bool:
        return self.valid


# -- the incremental parser ------------------------------------------------------------------------


class ProxyParser:
    """Sans-I/O, incremental PROXY header parser (v1 and v2 on the same listener).

    :meth:`feed` accepts the header split anywhere, down to one byte at a time, and returns
    ``None`` until it has decided. It decides as early as the bytes allow (a first byte that
    starts neither signature, a bad v2 version/command/family, a v2 length over
    ``max_v2_length`` or too short for the family, a v1 line with no CRLF within 107 bytes...)
    and never consumes past the header: the bytes after the decision point are the result's
    ``trailing``. Feeding more after the decision appends to that same result's ``trailing``.
    Malformed input never raises.
    """

    def __init__(self, *, max_v2_length: int = V2_MAX_LENGTH) -> None:
        if not 0 <= max_v2_length <= 0xFFFF:
            raise ValueError("max_v2_length must be within 0..65535")
        self.max_v2_length = max_v2_length
        self._buf = bytearray()
        self._scan = len(V1_SIGNATURE)  # where the v1 CRLF search resumes
        self._result: ProxyData | None = None

    @property
    def result(self) -> ProxyData | None:
        """The decision, once made."""
        return self._result

    @property
    def needed(self) -> int:
        """How many more bytes can be read without going past a decision point (0 once decided).

        Lets a stream reader use ``readexactly(parser.needed)`` and never read past the header.
        """
        if self._result is not None:
            return 0
        n = len(self._buf)
        if n < 14 or self._buf[:1] == b"P":
            return 1
        if n < V2_HEADER_LENGTH:
            return V2_HEADER_LENGTH - n
        return V2_HEADER_LENGTH + int.from_bytes(self._buf[14:16], "big") - n

    def feed(self, data: bytes | bytearray | memoryview) -> ProxyData | None:
        """Add received bytes; the result once decided, else ``None``."""
        if self._result is not None:
            if data:
                self._result.trailing += bytes(data)
            return self._result
        self._buf += data
        decided = self._examine()
        if decided is None:
            return None
        result, end = decided
        result.whole_raw = bytearray(self._buf[:end])
        result.trailing = bytes(self._buf[end:])
        self._buf = bytearray()
        self._result = result
        return result

    # Each examiner returns None (undecided) or (result, header_end). A decision at byte offset
    # k depends only on buf[:k], so splitting the input differently cannot change the outcome.

    def _examine(self) -> tuple[ProxyData, int] | None:
        buf = self._buf
        n = len(buf)
        if n == 0:
            return None
        if buf[: len(V1_SIGNATURE)] == V1_SIGNATURE[:n]:
            return self._examine_v1() if n >= len(V1_SIGNATURE) else None
        if buf[: len(V2_SIGNATURE)] == V2_SIGNATURE[:n]:
            return self._examine_v2() if n >= len(V2_SIGNATURE) else None
        # Neither signature: reject at the first byte that rules both out (within 12 bytes).
        k = 1
        while V1_SIGNATURE.startswith(buf[:k]) or V2_SIGNATURE.startswith(buf[:k]):
            k += 1
        seen = bytes(buf[:k])
        return (
            ProxyData(version=None).with_error(
                f"not a PROXY protocol header: unexpected byte 0x{buf[k - 1]:02X} at offset"
                f" {k - 1} (received {seen!r})"
            ),
            k,
        )

    def _examine_v1(self) -> tuple[ProxyData, int] | None:
        buf = self._buf
        n = len(buf)
        limit = min(n, V1_MAX_LENGTH)
        i = self._scan
        while i < limit:
            byte = buf[i]
            if buf[i - 1] == _CR:
                if byte == _LF:
                    return _parse_v1(bytes(buf[: i - 1])), i + 1
                return _v1_error(f"bare CR at offset {i - 1} (CR must be followed by LF)"), i + 1
            if byte == _LF:
                return _v1_error(f"bare LF at offset {i} (lines end with CRLF)"), i + 1
            i += 1
        self._scan = i
        if n >= V1_MAX_LENGTH:
            return _v1_error(f"no CRLF within the first {V1_MAX_LENGTH} bytes"), V1_MAX_LENGTH
        return None

    def _examine_v2(self) -> tuple[ProxyData, int] | None:
        buf = self._buf
        n = len(buf)
        pd = ProxyData(version=2)
        if n < 13:
            return None
        ver_cmd = buf[12]
        if ver_cmd >> 4 != 2:
            return pd.with_error(f"PROXYv2 unsupported version {ver_cmd >> 4} (must be 2)"), 13
        if ver_cmd & 0x0F not in (V2_CMD.LOCAL, V2_CMD.PROXY):
            return pd.with_error(f"PROXYv2 unsupported command 0x{ver_cmd & 0x0F:X}"), 13
        pd.command = V2_CMD(ver_cmd & 0x0F)
        if n < 14:
            return None
        fam_proto = buf[13]
        if fam_proto >> 4 > AF.UNIX:
            return pd.with_error(f"PROXYv2 unsupported address family 0x{fam_proto >> 4:X}"), 14
        if fam_proto & 0x0F > PROTO.DGRAM:
            return pd.with_error(f"PROXYv2 unsupported protocol 0x{fam_proto & 0x0F:X}"), 14
        pd.family = AF(fam_proto >> 4)
        pd.protocol = PROTO(fam_proto & 0x0F)
        if n < V2_HEADER_LENGTH:
            return None
        length = int.from_bytes(buf[14:16], "big")
        if length > self.max_v2_length:
            return (
                pd.with_error(
                    f"PROXYv2 length {length} exceeds the limit of {self.max_v2_length} bytes"
                ),
                V2_HEADER_LENGTH,
            )
        addr_length = _V2_ADDR_LENGTH.get(pd.family, 0) if pd.protocol != PROTO.UNSPEC else 0
        if pd.command == V2_CMD.PROXY and length < addr_length:
            return (
                pd.with_error(
                    f"PROXYv2 address block is {length} bytes, {pd.family.name} needs {addr_length}"
                ),
                V2_HEADER_LENGTH,
            )
        end = V2_HEADER_LENGTH + length
        if n < end:
            return None
        _parse_v2_body(pd, bytes(buf[:end]), addr_length)
        return pd, end


# -- v1 --------------------------------------------------------------------------------------------

_V4_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_V1_IPV4 = re.compile(rb"%s(?:\.%s){3}" % (_V4_OCTET, _V4_OCTET))
# Hex groups and colons; dots for the IPv4-suffixed forms inet_ntop() produces (::ffff:a.b.c.d).
_V1_IPV6_CHARS = re.compile(rb"[0-9A-Fa-f:.]{2,45}")
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


def _v1_error(message: str) -> ProxyData:
    return ProxyData(version=1).with_error(f"PROXYv1 {message}")


def _parse_v1(line: bytes) -> ProxyData:
    """Decode a complete v1 line (without its CRLF; it starts with ``PROXY ``)."""
    pd = ProxyData(version=1)
    fields = line.split(b" ")  # single spaces only: a double space yields an empty field
    proto = fields[1]
    if proto == b"UNKNOWN":  # the receiver must ignore whatever follows
        pd.family = AF.UNSPEC
        pd.protocol = PROTO.UNSPEC
        pd.rest = line[len(b"PROXY UNKNOWN") :]
        return pd
    if proto == b"TCP4":
        family = AF.INET
    elif proto == b"TCP6":
        family = AF.INET6
    else:
        return pd.with_error(f"PROXYv1 unsupported protocol {proto!r} (TCP4, TCP6 or UNKNOWN)")
    pd.family = family
    if len(fields) != 6:
        return pd.with_error(
            f"PROXYv1 {proto.decode()} line has {len(fields)} space-separated fields, 6 required"
        )
    try:
        pd.src_addr = _v1_address(family, fields[2], "source")
        pd.dst_addr = _v1_address(family, fields[3], "destination")
        pd.src_port = _v1_port(fields[4], "source")
        pd.dst_port = _v1_port(fields[5], "destination")
    except ValueError as exc:
        return pd.with_error(f"PROXYv1 {exc}")
    pd.protocol = PROTO.STREAM
    return pd


def _v1_address(family: AF, text: bytes, which: str) -> IPv4Address | IPv6Address:
    if family == AF.INET:
        if _V1_IPV4.fullmatch(text):
            return IPv4Address(text.decode("ascii"))
        raise ValueError(f"{which} address {text!r} is not a canonical IPv4 address")
    if _V1_IPV6_CHARS.fullmatch(text):
        try:
            return IPv6Address(text.decode("ascii"))
        except ValueError:
            pass
    raise ValueError(f"{which} address {text!r} is not a valid IPv6 address")


def _v1_port(text: bytes, which: str) -> int:
    if _V1_PORT.fullmatch(text) and int(text) <= 0xFFFF:
        return int(text)
    raise ValueError(f"{which} port {text!r} is not a decimal 0..65535 without leading zeros")


# -- v2 --------------------------------------------------------------------------------------------


def _unix_path(raw: bytes) -> bytes:
    if raw[:1] == b"\x00":  # Linux abstract namespace: the leading NUL is part of the name
        return raw.rstrip(b"\x00")
    return raw.split(b"\x00", 1)[0]


def _parse_v2_body(pd: ProxyData, header: bytes, addr_length: int) -> None:
    """Fill ``pd`` from a complete v2 header whose fixed part was already checked."""
    block = header[V2_HEADER_LENGTH:]
    strict = pd.command == V2_CMD.PROXY
    if addr_length:
        if len(block) < addr_length:  # LOCAL only (PROXY was rejected earlier): ignore it
            return
        addrs = block[:addr_length]
        if pd.family == AF.UNIX:
            pd.src_addr = _unix_path(addrs[:108])
            pd.dst_addr = _unix_path(addrs[108:])
        else:
            size = 4 if pd.family == AF.INET else 16
            kind = IPv4Address if pd.family == AF.INET else IPv6Address
            pd.src_addr = kind(addrs[:size])
            pd.dst_addr = kind(addrs[size : 2 * size])
            pd.src_port = int.from_bytes(addrs[2 * size : 2 * size + 2], "big")
            pd.dst_port = int.from_bytes(addrs[2 * size + 2 :], "big")
    elif pd.family != AF.UNSPEC or pd.protocol != PROTO.UNSPEC:
        # A mixed combination such as INET/UNSPEC: the block's layout is not defined, so it is
        # neither addresses nor TLVs we could trust; the spec says to ignore it.
        return
    tlv_area = block[addr_length:]
    if not tlv_area:
        return
    values: dict[str, Any] = {}
    locs: dict[str, int] = {}
    crc_offsets: list[int] = []
    try:
        _parse_tlvs(tlv_area, 0, values, locs, crc_offsets)
    except MalformedTLV as exc:
        if strict:
            pd.with_error(f"PROXYv2 malformed TLV: {exc}")
        # LOCAL (the receiver must accept it) and UNSPEC (address information to be ignored)
        # keep a valid result without TLVs.
        return
    tlv_start = V2_HEADER_LENGTH + addr_length
    pd.tlv_start = tlv_start
    pd.rest = bytes(tlv_area)
    pd._tlv = ProxyTLV(values, _tlv_loc=locs)
    for offset in crc_offsets:
        at = tlv_start + offset
        zeroed = header[:at] + b"\x00\x00\x00\x00" + header[at + 4 :]
        computed = crc32c(zeroed)
        received = int.from_bytes(header[at : at + 4], "big")
        if computed != received:
            pd.with_error(
                f"PROXYv2 CRC32C mismatch: header says 0x{received:08X}, computed 0x{computed:08X}"
            )


# -- aiosmtpd-style reader entry point -------------------------------------------------------------


async def get_proxy(reader: AsyncReader) -> ProxyData:
    """Read one PROXY header from ``reader`` (aiosmtpd's entry point).

    Reads with ``readexactly`` only as many bytes as the header can still need, so nothing
    after the header is consumed (``trailing`` is always empty). Never raises for bad input or a
    lost connection: the result is then invalid with ``error`` set. Timeouts are the caller's.
    """
    parser = ProxyParser()
    try:
        while True:
            result = parser.feed(await reader.readexactly(parser.needed))
            if result is not None:
                return result
    except asyncio.IncompleteReadError as exc:
        got = len(exc.partial)
        return ProxyData(version=None).with_error(
            f"PROXY connection closed before the header was complete ({got} of"
            f" {exc.expected} bytes of the last read)"
        )
    except Exception as exc:  # parity with aiosmtpd: report, never propagate
        return ProxyData(version=None).with_error(f"PROXY read failed: {exc!r}")

"""The Sendmail 8 milter protocol (version 6), MTA side, without I/O.

Every packet is a 4-byte big-endian length (counting the code byte), a one-byte code and data;
strings are NUL-terminated. The MTA sends commands (``SMFIC_*``), the milter answers with
replies (``SMFIR_*``). Code names and numbers follow Sendmail's ``mfdef.h`` and Postfix's
``milter8.c`` (facts, not code). :class:`PacketReader` splits a byte stream into packets and
:func:`parse_reply` turns one into a :class:`Reply`, refusing anything malformed with
:class:`MilterProtocolError`; the ``encode_*`` functions build commands.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "MAX_PACKET",
    "MilterProtocolError",
    "OptionsReply",
    "PacketReader",
    "Reply",
    "encode",
    "encode_macros",
    "parse_options",
    "parse_reply",
]

VERSION = 6
CHUNK_SIZE = 65535  # body bytes per SMFIC_BODY, as Sendmail and Postfix send them
MAX_PACKET = 16 * 1024 * 1024  # a larger length is a broken or hostile milter

# -- commands (MTA -> milter) -----------------------------------------------------------------
ABORT = b"A"
BODY = b"B"
CONNECT = b"C"
MACRO = b"D"
BODYEOB = b"E"
HELO = b"H"
HEADER = b"L"
MAIL = b"M"
EOH = b"N"
OPTNEG = b"O"
QUIT = b"Q"
RCPT = b"R"
DATA = b"T"

# -- replies (milter -> MTA) ------------------------------------------------------------------
ADDRCPT = b"+"
DELRCPT = b"-"
ADDRCPT_PAR = b"2"
SHUTDOWN = b"4"
ACCEPT = b"a"
REPLBODY = b"b"
CONTINUE = b"c"
DISCARD = b"d"
CHGFROM = b"e"
CONN_FAIL = b"f"
ADDHEADER = b"h"
INSHEADER = b"i"
CHGHEADER = b"m"
PROGRESS = b"p"
QUARANTINE = b"q"
REJECT = b"r"
SKIP = b"s"
TEMPFAIL = b"t"
REPLYCODE = b"y"

# -- actions the milter may take (SMFIF_*) ----------------------------------------------------
F_ADDHDRS = 0x01
F_CHGBODY = 0x02
F_ADDRCPT = 0x04
F_DELRCPT = 0x08
F_CHGHDRS = 0x10
F_QUARANTINE = 0x20
F_CHGFROM = 0x40
F_ADDRCPT_PAR = 0x80
F_SETSYMLIST = 0x100
ALL_ACTIONS = 0x1FF

# -- protocol steps (SMFIP_*) -----------------------------------------------------------------
P_NOCONNECT = 0x1
P_NOHELO = 0x2
P_NOMAIL = 0x4
P_NORCPT = 0x8
P_NOBODY = 0x10
P_NOHDRS = 0x20
P_NOEOH = 0x40
P_NR_HDR = 0x80
P_NOUNKNOWN = 0x100
P_NODATA = 0x200
P_SKIP = 0x400
P_RCPT_REJ = 0x800
P_NR_CONN = 0x1000
P_NR_HELO = 0x2000
P_NR_MAIL = 0x4000
P_NR_RCPT = 0x8000
P_NR_DATA = 0x10000
P_NR_UNKN = 0x20000
P_NR_EOH = 0x40000
P_NR_BODY = 0x80000
P_HDR_LEADSPC = 0x100000
#: What we offer: every v6 step and no-reply flag, skip, leading space; not RCPT_REJ (we never
#: pass on refused recipients).
OFFERED_PROTOCOL = 0x1FFFFF & ~P_RCPT_REJ

#: Macro stages in the option negotiation (SMFIM_*) -> the command whose macros they are.
MACRO_STAGES = {0: CONNECT, 1: HELO, 2: MAIL, 3: RCPT, 4: DATA, 5: BODYEOB, 6: EOH}

#: Reply codes that carry no data.
_EMPTY = {ACCEPT, CONTINUE, DISCARD, CONN_FAIL, PROGRESS, REJECT, SKIP, TEMPFAIL, SHUTDOWN}
#: Reply codes with strings: how many (minimum, maximum), and whether an index comes first.
_STRINGS = {
    ADDRCPT: (1, 1, False),
    DELRCPT: (1, 1, False),
    ADDRCPT_PAR: (1, 2, False),
    CHGFROM: (1, 2, False),
    ADDHEADER: (2, 2, False),
    INSHEADER: (2, 2, True),
    CHGHEADER: (2, 2, True),
    QUARANTINE: (1, 1, False),
    REPLYCODE: (1, 1, False),
}


class MilterProtocolError(Exception):
    """The milter broke the protocol (bad length, unknown code, malformed data)."""


@dataclass(frozen=True)
class Reply:
    """One reply packet: its code, an index (header edits) and its strings (NUL removed)."""

    code: bytes
    strings: tuple[bytes, ...] = ()
    index: int = 0
    data: bytes = b""  # SMFIR_REPLBODY's raw chunk


@dataclass(frozen=True)
class OptionsReply:
    """The milter's SMFIC_OPTNEG answer."""

    version: int
    actions: int
    protocol: int
    #: Macro names per command (from the optional symbol lists).
    macros: Mapping[bytes, tuple[bytes, ...]]


# -- encoding ---------------------------------------------------------------------------------


def encode(code: bytes, *parts: bytes) -> bytes:
    """One packet: length, code, the parts concatenated (strings must bring their NUL)."""
    data = b"".join(parts)
    return struct.pack("!I", len(data) + 1) + code + data


def cstring(value: bytes) -> bytes:
    """``value`` as a C string; a NUL inside would cut it short, so it is refused."""
    if b"\x00" in value:
        raise ValueError("NUL inside a milter string")
    return value + b"\x00"


def encode_options(version: int, actions: int, protocol: int) -> bytes:
    return encode(OPTNEG, struct.pack("!III", version, actions, protocol))


def encode_macros(command: bytes, macros: Iterable[tuple[bytes, bytes]]) -> bytes:
    """SMFIC_MACRO for ``command``: name/value pairs as C strings."""
    return encode(MACRO, command, *(cstring(name) + cstring(value) for name, value in macros))


def encode_connect(hostname: bytes, family: bytes, port: int, address: bytes) -> bytes:
    """SMFIC_CONNECT; ``family`` is ``4``, ``6``, ``L`` (unix) or ``U`` (unknown, no address)."""
    if family == b"U":
        return encode(CONNECT, cstring(hostname), family)
    return encode(CONNECT, cstring(hostname), family, struct.pack("!H", port), cstring(address))


def encode_strings(code: bytes, *strings: bytes) -> bytes:
    return encode(code, *(cstring(s) for s in strings))


# -- decoding ---------------------------------------------------------------------------------


class PacketReader:
    """Split a byte stream into ``(code, data)`` packets."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self._buffer = bytearray()
        self._max = max_packet

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Add ``data``; return every packet now complete (raises on a bad length)."""
        buffer = self._buffer
        buffer += data
        packets = []
        start = 0
        while len(buffer) - start >= 4:
            (length,) = struct.unpack_from("!I", buffer, start)
            if length == 0 or length > self._max:
                raise MilterProtocolError(f"bad packet length {length}")
            if len(buffer) - start - 4 < length:
                break
            body = bytes(buffer[start + 4 : start + 4 + length])
            packets.append((body[:1], body[1:]))
            start += 4 + length
        del buffer[:start]
        return packets

    @property
    def pending(self) -> int:
        """Bytes of an unfinished packet held."""
        return len(self._buffer)


def _split_strings(code: bytes, data: bytes, least: int, most: int) -> tuple[bytes, ...]:
    if not data.endswith(b"\x00"):
        raise MilterProtocolError(f"reply {code!r}: string not NUL-terminated")
    strings = tuple(data[:-1].split(b"\x00"))
    if not least <= len(strings) <= most:
        raise MilterProtocolError(f"reply {code!r}: {len(strings)} strings")
    return strings


def parse_reply(code: bytes, data: bytes) -> Reply:
    """Check one reply packet's data against its code."""
    if code in _EMPTY:
        if data:
            raise MilterProtocolError(f"reply {code!r} carries data")
        return Reply(code)
    if code == REPLBODY:
        return Reply(code, data=data)
    shape = _STRINGS.get(code)
    if shape is None:
        raise MilterProtocolError(f"unknown reply code {code!r}")
    least, most, indexed = shape
    index = 0
    if indexed:
        if len(data) < 4:
            raise MilterProtocolError(f"reply {code!r}: no index")
        (index,) = struct.unpack_from("!I", data)
        data = data[4:]
    return Reply(code, _split_strings(code, data, least, most), index)


def parse_options(code: bytes, data: bytes) -> OptionsReply:
    """The milter's SMFIC_OPTNEG answer: version, actions, steps, optional macro lists."""
    if code != OPTNEG:
        raise MilterProtocolError(f"expected the option negotiation, got {code!r}")
    if len(data) < 12:
        raise MilterProtocolError("short option negotiation")
    version, actions, protocol = struct.unpack_from("!III", data)
    macros: dict[bytes, tuple[bytes, ...]] = {}
    rest = data[12:]
    while rest:
        if len(rest) < 5:
            raise MilterProtocolError("truncated macro list")
        (stage,) = struct.unpack_from("!I", rest)
        end = rest.find(b"\x00", 4)
        if end < 0:
            raise MilterProtocolError("macro list not NUL-terminated")
        command = MACRO_STAGES.get(stage)
        if command is None:
            raise MilterProtocolError(f"unknown macro stage {stage}")
        macros[command] = tuple(rest[4:end].replace(b",", b" ").split())
        rest = rest[end + 1 :]
    return OptionsReply(version, actions, protocol, macros)

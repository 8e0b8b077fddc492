"""Unit tests of the PROXY protocol v1/v2 parser (farm.proxy_protocol): valid headers, every
split of the input giving the same result, early decisions, and malformed input yielding an
invalid ProxyData (never an exception)."""

from __future__ import annotations

import asyncio
import copy
import itertools
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.proxy_protocol import (
    AF,
    PROTO,
    V1_MAX_LENGTH,
    V2_CMD,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    MalformedTLV,
    ProxyData,
    ProxyParser,
    ProxyTLV,
    UnknownTypeTLV,
    crc32c,
    get_proxy,
)

SMTP_TAIL = b"EHLO client.example\r\n"
TLS_TAIL = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


# -- builders --------------------------------------------------------------------------------------


def tlv(typ: int, value: bytes) -> bytes:
    return bytes([typ]) + len(value).to_bytes(2, "big") + value


def ssl_tlv(client: int, verify: int, *subs: bytes) -> bytes:
    return tlv(0x20, bytes([client]) + verify.to_bytes(4, "big") + b"".join(subs))


def v2(block: bytes = b"", *, cmd: int = 0x21, fam: int = 0x11, length: int | None = None) -> bytes:
    size = len(block) if length is None else length
    return V2_SIGNATURE + bytes([cmd, fam]) + size.to_bytes(2, "big") + block


def v2_crc(addresses: bytes, tlvs_before: bytes = b"", tlvs_after: bytes = b"", **kw) -> bytes:
    """A v2 header with a correct CRC32C TLV between ``tlvs_before`` and ``tlvs_after``."""
    unsigned = v2(addresses + tlvs_before + tlv(0x03, b"\0\0\0\0") + tlvs_after, **kw)
    at = len(unsigned) - len(tlvs_after) - 4
    return unsigned[:at] + crc32c(unsigned).to_bytes(4, "big") + unsigned[at + 4 :]


def inet4(src: str = "192.0.2.1", dst: str = "198.51.100.2", sport: int = 56324, dport=25):
    return IPv4Address(src).packed + IPv4Address(dst).packed + struct.pack("!HH", sport, dport)


def inet6(src: str = "2001:db8::1", dst: str = "2001:db8::2", sport: int = 1234, dport=587):
    return IPv6Address(src).packed + IPv6Address(dst).packed + struct.pack("!HH", sport, dport)


def unix(src: bytes, dst: bytes) -> bytes:
    return src.ljust(108, b"\0") + dst.ljust(108, b"\0")


def parse(data: bytes, **kw) -> ProxyData:
    result = ProxyParser(**kw).feed(data)
    assert result is not None, "header should be decided"
    return result


def assert_invalid(result: ProxyData, fragment: str) -> None:
    assert not result.valid
    assert not result
    assert fragment in result.error, result.error
    assert "\n" not in result.error and "\r" not in result.error


# -- CRC32C ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0x00000000),
        (b"123456789", 0xE3069283),
        (bytes(32), 0x8A9136AA),  # RFC 3720 B.4 test vectors
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_crc32c_known_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected


def test_crc32c_can_be_continued() -> None:
    assert crc32c(b"56789", crc32c(b"1234")) == crc32c(b"123456789")


# -- v1, valid -------------------------------------------------------------------------------------


def test_v1_tcp4() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    result = parse(line + SMTP_TAIL)
    assert result.valid and result and result.error == ""
    assert result.same_attribs(
        version=1,
        command=None,
        family=AF.INET,
        protocol=PROTO.STREAM,
        src_addr=IPv4Address("192.168.0.1"),
        dst_addr=IPv4Address("192.168.0.11"),
        src_port=56324,
        dst_port=443,
        trailing=SMTP_TAIL,
        whole_raw=line,
        tlv=None,
        tlv_start=None,
    )


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("2001:db8::1", "2001:db8::2"),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "FFFF:0:0:0:0:0:0:1"),
        ("::1", "::"),
        ("::ffff:192.0.2.1", "64:ff9b::198.51.100.2"),  # inet_ntop's IPv4-suffixed forms
    ],
)
def test_v1_tcp6(src: str, dst: str) -> None:
    line = f"PROXY TCP6 {src} {dst} 0 65535\r\n".encode()
    result = parse(line + TLS_TAIL)
    assert result.valid
    assert result.same_attribs(
        version=1,
        family=AF.INET6,
        protocol=PROTO.STREAM,
        src_addr=IPv6Address(src),
        dst_addr=IPv6Address(dst),
        src_port=0,
        dst_port=65535,
        trailing=TLS_TAIL,
        whole_raw=line,
    )


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN 192.0.2.1 192.0.2.2 1 2\r\n",
        b"PROXY UNKNOWN anything at all, ignored\r\n",
        # The spec's worst case: exactly 107 bytes including CRLF.
        b"PROXY UNKNOWN " + b":".join([b"ffff"] * 8) * 2 + b" 65535 65535\r\n",
    ],
)
def test_v1_unknown(line: bytes) -> None:
    result = parse(line + SMTP_TAIL)
    assert result.valid
    assert result.same_attribs(
        version=1,
        family=AF.UNSPEC,
        protocol=PROTO.UNSPEC,
        src_addr=None,
        dst_addr=None,
        src_port=None,
        trailing=SMTP_TAIL,
        whole_raw=line,
    )


def test_v1_line_of_exactly_107_bytes_is_accepted_and_108_is_not() -> None:
    ok = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(ok) == V1_MAX_LENGTH
    assert parse(ok).valid
    too_long = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15) + b"\r\n"
    result = parse(too_long)
    assert_invalid(result, "no CRLF within the first 107 bytes")
    assert result.version == 1
    assert bytes(result.whole_raw) == too_long[:V1_MAX_LENGTH]
    assert result.trailing == b"\n"


@given(
    src=st.ip_addresses(v=4),
    dst=st.ip_addresses(v=4),
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
)
def test_v1_tcp4_round_trip(src, dst, sport: int, dport: int) -> None:
    result = parse(f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode())
    assert result.same_attribs(src_addr=src, dst_addr=dst, src_port=sport, dst_port=dport)
    assert result.valid


@given(
    src=st.ip_addresses(v=6),
    dst=st.ip_addresses(v=6),
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    exploded=st.booleans(),
)
def test_v1_tcp6_round_trip(src, dst, sport: int, dport: int, exploded: bool) -> None:
    text = (lambda a: a.exploded) if exploded else str
    result = parse(f"PROXY TCP6 {text(src)} {text(dst)} {sport} {dport}\r\n".encode())
    assert result.same_attribs(src_addr=src, dst_addr=dst, src_port=sport, dst_port=dport)
    assert result.valid


# -- v1, malformed ---------------------------------------------------------------------------------

GOOD4 = "192.0.2.1 198.51.100.2"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        # line ending
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n", "bare LF"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\rX", "bare CR"),
        (b"PROXY TCP4 192.0.2.1\r198.51.100.2 1 2\r\n", "bare CR"),
        (b"PROXY UNKNOWN" + b" " * 200, "no CRLF within the first 107 bytes"),
        # protocol / fields
        (b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n", "unsupported protocol b'TCP5'"),
        (b"PROXY tcp4 192.0.2.1 198.51.100.2 1 2\r\n", "unsupported protocol"),
        (b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n", "unsupported protocol"),
        (b"PROXY UNKNOWNX\r\n", "unsupported protocol"),
        (b"PROXY \r\n", "unsupported protocol b''"),
        (b"PROXY  TCP4 192.0.2.1 198.51.100.2 1 2\r\n", "unsupported protocol b''"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n", "5 space-separated fields"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n", "7 space-separated fields"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 \r\n", "7 space-separated fields"),
        (b"PROXY TCP4 192.0.2.1  198.51.100.2 1 2\r\n", "7 space-separated fields"),
        (b"PROXY TCP4\r\n", "2 space-separated fields"),
        # IPv4 addresses
        (b"PROXY TCP4 192.0.2.256 198.51.100.2 1 2\r\n", "source address b'192.0.2.256'"),
        (b"PROXY TCP4 192.0.2.1 198.051.100.2 1 2\r\n", "destination address"),  # leading 0
        (b"PROXY TCP4 00.0.0.0 198.51.100.2 1 2\r\n", "source address"),
        (b"PROXY TCP4 192.0.2 198.51.100.2 1 2\r\n", "not a canonical IPv4"),
        (b"PROXY TCP4 192.0.2.1.5 198.51.100.2 1 2\r\n", "not a canonical IPv4"),
        (b"PROXY TCP4 0x7f.0.0.1 198.51.100.2 1 2\r\n", "not a canonical IPv4"),
        (b"PROXY TCP4 2130706433 198.51.100.2 1 2\r\n", "not a canonical IPv4"),
        (b"PROXY TCP4 ::1 198.51.100.2 1 2\r\n", "not a canonical IPv4"),
        (b"PROXY TCP4 192.0.2.\xd9\xa1 198.51.100.2 1 2\r\n", "not a canonical IPv4"),
        # IPv6 addresses
        (b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n", "source address b'192.0.2.1' is not a valid IPv6"),
        (b"PROXY TCP6 ::1 fe80::1%eth0 1 2\r\n", "destination address"),
        (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "not a valid IPv6"),
        (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "not a valid IPv6"),
        (b"PROXY TCP6 12345::1 ::1 1 2\r\n", "not a valid IPv6"),
        (b"PROXY TCP6 [::1] ::1 1 2\r\n", "not a valid IPv6"),
        (b"PROXY TCP6 ::ffff:1.2.3.04 ::1 1 2\r\n", "not a valid IPv6"),
        # ports
        (f"PROXY TCP4 {GOOD4} 65536 2\r\n".encode(), "source port b'65536'"),
        (f"PROXY TCP4 {GOOD4} 1 99999\r\n".encode(), "destination port b'99999'"),
        (f"PROXY TCP4 {GOOD4} 100000 2\r\n".encode(), "source port"),
        (f"PROXY TCP4 {GOOD4} 025 2\r\n".encode(), "without leading zeros"),
        (f"PROXY TCP4 {GOOD4} 00 2\r\n".encode(), "without leading zeros"),
        (f"PROXY TCP4 {GOOD4} -1 2\r\n".encode(), "source port"),
        (f"PROXY TCP4 {GOOD4} +1 2\r\n".encode(), "source port"),
        (f"PROXY TCP4 {GOOD4} 1a 2\r\n".encode(), "source port"),
        (f"PROXY TCP4 {GOOD4} 1 \u0662\r\n".encode(), "destination port"),
    ],
)
def test_v1_malformed(data: bytes, fragment: str) -> None:
    result = parse(data + SMTP_TAIL)
    assert_invalid(result, fragment)
    assert result.version == 1
    assert result.error.startswith("PROXYv1 ")


def test_v1_bare_lf_is_rejected_at_the_lf() -> None:
    result = parse(b"PROXY UNKNOWN\nEHLO x\r\n")
    assert_invalid(result, "bare LF at offset 13")
    assert bytes(result.whole_raw) == b"PROXY UNKNOWN\n"
    assert result.trailing == b"EHLO x\r\n"


# -- signatures ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b"EHLO example.com\r\n", 0),
        (b"\x16\x03\x01\x00\xa5", 0),  # TLS ClientHello
        (b"GET / HTTP/1.1\r\n", 0),
        (b"proxy TCP4", 0),
        (b"PROXZ", 4),
        (b"PROXYTCP4", 5),
        (b"PROXY\r\n", 5),
        (b"\r\n\r\nQUIT", 4),
        (b"\r\n\r\n\x00\r\nQUIT\r", 11),
        (b"\r\nHELO", 2),
    ],
)
def test_bad_signature_is_rejected_at_the_first_wrong_byte(data: bytes, offset: int) -> None:
    result = parse(data)
    assert_invalid(result, f"at offset {offset}")
    assert result.error.startswith("not a PROXY protocol header")
    assert result.version is None
    assert bytes(result.whole_raw) == data[: offset + 1]
    assert result.trailing == data[offset + 1 :]


def test_first_byte_that_starts_no_signature_is_decided_immediately() -> None:
    for first in range(256):
        result = ProxyParser().feed(bytes([first]))
        if first in (ord("P"), 0x0D):
            assert result is None
        else:
            assert result is not None and not result.valid


# -- v2, valid -------------------------------------------------------------------------------------


def test_v2_local_unspec() -> None:
    header = v2(cmd=0x20, fam=0x00)
    result = parse(header + SMTP_TAIL)
    assert result.valid
    assert result.same_attribs(
        version=2,
        command=V2_CMD.LOCAL,
        family=AF.UNSPEC,
        protocol=PROTO.UNSPEC,
        src_addr=None,
        src_port=None,
        tlv=None,
        tlv_start=None,
        trailing=SMTP_TAIL,
        whole_raw=header,
    )


def test_v2_local_with_addresses_parses_them() -> None:
    result = parse(v2(inet4(), cmd=0x20, fam=0x11))
    assert result.valid and result.command == V2_CMD.LOCAL
    assert result.src_addr == IPv4Address("192.0.2.1")


def test_v2_local_with_short_address_block_is_still_valid() -> None:
    # "The receiver must accept this connection as valid ... and discard the protocol block."
    header = v2(b"\x01\x02\x03", cmd=0x20, fam=0x21)
    result = parse(header + SMTP_TAIL)
    assert result.valid
    assert result.src_addr is None and result.tlv is None
    assert result.trailing == SMTP_TAIL


def test_v2_local_with_malformed_tlvs_is_still_valid() -> None:
    result = parse(v2(inet4() + b"\x01\x00\x09ab", cmd=0x20, fam=0x11))
    assert result.valid and result.tlv is None


@pytest.mark.parametrize("fam", [0x11, 0x12])
def test_v2_proxy_inet(fam: int) -> None:
    header = v2(inet4(sport=40000, dport=25), fam=fam)
    result = parse(header + SMTP_TAIL)
    assert result.valid
    assert result.same_attribs(
        version=2,
        command=V2_CMD.PROXY,
        family=AF.INET,
        protocol=PROTO(fam & 0x0F),
        src_addr=IPv4Address("192.0.2.1"),
        dst_addr=IPv4Address("198.51.100.2"),
        src_port=40000,
        dst_port=25,
        tlv=None,
        tlv_start=None,
        trailing=SMTP_TAIL,
        whole_raw=header,
    )


@pytest.mark.parametrize("fam", [0x21, 0x22])
def test_v2_proxy_inet6(fam: int) -> None:
    result = parse(v2(inet6(), fam=fam) + TLS_TAIL)
    assert result.valid
    assert result.same_attribs(
        family=AF.INET6,
        protocol=PROTO(fam & 0x0F),
        src_addr=IPv6Address("2001:db8::1"),
        dst_addr=IPv6Address("2001:db8::2"),
        src_port=1234,
        dst_port=587,
        trailing=TLS_TAIL,
    )


@pytest.mark.parametrize("fam", [0x31, 0x32])
def test_v2_proxy_unix(fam: int) -> None:
    result = parse(v2(unix(b"/run/client.sock", b"\0abstract-name"), fam=fam))
    assert result.valid
    assert result.same_attribs(
        family=AF.UNIX,
        protocol=PROTO(fam & 0x0F),
        src_addr=b"/run/client.sock",
        dst_addr=b"\0abstract-name",
        src_port=None,
        dst_port=None,
    )


def test_v2_unix_path_is_cut_at_its_terminating_nul() -> None:
    raw = b"/tmp/s\0garbage".ljust(108, b"\xaa") + b"x" * 108
    result = parse(v2(raw, fam=0x31))
    assert result.src_addr == b"/tmp/s"
    assert result.dst_addr == b"x" * 108


def test_v2_proxy_unspec_with_tlvs() -> None:
    result = parse(v2(tlv(0x02, b"mx.example"), cmd=0x21, fam=0x00))
    assert result.valid
    assert result.family == AF.UNSPEC and result.src_addr is None
    assert result.tlv == {"AUTHORITY": b"mx.example"}
    assert result.tlv_start == 16


def test_v2_undefined_family_protocol_mix_is_opaque() -> None:
    # INET with UNSPEC protocol: the block layout is undefined; it is ignored, not parsed.
    result = parse(v2(b"\x01\x00\x50" + b"x" * 9, fam=0x10))
    assert result.valid
    assert result.family == AF.INET and result.protocol == PROTO.UNSPEC
    assert result.src_addr is None and result.tlv is None


def test_v2_tlvs() -> None:
    tlvs = (
        tlv(0x01, b"smtp")
        + tlv(0x02, b"mail.example.com")
        + ssl_tlv(
            0x07,
            0,
            tlv(0x21, b"TLSv1.3"),
            tlv(0x22, b"client.example"),
            tlv(0x23, b"TLS_AES_256_GCM_SHA384"),
            tlv(0x24, b"RSA-SHA256"),
            tlv(0x25, b"RSA2048"),
        )
        + tlv(0x04, b"\0\0\0")
        + tlv(0x05, b"u" * 128)
        + tlv(0x30, b"blue")
        + tlv(0xE1, b"custom")
    )
    header = v2(inet4() + tlvs)
    result = parse(header + SMTP_TAIL)
    assert result.valid, result.error
    assert result.trailing == SMTP_TAIL
    assert result.tlv_start == 16 + 12
    assert bytes(result.whole_raw[result.tlv_start :]) == tlvs
    t = result.tlv
    assert isinstance(t, ProxyTLV)
    assert t.ALPN == b"smtp"
    assert t.AUTHORITY == b"mail.example.com"
    assert t.SSL is True and t.SSL_CLIENT == 0x07 and t.SSL_VERIFY == 0
    assert t.same_attribs(
        SSL_VERSION=b"TLSv1.3",
        SSL_CN=b"client.example",
        SSL_CIPHER=b"TLS_AES_256_GCM_SHA384",
        SSL_SIG_ALG=b"RSA-SHA256",
        SSL_KEY_ALG=b"RSA2048",
        NOOP=b"\0\0\0",
        UNIQUE_ID=b"u" * 128,
        NETNS=b"blue",
        xE1=b"custom",
    )
    assert t["AUTHORITY"] == b"mail.example.com"
    assert t.CRC32C is None  # absent names read as None
    # tlv_loc: offsets from the start of the TLV area, sub-TLVs included
    assert t.tlv_loc["ALPN"] == 0
    assert t.tlv_loc["AUTHORITY"] == 7
    assert t.tlv_loc["SSL"] == 7 + 3 + 16
    assert t.tlv_loc["SSL_VERSION"] == t.tlv_loc["SSL"] + 8
    for name, loc in t.tlv_loc.items():
        raw_type = result.whole_raw[result.tlv_start + loc]
        expected = ProxyTLV.name_to_num(name) or int(name[1:], 16)
        assert raw_type == expected, name


def test_v2_ssl_tlv_without_sub_tlvs() -> None:
    result = parse(v2(inet4() + ssl_tlv(0x00, 1)))
    assert result.valid
    assert result.tlv == {"SSL": True, "SSL_CLIENT": 0, "SSL_VERIFY": 1}


@pytest.mark.parametrize("where", ["first", "middle", "last", "inside-local-unspec"])
def test_v2_crc32c_correct(where: str) -> None:
    a, b = tlv(0x02, b"mx.example"), tlv(0x05, b"id-1")
    header = {
        "first": lambda: v2_crc(inet4(), b"", a + b),
        "middle": lambda: v2_crc(inet6(), a, b, fam=0x21),
        "last": lambda: v2_crc(unix(b"/a", b"/b"), a + b, b"", fam=0x31),
        "inside-local-unspec": lambda: v2_crc(b"", a, b, cmd=0x20, fam=0x00),
    }[where]()
    result = parse(header + SMTP_TAIL)
    assert result.valid, result.error
    assert result.tlv is not None and len(result.tlv.CRC32C) == 4
    assert result.tlv.AUTHORITY == b"mx.example" and result.tlv.UNIQUE_ID == b"id-1"
    assert result.trailing == SMTP_TAIL


def test_v2_crc32c_matches_an_independent_computation() -> None:
    header = v2_crc(inet4(), tlv(0x01, b"h2"))
    result = parse(header)
    at = result.tlv_start + result.tlv.tlv_loc["CRC32C"] + 3  # aiosmtpd's documented recipe
    raw = bytearray(result.whole_raw)
    raw[at : at + 4] = bytes(4)
    assert crc32c(raw).to_bytes(4, "big") == result.tlv.CRC32C


@pytest.mark.parametrize("cmd", [0x20, 0x21])
def test_v2_crc32c_wrong_is_invalid(cmd: int) -> None:
    good = v2_crc(inet4(), tlv(0x02, b"mx.example"), cmd=cmd)
    for i in range(len(good)):
        if good[i : i + 1] == b"\x03" and good[i + 1 : i + 3] == b"\x00\x04":
            at = i + 3
    bad = good[:at] + bytes([good[at] ^ 0x01]) + good[at + 1 :]
    assert_invalid(parse(bad), "CRC32C mismatch")
    # Corrupting any other byte of the TLVs is caught too.
    tampered = bytearray(good)
    tampered[-len(b"mx.example") - 1] ^= 0x20
    assert_invalid(parse(bytes(tampered)), "CRC32C mismatch")


# -- v2, malformed ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "fragment", "decided_at"),
    [
        (v2(inet4(), cmd=0x11), "unsupported version 1", 13),
        (v2(inet4(), cmd=0x31), "unsupported version 3", 13),
        (v2(inet4(), cmd=0x01), "unsupported version 0", 13),
        (v2(inet4(), cmd=0x22), "unsupported command 0x2", 13),
        (v2(inet4(), cmd=0x2F), "unsupported command 0xF", 13),
        (v2(inet4(), fam=0x41), "unsupported address family 0x4", 14),
        (v2(inet4(), fam=0xF1), "unsupported address family 0xF", 14),
        (v2(inet4(), fam=0x13), "unsupported protocol 0x3", 14),
        (v2(inet4(), cmd=0x20, fam=0x1F), "unsupported protocol 0xF", 14),
        (v2(length=V2_MAX_LENGTH + 1), "length 4097 exceeds the limit of 4096", 16),
        (v2(length=0xFFFF), "length 65535 exceeds", 16),
        (v2(inet4()[:11]), "address block is 11 bytes, INET needs 12", 16),
        (v2(b"", fam=0x12), "address block is 0 bytes, INET needs 12", 16),
        (v2(inet6()[:35], fam=0x21), "INET6 needs 36", 16),
        (v2(b"x" * 215, fam=0x31), "UNIX needs 216", 16),
        (v2(b"x" * 100, fam=0x32), "UNIX needs 216", 16),
    ],
)
def test_v2_malformed_fixed_part_is_decided_early(
    header: bytes, fragment: str, decided_at: int
) -> None:
    result = parse(header + SMTP_TAIL)
    assert_invalid(result, fragment)
    assert result.version == 2 and result.error.startswith("PROXYv2 ")
    assert bytes(result.whole_raw) == header[:decided_at]
    assert result.trailing == (header + SMTP_TAIL)[decided_at:]
    # ...without waiting for any byte past the decision point.
    early = ProxyParser().feed(header[:decided_at])
    assert early == ProxyData(**{**result.__dict__, "trailing": b""})


def test_v2_length_limit_is_configurable() -> None:
    header = v2(inet4() + tlv(0x04, bytes(100)))
    assert parse(header).valid
    assert_invalid(parse(header, max_v2_length=100), "exceeds the limit of 100 bytes")
    big = v2(inet4() + tlv(0x04, bytes(60000)))
    assert_invalid(parse(big), "exceeds the limit of 4096")
    assert parse(big, max_v2_length=65535).valid
    with pytest.raises(ValueError):
        ProxyParser(max_v2_length=65536)


@pytest.mark.parametrize(
    ("tlvs", "fragment"),
    [
        (tlv(0x01, b"smtp")[:-1], "TLV 0x01 at TLV offset 0 declares 4 bytes but only 3 remain"),
        (tlv(0x02, b"a") + b"\x05\x00\xff" + b"x" * 10, "TLV 0x05 at TLV offset 4 declares 255"),
        (b"\x01", "truncated TLV header at TLV offset 0"),
        (tlv(0x04, b"") + b"\x01\x00", "truncated TLV header at TLV offset 3"),
        (tlv(0x20, b"\x01\x00\x00"), "SSL TLV value is 3 bytes, at least 5 required"),
        (ssl_tlv(1, 0, tlv(0x21, b"TLSv1.3")[:-2]), "TLV 0x21 at TLV offset 8 declares 7"),
        (ssl_tlv(1, 0, b"\x22"), "truncated TLV header at TLV offset 8"),
        (tlv(0x03, b"\0\0\0"), "CRC32C TLV value is 3 bytes, 4 required"),
        (tlv(0x03, bytes(4)) + tlv(0x03, bytes(4)), "more than one CRC32C TLV"),
        (tlv(0x05, b"u" * 129), "UNIQUE_ID TLV value is 129 bytes, at most 128"),
    ],
)
def test_v2_malformed_tlv_is_invalid(tlvs: bytes, fragment: str) -> None:
    header = v2(inet4() + tlvs)
    result = parse(header + SMTP_TAIL)
    assert_invalid(result, "PROXYv2 malformed TLV: " + fragment)
    assert result.trailing == SMTP_TAIL
    assert bytes(result.whole_raw) == header


def test_v2_truncated_header_stays_undecided() -> None:
    header = v2(inet4() + tlv(0x02, b"mx.example"))
    parser = ProxyParser()
    assert parser.feed(header[:-1]) is None
    assert parser.result is None and parser.needed == 1
    assert parser.feed(header[-1:]).valid


# -- every split gives the same result ------------------------------------------------------------

SPLIT_CASES: list[bytes] = [
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n" + SMTP_TAIL,
    b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.1 1 65535\r\n" + TLS_TAIL,
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN " + b"y" * 91 + b"\r\n" + SMTP_TAIL,
    b"PROXY UNKNOWN " + b"y" * 92 + b"\r\n" + SMTP_TAIL,
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n" + SMTP_TAIL,
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r" + SMTP_TAIL,
    b"PROXY TCP4 192.0.2.256 198.51.100.2 1 2\r\n" + SMTP_TAIL,
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1 025\r\n",
    b"PROXYTCP4",
    b"EHLO x\r\n",
    TLS_TAIL,
    v2(cmd=0x20, fam=0x00) + SMTP_TAIL,
    v2(inet4()) + SMTP_TAIL,
    v2(inet6(), fam=0x22) + TLS_TAIL,
    v2(unix(b"/a", b"/b"), fam=0x31) + SMTP_TAIL,
    v2(inet4() + ssl_tlv(7, 0, tlv(0x21, b"TLSv1.2"), tlv(0x22, b"cn")) + tlv(0x01, b"smtp")),
    v2_crc(inet4(), tlv(0x02, b"mx.example"), tlv(0x05, b"id")) + SMTP_TAIL,
    v2_crc(inet4(), tlv(0x02, b"mx.example"))[:-1] + b"\x00" + SMTP_TAIL,
    v2(inet4(), cmd=0x11) + SMTP_TAIL,
    v2(inet4(), fam=0x41) + SMTP_TAIL,
    v2(length=5000) + b"x" * 40,
    v2(inet4()[:8]) + SMTP_TAIL,
    v2(inet4() + tlv(0x01, b"smtp")[:-1]) + SMTP_TAIL,
]


def feed_in_pieces(data: bytes, cuts: list[int]) -> ProxyData:
    """Feed ``data`` cut at ``cuts``; check the parser says None until it decides."""
    parser = ProxyParser()
    result = None
    bounds = [0, *sorted(set(cuts)), len(data)]
    for start, end in itertools.pairwise(bounds):
        got = parser.feed(data[start:end])
        if result is None:
            result = got
        else:
            assert got is result  # later feeds return the same result, extending rest
    assert result is not None
    assert parser.result is result and parser.needed == 0
    return result


@pytest.mark.parametrize("data", SPLIT_CASES, ids=range(len(SPLIT_CASES)))
def test_every_split_gives_the_same_result(data: bytes) -> None:
    whole = parse(data)
    assert feed_in_pieces(data, list(range(1, len(data)))) == whole  # one byte at a time
    for cut in range(len(data) + 1):
        assert feed_in_pieces(data, [cut]) == whole, cut
    # No prefix shorter than the header decides, and the header alone does.
    header_length = len(whole.whole_raw)
    for n in range(header_length):
        assert ProxyParser().feed(data[:n]) is None
    assert whole.trailing == data[header_length:]


@settings(max_examples=300)
@given(data=st.data())
def test_random_splits_give_the_same_result(data: st.DataObject) -> None:
    raw = data.draw(st.sampled_from(SPLIT_CASES))
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    assert feed_in_pieces(raw, cuts) == parse(raw)


def test_empty_feeds_are_harmless() -> None:
    parser = ProxyParser()
    assert parser.feed(b"") is None
    assert parser.feed(b"PROXY UNKNOWN\r") is None
    assert parser.feed(b"") is None
    result = parser.feed(b"\n")
    assert result.valid and result.trailing == b""
    assert parser.feed(b"") is result and result.trailing == b""
    assert parser.feed(b"QUIT\r\n") is result and result.trailing == b"QUIT\r\n"


# -- never raises ----------------------------------------------------------------------------------


def _check_any(result: ProxyData | None) -> None:
    if result is not None and not result.valid:
        assert result.error and "\n" not in result.error and "\r" not in result.error


@settings(max_examples=500)
@given(
    prefix=st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE]),
    body=st.binary(max_size=300),
)
def test_arbitrary_input_never_raises(prefix: bytes, body: bytes) -> None:
    data = prefix + body
    _check_any(ProxyParser().feed(data))
    parser = ProxyParser()
    for i in range(len(data)):
        _check_any(parser.feed(data[i : i + 1]))


@settings(max_examples=500)
@given(
    ver_cmd=st.integers(0, 255),
    fam=st.integers(0, 255),
    length=st.integers(0, 600),
    block=st.binary(max_size=600),
)
def test_arbitrary_v2_never_raises(ver_cmd: int, fam: int, length: int, block: bytes) -> None:
    result = ProxyParser().feed(v2(block, cmd=ver_cmd, fam=fam, length=length) + SMTP_TAIL)
    _check_any(result)
    if result is not None and result.valid:
        assert result.version == 2 and ver_cmd in (0x20, 0x21)


@settings(max_examples=300)
@given(
    tlvs=st.lists(
        st.tuples(
            st.sampled_from([0x01, 0x02, 0x04, 0x05, 0x20, 0x21, 0x30, 0xE0]),
            st.binary(max_size=40),
        ),
        max_size=6,
    ),
    chop=st.integers(0, 5),
)
def test_arbitrary_tlvs_never_raise(tlvs: list[tuple[int, bytes]], chop: int) -> None:
    area = b"".join(tlv(t, v) for t, v in tlvs)
    area = area[: max(0, len(area) - chop)]
    _check_any(parse(v2(inet4() + area)))
    _check_any(parse(v2(inet4() + area, cmd=0x20)))


# -- get_proxy (aiosmtpd's reader API) ------------------------------------------------------------


def run_get_proxy(data: bytes, eof: bool = True) -> tuple[ProxyData, bytes]:
    async def main() -> tuple[ProxyData, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        result = await get_proxy(reader)
        left = await reader.read() if eof else b""
        return result, left

    return asyncio.run(main())


@pytest.mark.parametrize("data", SPLIT_CASES, ids=range(len(SPLIT_CASES)))
def test_get_proxy_reads_exactly_the_header(data: bytes) -> None:
    expected = parse(data)
    result, left = run_get_proxy(data)
    assert left == expected.trailing  # nothing past the decision point was consumed
    assert result == ProxyData(**{**expected.__dict__, "trailing": b""})


def test_get_proxy_connection_closed_mid_header() -> None:
    result, _ = run_get_proxy(v2(inet4())[:20])
    assert_invalid(result, "connection closed before the header was complete")
    assert result.version is None


def test_get_proxy_reader_error_is_reported_not_raised() -> None:
    class Broken:
        async def readexactly(self, n: int) -> bytes:
            raise ConnectionResetError("peer reset")

    result = asyncio.run(get_proxy(Broken()))
    assert_invalid(result, "ConnectionResetError")


# -- ProxyData / ProxyTLV API ----------------------------------------------------------------------


def test_proxydata_same_attribs() -> None:
    result = parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r\n")
    assert result.same_attribs(version=1, src_port=1)
    assert not result.same_attribs(version=2)
    assert not result.same_attribs(no_such_attribute=None)
    with pytest.raises(KeyError):
        result.same_attribs(_raises=True, no_such_attribute=None)
    with pytest.raises(ValueError):
        result.same_attribs(_raises=True, dst_port=3)


def test_proxydata_validity() -> None:
    assert not ProxyData()
    assert not ProxyData(version=1)  # no protocol decoded
    assert ProxyData(version=1, protocol=PROTO.UNSPEC)
    assert not ProxyData(version=1, protocol=PROTO.STREAM).with_error("boom")


def test_proxytlv_api() -> None:
    raw = tlv(0x02, b"host") + ssl_tlv(1, 0, tlv(0x22, b"cn")) + tlv(0x99, b"?")
    parsed = ProxyTLV.from_raw(raw)
    assert parsed == {
        "AUTHORITY": b"host",
        "SSL": True,
        "SSL_CLIENT": 1,
        "SSL_VERIFY": 0,
        "SSL_CN": b"cn",
        "x99": b"?",
    }
    assert parsed.same_attribs(AUTHORITY=b"host", SSL=True)
    assert not parsed.same_attribs(ALPN=None)
    with pytest.raises(KeyError):
        parsed.same_attribs(_raises=True, ALPN=b"x")
    with pytest.raises(ValueError):
        parsed.same_attribs(_raises=True, AUTHORITY=b"other")
    assert ProxyTLV.from_raw(b"") is None
    assert ProxyTLV.from_raw(raw[:-1]) is None
    assert ProxyTLV.parse(tlv(0x01, b"a") + b"\x02\x00\x09") == ({"ALPN": b"a"}, {"ALPN": 0})
    with pytest.raises(MalformedTLV):
        ProxyTLV.parse(b"\x02\x00\x09", partial_ok=False)
    with pytest.raises(UnknownTypeTLV):
        ProxyTLV.from_raw(raw, strict=True)
    assert ProxyTLV.name_to_num("SSL_CN") == 0x22
    assert ProxyTLV.name_to_num("nope") is None
    clone = copy.deepcopy(parsed)
    assert clone == parsed and clone.tlv_loc == parsed.tlv_loc
    with pytest.raises(AttributeError):
        _ = parsed._private

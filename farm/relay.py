"""``Relay``: the inbound-MX handler. Recipient policy at RCPT, delivery to a next hop at DATA.

Policy (``handle_RCPT``): a recipient is accepted when its domain is one of ``domains`` (exact,
or ``.example.com`` for any subdomain of example.com; case-insensitive, a trailing dot ignored),
or when the session is authenticated, or when the client address is in ``trusted_networks``.
The client address is the PROXY header's source when the session has a valid one (the engine
only lets a PROXY header through from ``proxy_trusted_networks``), else the socket peer. The
classic open-relay probe forms are refused for everyone, trusted or not: the percent hack
(``r%ext@ours``), bang paths (``ext!r``), a quoted local part holding ``@``, ``%`` or ``!``,
an ``@`` in the local part, and IP-literal domains (``r@[192.0.2.1]``) not listed in
``domains``. A refusal is ``550 5.7.1 Relay access denied``. (Source routes, ``<@a:r@b>``,
are stripped by the engine's address parser as RFC 5321 4.1.1.3 asks; what is left, ``r@b``,
goes through the same policy.)

Delivery (``handle_DATA``): one connection to ``next_hop`` per message over asyncio streams
(no thread, no connection reuse): ``EHLO`` (``HELO`` if EHLO is refused; ``LHLO`` with
``lmtp=True``), ``MAIL FROM``, one ``RCPT TO`` per recipient, ``DATA``, with a ``Received:``
header put in front. Stray CR, LF (not part of a CRLF) and NUL in the content are replaced with
a space, so no line end the sender hid in the body reaches the next hop (outbound smuggling
guard). The reply is ``250`` only after the next hop accepted the message for at least one
recipient; recipients it refused are logged. When it refused every recipient, or MAIL, or
the data, its own ``4xx``/``5xx`` is passed on (``421`` becomes ``451``). A next hop that cannot
be reached gives ``451 4.4.1``, one that times out or drops the connection ``451 4.4.2``.
Behind an LMTP front-end (``farm.lmtp.LMTP``) the reply is a list with one entry per
recipient; an LMTP next hop (``lmtp=True``) gives one result per recipient and they are mapped
back. Each attempt logs one line on the ``farm.relay`` logger.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from farm.addresses import parse_address

__all__ = ["RELAY_DENIED", "Relay"]

log = logging.getLogger("farm.relay")

RELAY_DENIED = "550 5.7.1 Relay access denied"
NEXT_HOP_UNAVAILABLE = "451 4.4.1 Next hop unavailable, try again later"
NEXT_HOP_TIMEOUT = "451 4.4.2 Next hop timed out, try again later"
NEXT_HOP_LOST = "451 4.4.2 Connection to next hop lost, try again later"
NO_SMTPUTF8 = "553 5.6.7 Next hop does not support SMTPUTF8"
ACCEPTED = "250 2.0.0 OK: relayed"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Characters allowed in the names and addresses that go into the ``Received:`` header.
_UNSAFE = re.compile(r"[^A-Za-z0-9.:_\[\]-]")
#: Stray CR / LF (not part of a CRLF pair) and NUL.
_STRAY = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")
#: A dot at the start of a line (after the first line), for dot-stuffing.
_LEADING_DOT = re.compile(rb"\r\n\.")
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])?(.*)\Z", re.DOTALL)
#: Reply text we pass on: printable ASCII only.
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_MAX_REPLY_LINES = 100


class _Unavailable(Exception):
    """The next hop could not be reached or refused the session: ``reply`` for the client."""

    def __init__(self, reply: str, detail: str) -> None:
        super().__init__(detail)
        self.reply = reply


class Reply:
    """One reply from the next hop: ``code`` and its text joined into one line."""

    __slots__ = ("code", "lines", "text")

    def __init__(self, code: int, lines: list[str]) -> None:
        self.code = code
        self.lines = lines
        self.text = " ".join(line for line in lines if line)

    @property
    def ok(self) -> bool:
        return 200 <= self.code <= 299

    def passthrough(self) -> str:
        """Our reply to the client for this refusal (``421`` → ``451``, non-4/5xx → 451 4.4.2)."""
        if not 400 <= self.code <= 599:
            return NEXT_HOP_LOST
        code = 451 if self.code == 421 else self.code
        text = self.text or "Requested action not taken"
        return f"{code} {text}"

    def __repr__(self) -> str:
        return f"{self.code} {self.text}"


def _normalise_domain(domain: str) -> str:
    """Lower-case, without a trailing dot, IDNA (ASCII) form when possible."""
    domain = domain.strip().rstrip(".").lower()
    if domain and not domain.isascii():
        with contextlib.suppress(UnicodeError):
            domain = domain.encode("idna").decode("ascii")
    return domain


def _ip_literal(domain: str) -> IPAddress | None:
    """The address of ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``; None if not a valid literal."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    try:
        if inner.lower().startswith("ipv6:"):
            return ipaddress.IPv6Address(inner[5:])
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None


def _split_address(address: str) -> tuple[str, str | None]:
    """``(local part, domain)``; the domain is None when there is no ``@`` outside quotes."""
    in_quotes = escaped = False
    at = -1
    for i, char in enumerate(address):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == "@" and not in_quotes:
            at = i
    if at < 0:
        return address, None
    return address[:at], address[at + 1 :]


def _client_ip(session: Any) -> IPAddress | None:
    """The PROXY header's source address if the session has a valid one, else the peer's."""
    proxy = getattr(session, "proxy_data", None)
    if proxy is not None and getattr(proxy, "valid", False):
        source = getattr(proxy, "src_addr", None)
        if isinstance(source, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return _unmapped(source)
    peer = getattr(session, "peer", None)
    host = peer[0] if isinstance(peer, tuple | list) and peer else peer
    if not isinstance(host, str):
        return None
    try:
        return _unmapped(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return None


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _safe(text: str | None, default: str) -> str:
    """``text`` with anything but ``[A-Za-z0-9.:_[]-]`` replaced, cut to 255 characters."""
    if not text:
        return default
    return _UNSAFE.sub("_", text)[:255] or default


def clean_content(content: bytes) -> bytes:
    """Stray CR/LF and NUL replaced with a space; ends with CRLF (unless empty)."""
    content = _STRAY.sub(b" ", content)
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    return content


def dot_stuff(content: bytes) -> bytes:
    """The DATA payload for ``content`` (CRLF lines): leading dots doubled, ``.`` line added."""
    if content.startswith(b"."):
        content = b"." + content
    return _LEADING_DOT.sub(b"\r\n..", content) + b".\r\n"


class _Client:
    """A minimal SMTP/LMTP client over asyncio streams; every step bounded by ``timeout``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.extensions: set[str] = set()

    async def read_reply(self) -> Reply:
        lines: list[str] = []
        code = 0
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not raw:
                raise ConnectionResetError("next hop closed the connection")
            match = _REPLY_LINE.match(raw.rstrip(b"\r\n"))
            if match is None:
                raise ConnectionError(f"malformed reply {raw[:40]!r}")
            if code and int(match.group(1)) != code:
                raise ConnectionError("reply code changed within a multi-line reply")
            code = int(match.group(1))
            text = match.group(3).decode("utf-8", "replace")
            lines.append(_UNPRINTABLE.sub("?", text).strip())
            if match.group(2) != b"-":
                return Reply(code, lines)
            if len(lines) > _MAX_REPLY_LINES:
                raise ConnectionError("reply too long")

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), self.timeout)

    async def command(self, line: str, *, utf8: bool = False) -> Reply:
        await self.send(line.encode("utf-8" if utf8 else "ascii", "surrogateescape") + b"\r\n")
        return await self.read_reply()

    async def hello(self, name: str, lmtp: bool) -> Reply:
        reply = await self.command(f"{'LHLO' if lmtp else 'EHLO'} {name}")
        if not reply.ok and not lmtp and 500 <= reply.code <= 599:
            return await self.command(f"HELO {name}")
        if reply.ok:
            # The first line is the server's name; the rest start with an extension keyword.
            self.extensions = {line.split(" ", 1)[0].upper() for line in reply.lines[1:] if line}
        return reply

    async def close(self) -> None:
        try:
            if not self.writer.is_closing():
                self.writer.write(b"QUIT\r\n")
                await asyncio.wait_for(self.writer.drain(), min(self.timeout, 1.0))
        except (OSError, TimeoutError):
            pass
        finally:
            self.writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(self.writer.wait_closed(), min(self.timeout, 1.0))


class Relay:
    """Accept mail for ``domains`` (and relay for trusted or authenticated clients) and
    forward every message to ``next_hop`` (``HOST:PORT``; SMTP, or LMTP with ``lmtp=True``).

    ``timeout`` bounds each step with the next hop (connect, each reply, each write);
    ``hostname`` is our name in ``EHLO`` and in the ``Received:`` header (default: the server's
    hostname, else the FQDN of this host).
    """

    def __init__(
        self,
        next_hop: str,
        *,
        domains: Iterable[str],
        trusted_networks: Iterable[str] = (),
        lmtp: bool = False,
        timeout: float = 60.0,
        hostname: str | None = None,
    ) -> None:
        address = parse_address(next_hop)
        if address.kind != "tcp" or not address.port:
            raise ValueError(f"bad next hop {next_hop!r}: expected HOST:PORT")
        self.next_hop = address.text
        self._host = address.host
        self._port = address.port
        if isinstance(domains, str):
            raise TypeError("domains must be a list of domains, not one string")
        self._exact: set[str] = set()
        self._parents: tuple[str, ...] = ()
        self._literals: set[IPAddress] = set()
        parents = []
        for entry in domains:
            domain = _normalise_domain(entry)
            literal = _ip_literal(domain)
            if literal is not None:
                self._literals.add(_unmapped(literal))
            elif domain.startswith(".") and len(domain) > 1:
                parents.append(domain)
            elif domain:
                self._exact.add(domain)
            else:
                raise ValueError(f"bad domain {entry!r}")
        self._parents = tuple(parents)
        self.trusted_networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(net, strict=False) for net in trusted_networks
        )
        self.lmtp = lmtp
        self.timeout = timeout
        self.hostname = hostname

    # -- policy --------------------------------------------------------------------------------

    def is_local_domain(self, domain: str) -> bool:
        """True when ``domain`` is one of ours (an exact entry, or under a ``.parent`` entry)."""
        domain = _normalise_domain(domain)
        literal = _ip_literal(domain)
        if literal is not None:
            return _unmapped(literal) in self._literals
        if domain in self._exact:
            return True
        return any(domain.endswith(parent) for parent in self._parents)

    def is_trusted(self, session: Any) -> bool:
        """True when the session is authenticated or its client is in ``trusted_networks``."""
        if getattr(session, "authenticated", False):
            return True
        ip = _client_ip(session)
        return ip is not None and any(ip in net for net in self.trusted_networks)

    def check_recipient(self, session: Any, address: str) -> str | None:
        """None when ``address`` may be accepted in ``session``; else why not (for the log)."""
        local, domain = _split_address(address)
        if any(ord(char) < 0x20 or char == "\x7f" for char in address):
            return "control character"
        if local.startswith("@"):
            return "source route"
        if "!" in local:
            return "bang path"
        if "%" in local:
            return "percent hack"
        if "@" in local:
            return "@ in local part"
        if domain is None:
            if local.lower() == "postmaster":  # RFC 5321 4.5.1: must be accepted
                return None
            return "no domain"
        if _ip_literal(domain.strip()) is not None or domain.startswith("["):
            return None if self.is_local_domain(domain) else "foreign IP literal"
        if self.is_local_domain(domain):
            return None
        if self.is_trusted(session):
            return None
        return "foreign domain"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        why = self.check_recipient(session, address)
        if why is not None:
            log.info(
                "session=%s relay denied client=%s reason=%s",
                getattr(session, "id", "") or "-",
                _client_ip(session),
                why.replace(" ", "_"),
            )
            return RELAY_DENIED
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, proxy_data: Any) -> bool:
        """Accept a valid PROXY header (the engine has checked ``proxy_trusted_networks``)."""
        return bool(getattr(proxy_data, "valid", False))

    # -- delivery ------------------------------------------------------------------------------

    def received_header(self, server: Any, session: Any, envelope: Any) -> bytes:
        """The ``Received:`` trace header (RFC 5321 4.4) for this message, CRLF-terminated."""
        ip = _client_ip(session)
        if ip is None:
            address = "unknown"
        elif isinstance(ip, ipaddress.IPv6Address):
            address = f"IPv6:{ip}"
        else:
            address = str(ip)
        helo = _safe(getattr(session, "host_name", None), "unknown")
        by = _safe(self._our_name(server), "localhost")
        if _is_lmtp_server(server):
            protocol = "LMTP"
        else:
            protocol = "ESMTP" if getattr(session, "extended_smtp", False) else "SMTP"
            if getattr(session, "ssl", None) is not None:
                protocol += "S"
            if getattr(session, "authenticated", False):
                protocol += "A"
        session_id = _safe(getattr(session, "id", None), "")
        ident = f" id {session_id}" if session_id else ""
        recipients = list(envelope.rcpt_tos)
        for_clause = ""
        if (
            len(recipients) == 1
            and not any(char in recipients[0] for char in "\r\n\x00<>;()\\")
            and recipients[0].isascii()
        ):
            for_clause = f"\r\n\tfor <{recipients[0]}>"
        date = format_datetime(datetime.now(UTC).astimezone())
        header = (
            f"Received: from {helo} ([{address}])\r\n\tby {by} (farm) with {protocol}{ident}"
            f"{for_clause};\r\n\t{date}\r\n"
        )
        return header.encode("ascii", "replace")

    def _our_name(self, server: Any) -> str:
        if self.hostname:
            return self.hostname
        name = getattr(server, "hostname", None)
        return name if isinstance(name, str) and name else socket.getfqdn()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str | list[str]:
        started = time.monotonic()
        content = envelope.original_content
        if content is None:
            content = envelope.content
            if isinstance(content, str):
                content = content.encode("utf-8", "surrogateescape")
        data = self.received_header(server, session, envelope) + clean_content(bytes(content))
        recipients = list(envelope.rcpt_tos)
        error = ""
        try:
            results = await self._deliver(server, envelope, recipients, data)
        except _Unavailable as failure:
            results = [failure.reply] * len(recipients)
            error = str(failure)
        replies = [r if isinstance(r, str) else _result_reply(r) for r in results]
        accepted = [rcpt for rcpt, r in zip(recipients, results, strict=True) if _ok(r)]
        refused = [(rcpt, r) for rcpt, r in zip(recipients, results, strict=True) if not _ok(r)]
        if _is_lmtp_server(server):
            reply: str | list[str] = replies
            outcome = ",".join(sorted({r[:3] for r in replies}))
        else:
            reply = ACCEPTED if accepted else _collapse(replies)
            outcome = reply[:3]
        log.log(
            logging.INFO if accepted else logging.WARNING,
            "session=%s relay next_hop=%s rcpts=%d accepted=%d refused=%d size=%d "
            "outcome=%s duration=%.3fs%s%s",
            getattr(session, "id", "") or "-",
            self.next_hop,
            len(recipients),
            len(accepted),
            len(refused),
            len(data),
            outcome,
            time.monotonic() - started,
            (" refused_rcpts=" + ";".join(f"{a!r}:{r}" for a, r in refused)[:2000])
            if accepted and refused
            else "",
            f" error={error}" if error else "",
        )
        return reply

    async def _deliver(
        self, server: Any, envelope: Any, recipients: list[str], data: bytes
    ) -> list[Reply | str]:
        """One result per recipient: the next hop's ``Reply`` or our reply string."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port), self.timeout
            )
        except TimeoutError as error:
            raise _Unavailable(NEXT_HOP_TIMEOUT, "connect timed out") from error
        except OSError as error:
            raise _Unavailable(NEXT_HOP_UNAVAILABLE, _describe(error)) from error
        client = _Client(reader, writer, self.timeout)
        try:
            return await self._transaction(client, server, envelope, recipients, data)
        except TimeoutError as error:
            raise _Unavailable(NEXT_HOP_TIMEOUT, "timed out") from error
        except (OSError, ConnectionError, ValueError, asyncio.IncompleteReadError) as error:
            # ValueError: StreamReader's line limit (a reply line over 64 KiB).
            raise _Unavailable(NEXT_HOP_LOST, _describe(error)) from error
        finally:
            await client.close()

    async def _transaction(
        self, client: _Client, server: Any, envelope: Any, recipients: list[str], data: bytes
    ) -> list[Reply | str]:
        greeting = await client.read_reply()
        if greeting.code != 220:
            raise _Unavailable(NEXT_HOP_UNAVAILABLE, f"greeting {greeting!r}")
        name = _safe(self._our_name(server), "localhost")
        hello = await client.hello(name, self.lmtp)
        if not hello.ok:
            raise _Unavailable(NEXT_HOP_UNAVAILABLE, f"hello refused {hello!r}")
        mail_from = envelope.mail_from or "<>"
        # An 8-bit address needs SMTPUTF8 towards the next hop even if the client did not ask.
        smtputf8 = bool(getattr(envelope, "smtp_utf8", False)) or not all(
            address.isascii() for address in (mail_from, *recipients)
        )
        params = []
        if smtputf8:
            if "SMTPUTF8" not in client.extensions:
                return [NO_SMTPUTF8] * len(recipients)
            params.append("SMTPUTF8")
        mail_options = [opt.upper() for opt in getattr(envelope, "mail_options", []) or []]
        if "BODY=8BITMIME" in mail_options and "8BITMIME" in client.extensions:
            params.append("BODY=8BITMIME")
        sender = mail_from if mail_from == "<>" else f"<{mail_from}>"
        reply = await client.command(" ".join([f"MAIL FROM:{sender}", *params]), utf8=smtputf8)
        if not reply.ok:
            return [reply] * len(recipients)
        results: list[Reply | str] = []
        for rcpt in recipients:
            results.append(await client.command(f"RCPT TO:<{rcpt}>", utf8=smtputf8))
        accepted = [i for i, result in enumerate(results) if _ok(result)]
        if not accepted:
            return results
        reply = await client.command("DATA")
        if reply.code != 354:
            return [reply if _ok(r) else r for r in results]
        await client.send(dot_stuff(data))
        if self.lmtp:
            for i in accepted:
                results[i] = await client.read_reply()
            return results
        final = await client.read_reply()
        for i in accepted:
            results[i] = final
        return results


def _ok(result: Reply | str) -> bool:
    return result.ok if isinstance(result, Reply) else result.startswith("2")


def _result_reply(result: Reply) -> str:
    return ACCEPTED if result.ok else result.passthrough()


def _collapse(replies: list[str]) -> str:
    """One reply for an SMTP client when nothing was accepted: a temporary refusal wins."""
    for reply in replies:
        if reply.startswith("4"):
            return reply
    return replies[0] if replies else NEXT_HOP_LOST


def _is_lmtp_server(server: Any) -> bool:
    from farm.lmtp import LMTP

    return isinstance(server, LMTP)


def _describe(error: BaseException) -> str:
    """One line about a delivery failure (no traceback)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

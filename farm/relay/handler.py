"""``Relay``: the inbound-MX handler. A 250 is a promise: no message is ever lost.

Policy (``handle_RCPT``, ``farm.relay.policy``): a recipient is accepted when its domain is one
of ``domains`` (exact, or ``.example.com`` for any subdomain; case-insensitive, a trailing dot
ignored), or when the session is authenticated, or when the client address (the PROXY header's
source when the session has a valid one, else the peer) is in ``trusted_networks``. The classic
open-relay probe forms are refused for everyone: the percent hack (``r%ext@ours``), bang paths,
a quoted local part holding ``@``, ``%`` or ``!``, an ``@`` in the local part, and IP-literal
domains not listed in ``domains``. A refusal is ``550 5.7.1 Relay access denied``.
Internationalised domains are compared in their UTS #46 non-transitional A-label form (what
IDNA 2008 software such as libidn2 and Postfix computes), and the recipient goes to the next
hop with its domain in that very form, so the next hop sees the domain that was judged; a
non-ASCII domain that is not a valid IDN gets ``501 5.1.3 Bad recipient address syntax``.

Routes (``farm.relay.routes``): ``routes`` maps a recipient domain (``example.com`` exactly, or
``.example.org`` for anything under it) to a next hop, ``HOST:PORT``, ``smtp:HOST:PORT`` or
``lmtp:HOST:PORT``; other recipients go to ``next_hop`` (LMTP with ``lmtp=True``). One client
transaction goes to one next hop: a recipient routed elsewhere than the transaction's first
accepted one gets ``452 4.5.3`` and the client sends it in a new transaction (RFC 5321
4.5.3.1.10).

Live recipients: at the first recipient that passes the policy the relay takes a connection to
its next hop and sends ``MAIL FROM`` (``SMTPUTF8`` when the client declared it or an address
needs it; ``BODY=8BITMIME`` when the client declared it and the next hop offers it), then
forwards each ``RCPT TO`` and answers the client with the next hop's own verdict: ``250``, or
its ``4xx``/``5xx`` (text made printable; ``421`` becomes ``451``); an unreachable next hop gives
``451 4.4.1``, a timeout ``451 4.4.2``, a TLS failure ``451 4.7.5``. Only recipients the next
hop accepted are in the message. At the end of the data the relay sends the content (with a
``Received:`` header in front; stray CR, LF and NUL replaced with a space so no line end hidden
in the body reaches the next hop) and answers ``250`` only after the next hop's ``250``.

Round trips: a next hop offering ``PIPELINING`` (RFC 2920; after ``STARTTLS``, as offered over
TLS) gets ``MAIL FROM`` and the first ``RCPT TO`` in one write, and both replies are read (a
refused ``MAIL`` is the answer to that recipient, as without pipelining; the ``RCPT``'s own
reply to it is read and dropped, and the connection closed if that reply was a ``2xx``); later
recipients go one by one, live. A next hop offering ``CHUNKING`` (RFC 3030) gets the content as
one ``BDAT <size> LAST`` in the same write as the command (no dot-stuffing; the size is exactly
the bytes sent; a refusal is followed by ``RSET``), else ``DATA``, its ``354``, the dot-stuffed
content. A one-recipient message thus takes 2 round trips with both (4 without). Every reply
read is one we asked for: bytes left over after the last awaited reply are a protocol error, as
are a ``2xx`` to ``DATA`` and a ``1xx``/``3xx`` to the content (the connection is closed, the
client gets ``451``). An LMTP next hop answers per recipient (to ``BDAT ... LAST`` too,
RFC 2033 4.2): unless every recipient was accepted, an SMTP client gets
``451 4.3.0`` for the whole message and sends it again (the recipients that had it may get a
duplicate: logged; loss is not possible). Behind an LMTP front-end (``farm.lmtp.LMTP``) the
reply is one entry per recipient. A client ``RSET``, a new ``MAIL``, ``QUIT``, a disconnect or a
hook timeout ends the next hop's transaction (``RSET`` there and the connection goes back to the
pool; one whose state is unknown is closed).

Connections (``farm.relay.pool``): kept per next hop and reused: at most ``pool_size`` idle,
each for ``pool_idle_timeout`` seconds, at most ``pool_max_messages`` transactions per
connection. At most ``max_connections`` (20; 0: no cap) are open to one next hop at once, per
worker: a recipient that needs one more waits at most ``connection_wait`` seconds (5) for one to
come free, else gets ``451 4.4.5`` (that recipient only). A transaction holds its connection
only once the next hop accepted one of its recipients: after a refusal with none accepted the
connection goes back to the pool (``RSET``), so refused recipients and idle sessions pin no
next-hop process. A reused connection found dead when its ``MAIL`` is sent (closed, reset,
``421``) is dropped and the attempt made once more on a new connection, unseen by the client.
``aclose()`` closes them all (a worker calls it when it stops).

TLS to the next hop (``farm.relay.client``): ``tls = "none"`` | ``"starttls"`` (when offered) |
``"required"`` | ``"implicit"``; ``tls_verify`` checks the certificate and the host name
(``tls_server_name``, default the next hop's host) against the system CAs or ``tls_ca_file``.
A next hop that sends anything after its ``220`` to ``STARTTLS`` before the handshake, or any
reply nobody asked for, is dropped with a temporary failure; replies are bounded in size.

Logging (``farm.relay`` logger): one line per message at the end of its data (session id, next
hop, recipients, accepted, refused, size, outcome, duration), one per transaction whose next hop
failed before the data, one per policy refusal; never a traceback or a secret for a next-hop
failure.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Awaitable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, TypeVar

from farm.lmtp import LMTP
from farm.relay.client import (
    NEXT_HOP_LOST,
    ClientSettings,
    Connection,
    NextHopError,
    ProtocolError,
    Reply,
    failure,
    make_ssl_context,
)
from farm.relay.content import content_chunks, content_size, whole_content
from farm.relay.policy import INVALID_DOMAIN, RecipientPolicy, client_ip
from farm.relay.pool import NextHopBusy, Pool
from farm.relay.routes import Route, RouteTable, judged_address, parse_route
from farm.smtp.body import Body, envelope_body
from farm.smtp.logline import quote

__all__ = ["RELAY_DENIED", "Relay"]

log = logging.getLogger("farm.relay")
_T = TypeVar("_T")

RELAY_DENIED = "550 5.7.1 Relay access denied"
BAD_DOMAIN = "501 5.1.3 Bad recipient address syntax"
OTHER_ROUTE = "452 4.5.3 Too many recipients (this one goes in another transaction)"
NO_SMTPUTF8 = "553 5.6.7 Next hop does not support SMTPUTF8"
UNDECLARED_SMTPUTF8 = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
PARTIAL = "451 4.3.0 Next hop refused some recipients, try again later"
ACCEPTED = "250 2.0.0 OK: relayed"
RCPT_OK = "250 2.1.5 OK"
#: Refused recipients of one transaction kept for its log line (the rest are only counted).
REFUSED_KEPT = 100

#: Characters allowed in the names and addresses that go into the ``Received:`` header.
_UNSAFE = re.compile(r"[^A-Za-z0-9.:_\[\]-]")
#: Characters that keep a recipient out of the header's ``for <...>`` clause.
_NOT_IN_FOR = re.compile(r"[\r\n\x00<>;()\\]")


@functools.lru_cache(maxsize=1024)  # names repeat (our name, the clients' EHLO names)
def _safe(text: str | None, default: str) -> str:
    """``text`` with anything but ``[A-Za-z0-9.:_[]-]`` replaced, cut to 255 characters."""
    if not text:
        return default
    return _UNSAFE.sub("_", text)[:255] or default


@dataclass(eq=False)
class _Transaction:
    """One client transaction's counterpart at the next hop."""

    session: Any
    envelope: Any
    route: Route
    pool: Pool
    connection: Connection | None = None
    smtputf8: bool = False
    #: Recipients asked of the next hop, and those it refused: (address, our reply), the first
    #: ``REFUSED_KEPT`` of them (for the log), and how many.
    asked: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)
    refused_count: int = 0
    #: Set when the next hop cannot be used for the rest of this transaction.
    broken: NextHopError | None = None
    #: The next hop gave its final reply to the data: no RSET needed.
    complete: bool = False
    #: A hook is using the connection; ``orphaned``: the client left meanwhile.
    busy: bool = False
    orphaned: bool = False


class Relay:
    """Accept mail for ``domains`` (and relay for trusted or authenticated clients) and pass it
    on to its next hop: ``routes`` by recipient domain, else ``next_hop``.

    ``timeout`` bounds each step with a next hop (connect, handshake, each reply, each write);
    ``hostname`` is our name in ``EHLO`` and in the ``Received:`` header (default: the server's
    hostname, else the FQDN of this host). Every argument can be given in farm.toml's
    ``[handler_args]``.
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
        routes: Mapping[str, str] | None = None,
        pool_size: int = 10,
        pool_idle_timeout: float = 30.0,
        pool_max_messages: int = 100,
        max_connections: int = 20,
        connection_wait: float = 5.0,
        tls: str = "none",
        tls_verify: bool = True,
        tls_ca_file: str | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        default = parse_route(next_hop, lmtp=lmtp)
        self.next_hop = default.text
        self.routes = RouteTable(default, routes)
        self.policy = RecipientPolicy(domains, trusted_networks)
        self.trusted_networks = self.policy.trusted_networks
        self.lmtp = default.lmtp
        self.timeout = float(timeout)
        self.hostname = hostname
        if pool_size < 0 or pool_max_messages < 1 or pool_idle_timeout < 0:
            raise ValueError("pool_size >= 0, pool_max_messages >= 1, pool_idle_timeout >= 0")
        if max_connections < 0 or connection_wait < 0:
            raise ValueError("max_connections >= 0 (0: no cap), connection_wait >= 0")
        self.pool_size = int(pool_size)
        self.pool_idle_timeout = float(pool_idle_timeout)
        self.pool_max_messages = int(pool_max_messages)
        self.max_connections = int(max_connections)
        self.connection_wait = float(connection_wait)
        tls = str(tls)  # (the client's modules are compiled: they take these types only)
        tls_context = None if tls == "none" else make_ssl_context(bool(tls_verify), tls_ca_file)
        self.settings = ClientSettings(self.timeout, tls, tls_context, tls_server_name)
        self._pools: dict[tuple[Route, asyncio.AbstractEventLoop], Pool] = {}
        self._transactions: dict[int, _Transaction] = {}

    # -- policy --------------------------------------------------------------------------------

    def is_local_domain(self, domain: str) -> bool:
        """True when ``domain`` is one of ours (an exact entry, or under a ``.parent`` entry)."""
        return self.policy.is_local_domain(domain)

    def is_trusted(self, session: Any) -> bool:
        """True when the session is authenticated or its client is in ``trusted_networks``."""
        return self.policy.is_trusted(session)

    def check_recipient(self, session: Any, address: str) -> str | None:
        """None when ``address`` may be accepted in ``session``; else why not (for the log)."""
        return self.policy.check_recipient(session, address)

    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, proxy_data: Any) -> bool:
        """Accept a valid PROXY header (the engine has checked ``proxy_trusted_networks``)."""
        return bool(getattr(proxy_data, "valid", False))

    # -- transaction hooks ---------------------------------------------------------------------

    # MAIL, RSET, QUIT and CLOSE are plain functions: the engine runs them without a task (they
    # wait only when the last transaction at the next hop needs an RSET: then they return it,
    # and the engine runs it in a task). A subclass extending one awaits its result only when
    # that is awaitable (``inspect.isawaitable``): it is usually the reply itself.

    def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str | Awaitable[str]:
        reply = self._end_then(session, "250 OK")
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return reply

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        why = self.check_recipient(session, address)
        if why is not None:
            log.info(
                "session=%s relay denied client=%s reason=%s",
                _session_id(session),
                client_ip(session),
                why.replace(" ", "_"),
            )
            return BAD_DOMAIN if why == INVALID_DOMAIN else RELAY_DENIED
        if not address.isascii() and not getattr(envelope, "smtp_utf8", False):
            return UNDECLARED_SMTPUTF8
        # What goes to the next hop is what was judged: the domain as the policy compared it.
        address = judged_address(address)
        route = self.routes.for_address(address)
        transaction = self._transactions.get(id(session))
        if transaction is not None and (
            transaction.session is not session
            or transaction.envelope is not envelope
            or (transaction.route != route and not envelope.rcpt_tos)
        ):
            # A stale transaction, or nothing accepted on its route yet.
            if (reset := self._end(session)) is not None:
                await reset
            transaction = None
        if transaction is not None and transaction.route != route:
            return OTHER_ROUTE
        if transaction is None:
            transaction = _Transaction(session, envelope, route, self._pool(route, server.loop))
            self._transactions[id(session)] = transaction
        if transaction.broken is not None:
            return transaction.broken.reply
        reply = await self._use(transaction, self._recipient(server, transaction, address))
        if reply is None:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            return RCPT_OK
        # Nothing accepted yet: no connection is held for refused recipients (a harvest, or
        # idle sessions, would pin the next hop's processes); the next RCPT takes one again.
        if (
            not envelope.rcpt_tos
            and transaction.connection is not None
            and (reset := self._finish(transaction)) is not None
        ):
            await self._use(transaction, reset)
        return reply

    def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str | Awaitable[str]:
        return self._end_then(session, "250 OK")

    def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str | Awaitable[str]:
        return self._end_then(session, "221 Bye")

    def handle_CLOSE(self, server: Any, session: Any, envelope: Any) -> Awaitable[None] | None:
        """The client is gone: end the next hop's transaction (unless a hook still uses it)."""
        return self._end(session)

    # -- delivery ------------------------------------------------------------------------------

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str | list[str]:
        started = time.monotonic()
        # Streamed from the body (a spool file past farm.smtp.body's threshold), never whole.
        body = envelope_body(envelope)
        header = self.received_header(server, session, envelope)
        recipients = list(envelope.rcpt_tos)
        transaction = self._transactions.get(id(session))
        if transaction is not None and transaction.envelope is not envelope:
            transaction = None
        results: list[Reply | str]
        error = ""
        if transaction is None or transaction.connection is None:
            lost = (transaction.broken if transaction else None) or NextHopError(
                NEXT_HOP_LOST, "no open transaction at the next hop"
            )
            results, error = [lost.reply] * len(recipients), str(lost)
        else:
            try:
                results = await self._use(
                    transaction, self._data(transaction, recipients, header, body)
                )
            except Exception as exc:  # (the connection is dropped)
                lost = failure(exc)
                results, error = [lost.reply] * len(recipients), str(lost)
        if transaction is not None and (reset := self._end(session, transaction)) is not None:
            await reset
        return self._reply_and_log(
            server,
            session,
            envelope,
            transaction,
            recipients,
            results,
            header,
            body,
            started,
            error,
        )

    async def _data(
        self, transaction: _Transaction, recipients: list[str], header: bytes, body: Body
    ) -> list[Reply | str]:
        """One result per recipient: the next hop's ``Reply`` to ``BDAT <size> LAST`` (when it
        offers ``CHUNKING``) or to the data after ``DATA``."""
        connection = transaction.connection
        assert connection is not None
        # A small message in memory goes in one write (with BDAT: the command too).
        chunking = connection.chunking
        content = whole_content(header, body, stuff=not chunking)
        if chunking:
            if content is not None:
                if connection.write(b"BDAT %d LAST\r\n%b" % (len(content), content)):
                    await connection.drain()
            else:
                size = content_size(header, body)
                await connection.bdat_last(size, content_chunks(header, body, stuff=False))
        else:
            reply = await connection.command("DATA")
            if reply.code != 354:
                if not 400 <= reply.code <= 599:  # (a 2xx would read as delivered)
                    raise ProtocolError(f"unexpected reply to DATA {reply!r}")
                return [reply] * len(recipients)
            if content is not None:
                if connection.write(content):
                    await connection.drain()
            else:
                await connection.send_all(content_chunks(header, body, stuff=True))
        if transaction.route.lmtp:  # one reply per recipient
            count = len(recipients)
            replies = [await connection.read_reply(final=i == count - 1) for i in range(count)]
        else:
            replies = [await connection.read_reply()]
        for reply in replies:
            if not (reply.ok or 400 <= reply.code <= 599):
                raise ProtocolError("unexpected reply to the message content")
        # A refused BDAT may leave the next hop's transaction open (RFC 3030 2): RSET then.
        transaction.complete = not chunking or all(r.ok for r in replies)
        return list(replies) if transaction.route.lmtp else replies * len(recipients)

    def _reply_and_log(
        self,
        server: Any,
        session: Any,
        envelope: Any,
        transaction: _Transaction | None,
        recipients: list[str],
        results: list[Reply | str],
        header: bytes,
        body: Body,
        started: float,
        error: str,
    ) -> str | list[str]:
        n_earlier = transaction.refused_count if transaction is not None else 0
        next_hop = transaction.route.text if transaction is not None else self.next_hop
        if not error and not n_earlier and _all_delivered(results):
            # All delivered: said on the engine's line of this message, not a line of its own.
            envelope.log_note = _delivered_note(next_hop, started)
            if _is_lmtp_server(server):
                return [_client_reply(result) for result in results]
            return ACCEPTED
        replies = [_client_reply(result) for result in results]
        accepted = [rcpt for rcpt, reply in zip(recipients, replies, strict=True) if _ok(reply)]
        refused = [
            (r, reply) for r, reply in zip(recipients, replies, strict=True) if not _ok(reply)
        ]
        note = ""
        if _is_lmtp_server(server):
            reply: str | list[str] = replies
            outcome = ",".join(sorted({r[:3] for r in replies}))
        elif refused and accepted:
            reply, outcome = PARTIAL, PARTIAL[:3]
            note = " note=partial_delivery_resend_may_duplicate"
        else:
            reply = ACCEPTED if accepted else _collapse(replies)
            outcome = reply[:3]
        earlier = transaction.refused if transaction is not None else []
        all_refused = earlier + refused
        log.warning(
            "session=%s relay next_hop=%s rcpts=%d accepted=%d refused=%d size=%d "
            "outcome=%s duration=%.3fs%s%s%s",
            _session_id(session),
            next_hop,
            len(recipients) + n_earlier,
            len(accepted),
            n_earlier + len(refused),
            content_size(header, body),
            outcome,
            time.monotonic() - started,
            note,
            " refused_rcpts=" + quote(";".join(f"<{a}>:{r[:80]}" for a, r in all_refused)[:2000])
            if all_refused and accepted
            else "",
            f" error={quote(error)}" if error else "",
        )
        return reply

    # -- the next hop's transaction ------------------------------------------------------------

    def _pool(self, route: Route, loop: asyncio.AbstractEventLoop) -> Pool:
        """The pool of ``route``'s connections on ``loop`` (the server's: asking asyncio for
        the running loop costs a getpid() system call in Python 3.11)."""
        key = (route, loop)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(
                route,
                self.settings,
                size=self.pool_size,
                idle_timeout=self.pool_idle_timeout,
                max_messages=self.pool_max_messages,
                max_connections=self.max_connections,
                wait=self.connection_wait,
            )
        return pool

    async def _recipient(self, server: Any, transaction: _Transaction, address: str) -> str | None:
        """None when the next hop accepted ``address``; else our reply to the client."""
        reply: Reply | str | None = None
        if transaction.connection is None:
            reply = await self._begin(server, transaction, address)
            if isinstance(reply, str):
                return reply
        connection = transaction.connection
        assert connection is not None
        if reply is None:  # not sent with the MAIL: sent now, on its own
            if not transaction.smtputf8 and not address.isascii():
                return UNDECLARED_SMTPUTF8
            transaction.asked += 1
            try:
                reply = await connection.command(_rcpt(address), utf8=transaction.smtputf8)
            except Exception as exc:
                return self._fail(transaction, failure(exc), "RCPT")
        if reply.ok:
            return None
        transaction.refused_count += 1
        if len(transaction.refused) < REFUSED_KEPT:
            transaction.refused.append((address, reply.passthrough()))
        if reply.code == 421:  # the next hop is closing: nothing more goes through it
            return self._fail(transaction, NextHopError(reply.passthrough(), "421"), "RCPT")
        return reply.passthrough()

    async def _begin(
        self, server: Any, transaction: _Transaction, first: str
    ) -> str | Reply | None:
        """Take a connection and send ``MAIL FROM``, with ``RCPT TO:<first>`` in the same write
        when the next hop offers ``PIPELINING``. Our refusal for the client (the ``MAIL``'s
        when it was refused: the ``RCPT``'s reply to a refused ``MAIL`` is read and dropped);
        else the pipelined ``RCPT``'s reply, or None when ``first`` was not sent yet.

        A reused connection that turns out dead at the ``MAIL`` (closed, reset, ``421``) is
        dropped and the attempt made once more on a new connection: nothing was promised to the
        client yet.
        """
        envelope = transaction.envelope
        mail_from = envelope.mail_from or "<>"
        declared = bool(getattr(envelope, "smtp_utf8", False))
        if not declared and not first.isascii():
            return UNDECLARED_SMTPUTF8  # this recipient only; the transaction is not begun
        # An 8-bit sender needs SMTPUTF8 towards the next hop even if the client did not ask.
        smtputf8 = declared or not mail_from.isascii()
        transaction.smtputf8 = smtputf8
        mail_options = [opt.upper() for opt in getattr(envelope, "mail_options", None) or []]
        sender = mail_from if mail_from == "<>" else f"<{mail_from}>"
        pool = transaction.pool
        name = _safe(self._our_name(server), "localhost")
        for attempt in (1, 2):
            try:
                connection, reused = await pool.acquire(name, fresh=attempt > 1)
            except NextHopBusy as exc:  # this recipient only: a later one may find room
                log.warning(
                    "session=%s relay next_hop=%s stage=connect outcome=451 error=%s",
                    _sid(transaction),
                    transaction.route.text,
                    exc,
                )
                return exc.reply
            except NextHopError as exc:
                return self._fail(transaction, exc, "connect")
            params = []
            if smtputf8:
                if "SMTPUTF8" not in connection.extensions:
                    pool.release(connection)
                    return self._fail(
                        transaction,
                        NextHopError(NO_SMTPUTF8, "no SMTPUTF8 at the next hop"),
                        "MAIL",
                    )
                params.append("SMTPUTF8")
            if "BODY=8BITMIME" in mail_options and "8BITMIME" in connection.extensions:
                params.append("BODY=8BITMIME")
            mail = " ".join([f"MAIL FROM:{sender}", *params])
            pipelined = connection.pipelining
            try:
                if pipelined:
                    reply = await connection.pipeline([mail, _rcpt(first)], utf8=smtputf8)
                else:
                    reply = await connection.command(mail, utf8=smtputf8)
            except asyncio.CancelledError:
                pool.discard(connection)
                raise
            except Exception as exc:
                pool.discard(connection)
                if reused:
                    log.info("session=%s relay reused connection dead: %s", _sid(transaction), exc)
                    continue
                return self._fail(transaction, failure(exc), "MAIL")
            if reply.code == 421:
                pool.discard(connection)
                if reused:
                    log.info("session=%s relay reused connection got 421", _sid(transaction))
                    continue
                return self._fail(transaction, NextHopError(reply.passthrough(), "421"), "MAIL")
            if not reply.ok:
                if pipelined:
                    try:
                        rcpt_reply = await connection.read_reply()
                    except asyncio.CancelledError:
                        pool.discard(connection)
                        raise
                    except Exception as exc:
                        pool.discard(connection)
                        return self._fail(transaction, failure(exc), "MAIL")
                    if rcpt_reply.ok or rcpt_reply.code == 421:
                        # A recipient without a sender, or the next hop closing: not reusable.
                        pool.discard(connection)
                        return reply.passthrough()
                pool.release(connection)  # no transaction was started: clean
                return reply.passthrough()
            connection.transactions += 1
            transaction.connection = connection
            if not pipelined:
                return None
            transaction.asked += 1
            try:
                return await connection.read_reply()
            except Exception as exc:
                return self._fail(transaction, failure(exc), "RCPT")
        return self._fail(transaction, NextHopError(NEXT_HOP_LOST, "retry failed"), "MAIL")

    def _fail(self, transaction: _Transaction, error: NextHopError, stage: str) -> str:
        """The next hop cannot be used for the rest of this transaction: log once, drop it."""
        self._drop(transaction)
        transaction.broken = error
        log.warning(
            "session=%s relay next_hop=%s stage=%s outcome=%s error=%s",
            _sid(transaction),
            transaction.route.text,
            stage,
            error.reply[:3],
            str(error),
        )
        return error.reply

    def _drop(self, transaction: _Transaction) -> None:
        """Close the transaction's connection at once (its state is unknown)."""
        connection, transaction.connection = transaction.connection, None
        if connection is not None:
            transaction.pool.discard(connection)
        if transaction.broken is None:
            transaction.broken = NextHopError(NEXT_HOP_LOST, "transaction abandoned")

    async def _use(self, transaction: _Transaction, work: Awaitable[_T]) -> _T:
        """``work``'s result, the transaction marked in use by a hook meanwhile; on
        cancellation (client gone, hook timeout) or an error its connection is dropped. A
        transaction orphaned meanwhile (the client left) is finished here."""
        transaction.busy = True
        try:
            return await work
        except BaseException:
            self._drop(transaction)
            raise
        finally:
            transaction.busy = False
            if transaction.orphaned and (reset := self._finish(transaction)) is not None:
                await reset

    def _end_then(self, session: Any, reply: str) -> str | Awaitable[str]:
        """End the session's transaction at the next hop, then ``reply``: at once, or once the
        ``RSET`` it takes is done (a coroutine, for a plain hook to return)."""
        reset = self._end(session)
        return reply if reset is None else _then(reset, reply)

    def _end(
        self, session: Any, transaction: _Transaction | None = None
    ) -> Coroutine[Any, Any, None] | None:
        """End the session's transaction at the next hop (if any): None when that is done,
        else the ``RSET`` it takes, to be awaited."""
        current = self._transactions.get(id(session))
        if current is None or (transaction is not None and current is not transaction):
            return None if transaction is None else self._finish(transaction)
        del self._transactions[id(session)]
        if current.busy:
            current.orphaned = True  # the hook using it finishes it
            return None
        return self._finish(current)

    def _finish(self, transaction: _Transaction) -> Coroutine[Any, Any, None] | None:
        """Give the connection back: as it is after a complete transaction (None: done), else
        after ``RSET`` (returned, to be awaited)."""
        transaction.orphaned = False
        connection, transaction.connection = transaction.connection, None
        if connection is None:
            return None
        if transaction.complete:
            transaction.pool.release(connection)
            return None
        return self._reset(transaction.pool, connection)

    async def _reset(self, pool: Pool, connection: Connection) -> None:
        """``RSET`` the connection's unfinished transaction; back to the pool if that worked."""
        try:
            reply = await connection.command("RSET")
        except BaseException as exc:
            pool.discard(connection)
            if not isinstance(exc, Exception):
                raise
            return
        if reply.ok:
            pool.release(connection)
        else:
            pool.discard(connection)

    async def aclose(self) -> None:
        """Close every next-hop connection of this event loop (the handler stays usable)."""
        loop = asyncio.get_running_loop()
        for key, transaction in list(self._transactions.items()):
            if not transaction.busy:
                del self._transactions[key]
                self._drop(transaction)
        for key in [key for key in self._pools if key[1] is loop]:
            await self._pools.pop(key).aclose()

    close = aclose

    # -- trace header --------------------------------------------------------------------------

    def received_header(self, server: Any, session: Any, envelope: Any) -> bytes:
        """The ``Received:`` trace header (RFC 5321 4.4) for this message, CRLF-terminated."""
        ip = client_ip(session)
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
            and _NOT_IN_FOR.search(recipients[0]) is None
            and recipients[0].isascii()
        ):
            for_clause = f"\r\n\tfor <{recipients[0]}>"
        date = _date_now()
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


_date_cache: tuple[int, str] = (0, "")


def _date_now() -> str:
    """The RFC 5322 date of this second, local time (computed once a second: it is slow)."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, format_datetime(datetime.fromtimestamp(now, UTC).astimezone()))
    return _date_cache[1]


async def _then(reset: Coroutine[Any, Any, None], reply: str) -> str:
    """``reply`` once ``reset`` is done (a plain hook's answer when it has to wait)."""
    await reset
    return reply


def _delivered_note(next_hop: str, started: float) -> str:
    """What a delivered message's log line says of the relay (the engine writes the line)."""
    return f"next_hop={next_hop} relay_time={time.monotonic() - started:.3f}s"


def _rcpt(address: str) -> str:
    return f"RCPT TO:<{address}>"


def _ok(reply: str) -> bool:
    return reply.startswith("2")


def _all_delivered(results: list[Reply | str]) -> bool:
    """Whether the next hop accepted the message for every recipient (there is one at least)."""
    for result in results:
        if not (result.ok if type(result) is Reply else _ok(result)):
            return False
    return bool(results)


def _client_reply(result: Reply | str) -> str:
    if isinstance(result, str):
        return result
    return ACCEPTED if result.ok else result.passthrough()


def _collapse(replies: list[str]) -> str:
    """One reply for an SMTP client when nothing was accepted: a temporary refusal wins."""
    for reply in replies:
        if reply.startswith("4"):
            return reply
    return replies[0] if replies else NEXT_HOP_LOST


def _is_lmtp_server(server: Any) -> bool:
    return isinstance(server, LMTP)


def _session_id(session: Any) -> str:
    return getattr(session, "id", "") or "-"


def _sid(transaction: _Transaction) -> str:
    return _session_id(transaction.session)

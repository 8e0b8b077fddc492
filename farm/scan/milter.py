"""A milter client: one message through one milter, as Postfix's MILTER_README describes it.

farm scans after the message is complete, so the whole conversation happens at end of data
on a fresh connection per message (libmilter closes its side after a session anyway): option
negotiation (version 6), then connect, helo, envfrom, envrcpt (each recipient), data, every
header, end of headers, the body in 65535-byte chunks, end of message; each step with the
macros Postfix would send, skipped when the milter opted out, not waited for when it said it
won't reply. At end of message the milter's edits (add/insert/change/delete header, change
from, add/delete recipient, replace body, quarantine) are applied to the scan's
:class:`~farm.scan.verdict.ScanContext` and its final answer becomes a
:class:`~farm.scan.verdict.Verdict`. The verdict is per message: a recipient the milter rejects
refuses the message (after DATA there is no per-recipient answer in SMTP). Reply texts for a
bare reject/tempfail are Postfix's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from farm.scan import milter_codec as mc
from farm.scan.errors import ScanError
from farm.scan.message import HeaderError
from farm.scan.replies import checked_reply
from farm.scan.verdict import ScanContext, Verdict

__all__ = ["MilterClient", "parse_milter_address"]

log = logging.getLogger("farm.scan")

REJECTED = "550 5.7.1 Command rejected"
TEMPFAILED = "451 4.7.1 Service unavailable - try again later"

#: The reply to wait for after each command unless the milter set its no-reply flag.
_NO_REPLY = {
    mc.CONNECT: mc.P_NR_CONN,
    mc.HELO: mc.P_NR_HELO,
    mc.MAIL: mc.P_NR_MAIL,
    mc.RCPT: mc.P_NR_RCPT,
    mc.DATA: mc.P_NR_DATA,
    mc.HEADER: mc.P_NR_HDR,
    mc.EOH: mc.P_NR_EOH,
    mc.BODY: mc.P_NR_BODY,
}
#: The step the milter may opt out of.
_NO_SEND = {
    mc.CONNECT: mc.P_NOCONNECT,
    mc.HELO: mc.P_NOHELO,
    mc.MAIL: mc.P_NOMAIL,
    mc.RCPT: mc.P_NORCPT,
    mc.DATA: mc.P_NODATA,
    mc.HEADER: mc.P_NOHDRS,
    mc.EOH: mc.P_NOEOH,
    mc.BODY: mc.P_NOBODY,
}
#: Step names for the log.
_STEP_NAMES = {
    mc.CONNECT: "CONNECT",
    mc.HELO: "HELO",
    mc.MAIL: "MAIL",
    mc.RCPT: "RCPT",
    mc.DATA: "DATA",
    mc.HEADER: "HEADER",
    mc.EOH: "EOH",
    mc.BODY: "BODY",
    mc.BODYEOB: "EOM",
}
#: The edits at end of message, and the action flag the milter must have negotiated for each.
_EDIT_FLAGS = {
    mc.ADDHEADER: mc.F_ADDHDRS,
    mc.INSHEADER: mc.F_ADDHDRS,
    mc.CHGHEADER: mc.F_CHGHDRS,
    mc.CHGFROM: mc.F_CHGFROM,
    mc.ADDRCPT: mc.F_ADDRCPT,
    mc.ADDRCPT_PAR: mc.F_ADDRCPT_PAR,
    mc.DELRCPT: mc.F_DELRCPT,
    mc.REPLBODY: mc.F_CHGBODY,
    mc.QUARANTINE: mc.F_QUARANTINE,
}


def parse_milter_address(spec: str) -> tuple[str, str, int]:
    """Postfix's ``inet:HOST:PORT`` / ``inet:[IPv6]:PORT`` / ``unix:PATH``.

    Returns ``("inet", host, port)`` or ``("unix", path, 0)``; raises ValueError.
    """
    kind, colon, rest = spec.partition(":")
    if not colon or not rest:
        raise ValueError(f"expected inet:HOST:PORT or unix:PATH, got {spec!r}")
    if kind == "unix":
        return "unix", rest, 0
    if kind != "inet":
        raise ValueError(f"unknown milter transport {kind!r} in {spec!r} (inet: or unix:)")
    host, colon, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected inet:HOST:PORT, got {spec!r}")
    return "inet", host, int(port)


class _Refused(Exception):
    """The milter's verdict ended the conversation before end of message."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.action)
        self.verdict = verdict


class MilterClient:
    """One configured milter (``inet:HOST:PORT`` or ``unix:PATH``)."""

    def __init__(self, spec: str) -> None:
        self.name = spec
        self.kind, self.host, self.port = parse_milter_address(spec)

    async def scan(self, context: ScanContext) -> Verdict:
        """Run the whole conversation for one message; edits go into ``context``."""
        try:
            if self.kind == "unix":
                reader, writer = await asyncio.open_unix_connection(self.host)
            else:
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as error:
            raise ScanError(f"milter {self.name}: {error.strerror or error}") from None
        conversation = _Conversation(self.name, reader, writer, context)
        try:
            return await conversation.run()
        except _Refused as refused:
            return refused.verdict
        except mc.MilterProtocolError as error:
            raise ScanError(f"milter {self.name}: protocol error: {error}") from None
        except (OSError, asyncio.IncompleteReadError) as error:
            raise ScanError(f"milter {self.name}: connection lost ({error})") from None
        finally:
            await conversation.close()

    async def close(self) -> None:
        """Nothing kept between messages."""


class _Conversation:
    """One message's exchange with one milter."""

    def __init__(
        self,
        name: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        context: ScanContext,
    ) -> None:
        self.name = name
        self.reader = reader
        self.writer = writer
        self.context = context
        self.packets = mc.PacketReader()
        self.queued: list[tuple[bytes, bytes]] = []
        self.options = mc.OptionsReply(2, 0, 0, {})

    async def close(self) -> None:
        writer = self.writer
        if not writer.is_closing():
            with contextlib.suppress(OSError):
                writer.write(mc.encode(mc.QUIT))
            writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def _next(self) -> tuple[bytes, bytes]:
        while not self.queued:
            data = await self.reader.read(65536)
            if not data:
                raise mc.MilterProtocolError("connection closed by the milter")
            self.queued.extend(self.packets.feed(data))
        return self.queued.pop(0)

    # -- the steps --------------------------------------------------------------------------

    async def run(self) -> Verdict:
        self.writer.write(mc.encode_options(mc.VERSION, mc.ALL_ACTIONS, mc.OFFERED_PROTOCOL))
        options = mc.parse_options(*await self._next())
        if not 2 <= options.version <= mc.VERSION:
            raise mc.MilterProtocolError(f"unsupported version {options.version}")
        if options.protocol & ~mc.OFFERED_PROTOCOL:
            raise mc.MilterProtocolError(f"steps not offered: {options.protocol:#x}")
        self.options = options
        context = self.context
        address = context.client_address
        if address is None:
            connect = mc.encode_connect(b"unknown", b"U", 0, b"")
        else:
            family = b"6" if ":" in address else b"4"
            name = (context.client_name or "unknown").encode()
            connect = mc.encode_connect(name, family, context.client_port, address.encode())
        await self._step(mc.CONNECT, connect)
        await self._step(mc.HELO, mc.encode_strings(mc.HELO, (context.helo or "").encode()))
        mail = [_angle(context.mail_from), *(o.encode() for o in context.mail_options)]
        await self._step(mc.MAIL, mc.encode_strings(mc.MAIL, *mail))
        for rcpt in context.rcpt_tos:
            await self._step(mc.RCPT, mc.encode_strings(mc.RCPT, _angle(rcpt)), rcpt=rcpt)
        await self._step(mc.DATA, mc.encode(mc.DATA))
        lead_space = bool(options.protocol & mc.P_HDR_LEADSPC)
        for name, value in context.message.headers(lead_space):
            await self._step(mc.HEADER, mc.encode_strings(mc.HEADER, name, value))
        await self._step(mc.EOH, mc.encode(mc.EOH))
        body = context.message.body()
        for start in range(0, len(body), mc.CHUNK_SIZE):
            chunk = body[start : start + mc.CHUNK_SIZE]
            if await self._step(mc.BODY, mc.encode(mc.BODY, chunk)):
                break
        return await self._end_of_message()

    def _macros(self, command: bytes, rcpt: str | None = None) -> list[tuple[bytes, bytes]]:
        """What Postfix sends for ``command`` (or what the milter asked for, where we know it)."""
        context = self.context
        queue_id = context.queue_id.encode()
        if command == mc.CONNECT:
            client = f"{context.client_name or 'unknown'} [{context.client_address or ''}]"
            known = {
                b"j": context.hostname.encode(),
                b"{daemon_name}": b"farm",
                b"v": b"farm",
                b"_": client.encode(),
                b"{client_addr}": (context.client_address or "").encode(),
                b"{client_port}": str(context.client_port).encode(),
                b"{client_name}": (context.client_name or "unknown").encode(),
            }
        elif command == mc.HELO:
            known = {
                b"{tls_version}": (context.tls_version or "").encode(),
                b"{cipher}": (context.tls_cipher or "").encode(),
            }
            known = {k: v for k, v in known.items() if v}
        elif command == mc.MAIL:
            known = {b"i": queue_id, b"{mail_addr}": context.mail_from.encode()}
            if context.user:
                known[b"{auth_authen}"] = context.user.encode()
        elif command == mc.RCPT:
            known = {b"{rcpt_addr}": (rcpt or "").encode()}
        else:
            known = {b"i": queue_id}
        wanted = self.options.macros.get(command)
        if wanted is None:
            return list(known.items())
        return [(name, known[name]) for name in wanted if name in known]

    async def _step(self, command: bytes, packet: bytes, rcpt: str | None = None) -> bool:
        """Send one step (and its macros); wait for the reply unless told not to.

        Returns True when the milter asked to skip the rest of this kind of step (body).
        """
        protocol = self.options.protocol
        if command not in (mc.HEADER, mc.BODY):  # those reuse the last macros sent
            macros = self._macros(command, rcpt)
            if macros:
                self.writer.write(mc.encode_macros(command, macros))
        if protocol & _NO_SEND[command] or (command == mc.DATA and self.options.version < 4):
            return False  # opted out, or (DATA) not in the milter's protocol version
        self.writer.write(packet)
        await self.writer.drain()  # bounds what a large body leaves in the write buffer
        if protocol & _NO_REPLY[command]:
            return False
        while True:
            code, data = await self._next()
            reply = mc.parse_reply(code, data)
            if code == mc.PROGRESS:
                continue
            if code == mc.CONTINUE:
                return False
            if code == mc.SKIP:
                if command != mc.BODY or not protocol & mc.P_SKIP:
                    raise mc.MilterProtocolError(f"skip after {command!r}")
                return True
            if code == mc.ACCEPT:
                raise _Refused(Verdict("accept", None, f"accepted at {_STEP_NAMES[command]}"))
            raise _Refused(self._decision(reply, command))

    def _decision(self, reply: mc.Reply, command: bytes) -> Verdict:
        """A final answer (reject, tempfail, reply code, discard); anything else is an error."""
        code = reply.code
        where = f"at {_STEP_NAMES[command]}"
        if code == mc.REJECT:
            return Verdict("reject", REJECTED, where)
        if code == mc.TEMPFAIL:
            return Verdict("tempfail", TEMPFAILED, where)
        if code == mc.REPLYCODE:
            text = checked_reply(reply.strings[0].decode("ascii", "replace"))
            if text is None:
                raise mc.MilterProtocolError(f"malformed reply {reply.strings[0][:80]!r}")
            return Verdict("tempfail" if text[0] == "4" else "reject", text, where)
        if code == mc.DISCARD:
            return Verdict("discard", None, where)
        if code in (mc.SHUTDOWN, mc.CONN_FAIL):
            return Verdict("tempfail", TEMPFAILED, f"{where} ({code.decode()})")
        raise mc.MilterProtocolError(f"reply {code!r} {where}")

    async def _end_of_message(self) -> Verdict:
        """End of message: collect the edits, apply them, then the final answer."""
        macros = self._macros(mc.BODYEOB)
        if macros:
            self.writer.write(mc.encode_macros(mc.BODYEOB, macros))
        self.writer.write(mc.encode(mc.BODYEOB))
        await self.writer.drain()
        edits: list[mc.Reply] = []
        while True:
            code, data = await self._next()
            reply = mc.parse_reply(code, data)
            if code == mc.PROGRESS:
                continue
            if code in _EDIT_FLAGS:
                if not self.options.actions & _EDIT_FLAGS[code]:
                    raise mc.MilterProtocolError(f"edit {code!r} not negotiated")
                edits.append(reply)
                continue
            if code in (mc.CONTINUE, mc.ACCEPT):
                verdict = Verdict("accept", None, "at EOM")
            elif code == mc.SKIP:
                raise mc.MilterProtocolError("skip at end of message")
            else:
                verdict = self._decision(reply, mc.BODYEOB)
            break
        if verdict.final:
            return verdict  # a refused message is not edited
        try:
            quarantined = self._apply(edits)
        except HeaderError as error:
            raise mc.MilterProtocolError(str(error)) from None
        if quarantined:
            return Verdict("quarantine", None, f"quarantine: {self.context.quarantine}")
        return verdict

    def _apply(self, edits: Iterable[mc.Reply]) -> bool:
        """Apply the edits in the order sent; True when one was a quarantine."""
        context = self.context
        message = context.message
        lead = bool(self.options.protocol & mc.P_HDR_LEADSPC)
        body: list[bytes] = []
        quarantined = False
        for edit in edits:
            code, strings = edit.code, edit.strings
            if code == mc.ADDHEADER:
                message.add(strings[0], strings[1], lead)
            elif code == mc.INSHEADER:
                message.insert(edit.index, strings[0], strings[1], lead)
            elif code == mc.CHGHEADER:
                message.change(strings[0], edit.index, strings[1], lead)
            elif code == mc.CHGFROM:
                context.mail_from = _address(strings[0])
                context.mail_options = _options(strings[1:])
                context.envelope_changed = True
            elif code in (mc.ADDRCPT, mc.ADDRCPT_PAR):
                context.rcpt_tos.append(_address(strings[0]))
                context.envelope_changed = True
            elif code == mc.DELRCPT:
                gone = _address(strings[0]).lower()
                context.rcpt_tos = [r for r in context.rcpt_tos if r.lower() != gone]
                context.envelope_changed = True
            elif code == mc.REPLBODY:
                body.append(edit.data)
            elif code == mc.QUARANTINE:
                context.quarantine = strings[0].decode("utf-8", "replace")[:200]
                quarantined = True
        if body:
            message.replace_body(b"".join(body))
        return quarantined


def _angle(address: str) -> bytes:
    return f"<{address}>".encode()


def _address(raw: bytes) -> str:
    """A milter's address (``<a@b>`` or ``a@b``) as the envelope holds it."""
    text = raw.decode("utf-8", "replace").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if any(c in text for c in "\r\n\x00 <>"):
        raise mc.MilterProtocolError(f"bad address {raw[:80]!r}")
    return text


def _options(strings: tuple[bytes, ...]) -> list[str]:
    return [o for s in strings for o in s.decode("utf-8", "replace").split()]

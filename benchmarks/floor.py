"""The floor: the least Python that answers ``smtp-source`` (a reference row, not a server).

:class:`FloorProtocol` replies 220/250/354/250/221 in the order smtp-source expects and
checks nothing: no limits, no parsing beyond the verb, no session or envelope, no timers. What
it costs per message is what any Python server on the same event loop pays before it does
anything an SMTP server must do (accept, seven reads and writes, close), so it bounds what the
engine could reach: ``benchmarks/run.py --servers aiosmtpd-asyncio,floor-uvloop,farm-uvloop``.
"""

from __future__ import annotations

import asyncio

_READ_SIZE = 64 * 1024
_END_OF_DATA = b"\r\n.\r\n"


class FloorProtocol(asyncio.BufferedProtocol):
    """Lines in, canned replies out; the body is skipped up to its terminator."""

    __slots__ = ("_buffer", "_in_data", "_pending", "_transport")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport: asyncio.Transport = transport  # type: ignore[assignment]
        self._buffer = bytearray(_READ_SIZE)
        self._in_data = False
        self._pending = b""
        self._transport.write(b"220 floor.test ESMTP\r\n")

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = self._pending + bytes(self._buffer[:nbytes])
        replies = []
        while True:
            if self._in_data:
                end = data.find(_END_OF_DATA)
                if end < 0:
                    self._pending = data[-4:]
                    break
                data = data[end + len(_END_OF_DATA) :]
                self._in_data = False
                replies.append(b"250 OK\r\n")
                continue
            end = data.find(b"\r\n")
            if end < 0:
                self._pending = data
                break
            verb = data[:4].upper()
            data = data[end + 2 :]
            if verb == b"QUIT":
                self._transport.write(b"".join(replies) + b"221 Bye\r\n")
                self._transport.close()
                return
            if verb == b"DATA":
                self._in_data = True
                data = b"\r\n" + data  # an empty body's terminator follows the command's CRLF
                replies.append(b"354 go ahead\r\n")
            else:
                replies.append(b"250 OK\r\n")
        if replies:
            self._transport.write(b"".join(replies))

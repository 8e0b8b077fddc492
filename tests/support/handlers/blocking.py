"""A handler that blocks its worker's event loop on demand.

A message to a recipient whose local part starts with ``block`` makes ``handle_DATA`` call
``time.sleep(3600)``: the whole worker stops (no heartbeat), as a handler stuck in a blocking
call would. Just before, it writes its pid to ``marker`` (a handler argument), if given, and
opens ``sockets`` extra sockets (as a worker busy with that many connections would hold), so
that its death takes the kernel a while. Any other message is accepted at once.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from typing import Any


class Blocking:
    def __init__(self, marker: str | None = None, sockets: int = 0) -> None:
        self.marker = marker
        self.sockets = int(sockets)
        self.held: list[socket.socket] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if any(rcpt.startswith("block") for rcpt in envelope.rcpt_tos):
            if self.sockets:
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                limit = self.sockets + 200
                if hard != resource.RLIM_INFINITY:
                    limit = min(limit, hard)
                if limit > soft:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
                self.held = [socket.socket() for _ in range(limit - 200)]
            if self.marker:
                with open(self.marker, "w") as marker:
                    marker.write(f"{os.getpid()}\n")
            time.sleep(3600)  # deliberately blocks the event loop
        return "250 2.0.0 fine"

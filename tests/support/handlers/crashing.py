"""A handler that kills its own worker process on demand (a crash, as far as the farm knows).

A message to a recipient whose local part starts with ``crash`` makes ``handle_DATA`` exit the
process at once with status 70; any other message is accepted.
"""

from __future__ import annotations

import os
from typing import Any


class Crashing:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if any(rcpt.startswith("crash") for rcpt in envelope.rcpt_tos):
            os._exit(70)
        return "250 2.0.0 fine"

"""Stopping the helper processes a test started (smtp-source, smtp-sink, rspamd, HAProxy...)."""

from __future__ import annotations

import subprocess
from typing import Any

from tests.support.wait import WAIT


def stop_process(proc: subprocess.Popen[Any], grace: float = 0.0) -> None:
    """Stop ``proc`` by its pid and reap it: SIGTERM and up to ``grace`` seconds to exit first
    when ``grace`` is given, then SIGKILL."""
    if proc.poll() is None:
        if grace > 0:
            proc.terminate()
            try:
                proc.wait(grace)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
    proc.wait(WAIT)

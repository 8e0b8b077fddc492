"""A handler that takes a while to build: ``__init__`` sleeps for the seconds written in a file.

Lets a test make a worker spend a chosen time booting (before READY), and change that time
between workers by rewriting the file.
"""

from __future__ import annotations

import time
from pathlib import Path


class SlowBoot:
    def __init__(self, delay_file: str) -> None:
        time.sleep(float(Path(delay_file).read_text() or 0))

"""The one exception scanners raise: the scanner could not give a verdict."""

from __future__ import annotations

__all__ = ["ScanError"]


class ScanError(Exception):
    """A scanner failed (unreachable, timed out, broke its protocol); ``on_error`` decides."""

"""A handler module that cannot be imported (its import raises)."""

raise ImportError("tests.handlers.broken is broken on purpose")

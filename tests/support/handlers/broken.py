"""A handler module that cannot be imported (its import raises)."""

raise ImportError("tests.support.handlers.broken is broken on purpose")

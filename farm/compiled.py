"""The modules the build compiles to C with mypyc (``setup.py``), where it can.

They hold per-message work that runs inside them: the framer, the log line and its writer,
the shared limits table, MAIL/RCPT parsing; for the relay, its client (connection, reply wait
and parser), connection pool, routes and recipient policy (``benchmarks/instructions.py
--handler relay``: 748k -> 712k instructions per relayed message). Their exceptions live in
``farm/relay/errors.py``, interpreted: a compiled class cannot subclass ``ConnectionError``.
Compiled, the same source runs without the interpreter's dispatch (``instructions.py``: 7 %
fewer instructions per message, 10 % with the tuning for it that followed: ``Final`` module
constants, which compiled code reads without a dict lookup). Modules whose objects the engine
reads attribute by attribute (its state, timers, the write batch) stay interpreted: the
interpreter reads a compiled class's attribute more slowly than a plain slot. Classes a user
may subclass (the engine, sessions, limiters) stay interpreted too: an interpreted class
cannot inherit from a compiled one.

``FARM_PURE_PYTHON=1`` at install time builds none of them (the package is then pure Python).
After editing one of these modules in a checkout, rebuild (``make build``; ``make test`` does
it): an extension module is imported before the ``.py`` beside it.
"""

MODULES = (
    "farm/smtp/framing.py",
    "farm/smtp/logline.py",
    "farm/smtp/mail_rcpt.py",
    "farm/smtp/arguments.py",
    "farm/logs.py",
    "farm/supervisor/anvil.py",
    "farm/relay/reply_reader.py",
    "farm/relay/client.py",
    "farm/relay/pool.py",
    "farm/relay/routes.py",
    "farm/relay/policy.py",
)

"""What the tests share: one raw SMTP client, ``free_port``, ``wait_for``, and the fixtures and
helpers that run real processes (farms, next hops, HAProxy, rspamd, unbound)."""

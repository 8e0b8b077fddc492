"""The inbound MX: ``farm.relay:Relay`` takes mail for our domains and passes it on.

``handler``: the ``Relay`` handler (hooks, policy decisions, next-hop transactions, logging);
``policy``: whose recipients are accepted; ``routes``: which next hop a recipient goes to;
``client``: one SMTP/LMTP connection to a next hop (also used by ``farm.handlers.Proxy``);
``pool``: reusable connections per next hop; ``content``: the bytes sent, cleaned and stuffed.
"""

from farm.relay.content import clean_content, dot_stuff
from farm.relay.handler import RELAY_DENIED, Relay

__all__ = ["RELAY_DENIED", "Relay", "clean_content", "dot_stuff"]

"""peers: a test plugin that writes down who each connection says it is from.

Used by ``tests/e2e/test_proxy_protocol.py``. At ``connect`` it appends the
connection's addresses to the module-level ``PEERS``: a dict with ``remote_ip``,
``remote_port``, ``local_ip``, ``local_port``, ``proxy_ip`` and ``proxy_port``.
"""

from qpgevent.plugin import DECLINED, Plugin

PEERS = []
FIELDS = ("remote_ip", "remote_port", "local_ip", "local_port", "proxy_ip", "proxy_port")


class Peers(Plugin):
    def hook_connect(self, session):
        PEERS.append({name: getattr(session.connection, name) for name in FIELDS})
        return DECLINED

"""client_stamp: a test plugin that writes into each message who it believes the client is.

At ``data_post`` it adds ``X-Client-Seen: remote_ip=<connection.remote_ip>
xforward=<transaction.notes["xforward"]["addr"]>``, so a test reads from the delivered
message what a plugin saw (XCLIENT and XFORWARD tests).
"""

from qpgevent.plugin import DECLINED, Plugin


class ClientStamp(Plugin):
    def hook_data_post(self, session):
        forwarded = session.transaction.notes.get("xforward") or {}
        session.transaction.headers.add(
            "X-Client-Seen", f"remote_ip={session.connection.remote_ip} xforward={forwarded.get('addr')}")
        return DECLINED

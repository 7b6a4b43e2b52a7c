"""message_view: a test plugin that writes down the message as the DATA-phase hooks see it.

Used by ``tests/e2e/test_bdat.py`` to show that a message sent by BDAT and the same one
sent by DATA look the same to plugins. At ``data_headers_end`` it records the header
fields; at ``data_post`` the whole message (``message_chunks``) and ``data_size``. The
server runs in the test's process: the test reads ``SEEN`` directly.
"""

from qpgevent.plugin import DECLINED, Plugin

SEEN = []


class MessageView(Plugin):
    def hook_data_headers_end(self, session):
        SEEN.append(("data_headers_end", list(session.transaction.headers)))
        return DECLINED

    def hook_data_post(self, session):
        transaction = session.transaction
        SEEN.append(("data_post", b"".join(transaction.message_chunks()), transaction.data_size))
        return DECLINED

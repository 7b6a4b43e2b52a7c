"""Log fields an operator greps for: transaction ids under their connection's id, and
IPv6 peers written ``[::1]:41258`` (so the port is not read as part of the address).

The ids are read from the log of the real server (a child process) after a real client
sent two messages on one connection; the ident look-up's lines from the real client code
against a closed port of ::1.
"""

from __future__ import annotations

import logging
import re
import smtplib

from qpgevent import ident
from qpgevent.connection import Connection, host_port
from qpgevent.testing import ServerProcess, maildir_messages, write_ini
from qpgevent.testing.redis_server import free_tcp_port


def test_host_port_brackets_ipv6_only():
    assert host_port("192.0.2.1", 25) == "192.0.2.1:25"
    assert host_port("::1", 41258) == "[::1]:41258"
    assert Connection("2001:db8::5", 1234).peer == "[2001:db8::5]:1234"


def test_transaction_ids_start_with_their_connection_id(tmp_path):
    ini = write_ini(tmp_path, "[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n  path = Maildir\n",
                    workers=1)
    server = ServerProcess(ini)
    try:
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.example.test") as client:
            for _ in range(2):
                client.sendmail("a@client.test", ["bob@example.test"], b"Subject: hi\r\n\r\nbody\r\n")
    finally:
        assert server.terminate() == 0
    pairs = set(re.findall(r"conn=(\S+) txn=(\S+) ", server.log()))
    assert len({txn for _, txn in pairs}) >= 2, server.log()
    for conn, txn in pairs:
        assert txn.startswith(conn + "."), (conn, txn)
    received_ids = [re.search(rb"with E?SMTP id (\S+)", message).group(1).decode().rstrip(";")
                    for message in maildir_messages(tmp_path / "Maildir").values()]
    assert len(received_ids) == 2 and {conn for conn, _ in pairs} == {rid.rsplit(".", 1)[0] for rid in received_ids}


def test_ident_lines_write_an_ipv6_peer_in_brackets(caplog):
    port = free_tcp_port()
    with caplog.at_level(logging.DEBUG, logger="qpgevent.ident"):
        assert ident.lookup("::1", 40000, "::1", 25, timeout=5, port=port) is None
    assert any(record.getMessage().startswith(f"ident [::1]:{port}: ") for record in caplog.records), caplog.text

"""Issue 21, item 5 (audit): a HELO name cannot add fields to the Received-SPF header.

RFC 7208 9.1: the header's key-value pairs are ``key=value;`` with a dot-atom or a
quoted-string as the value. The client's HELO was written raw after ``helo=``, so
``EHLO x;client-ip=192.0.2.66`` wrote a second ``client-ip``. Now it is quoted. Through
the real server, against a real NSD on loopback holding the SPF record.
"""

from __future__ import annotations

import re

import pytest

from qpgevent import dns
from qpgevent.core.headers import Headers
from qpgevent.testing import RawClient, maildir_messages
from qpgevent.testing.dns import LoopbackDns


@pytest.fixture(scope="module")
def nsd():
    with LoopbackDns({"sender.test": {"@": [("TXT", '"v=spf1 ip4:127.0.0.1 -all"')]}}) as server:
        yield server


@pytest.fixture
def server(make_server, nsd):
    previous = dns.set_default(None)
    yield make_server("[[sender_permitted_from]]\n[[rcpt_ok]]\n  domains = example.test\n"
                      "[[queue/maildir]]\n  path = Maildir\n",
                      dns_nameservers="127.0.0.1", dns_port=nsd.port, dns_timeout=2)
    dns.set_default(previous)


@pytest.mark.parametrize("helo, written", [
    ("x;client-ip=192.0.2.66;identity=forged", '"x;client-ip=192.0.2.66;identity=forged"'),
    ('a"b\\c', '"a\\"b\\\\c"'),
    ("mail.sender.test", "mail.sender.test"),
])
def test_the_helo_is_one_value_of_received_spf(server, helo, written):
    client = RawClient(server)
    try:
        assert client.reply()[0] == 220
        for command in (f"EHLO {helo}", "MAIL FROM:<alice@sender.test>", "RCPT TO:<bob@example.test>"):
            assert client.command(command)[0] == 250, command
        assert client.command("DATA")[0] == 354
        client.sock.sendall(b"Subject: spf\r\n\r\nbody\r\n")
        assert client.command(".")[0] == 250
    finally:
        client.close()
    [message] = maildir_messages(server.maildir).values()
    [field] = Headers.parse(message.split(b"\r\n\r\n", 1)[0] + b"\r\n").get_all("Received-SPF")
    assert field.endswith(f"helo={written};"), field
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', field)  # what a reader of key=value pairs sees
    assert re.findall(r"client-ip=([^;]*);", unquoted) == ["127.0.0.1"]

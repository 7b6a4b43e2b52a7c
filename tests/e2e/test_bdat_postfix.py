"""A real MTA relaying into qpgevent, which offers CHUNKING and BINARYMIME.

Found out here: Debian's Postfix (3.7) has BDAT in its server only; its SMTP client reads
CHUNKING in our EHLO and still sends DATA. So this test shows the other half: offering
CHUNKING does not disturb a client that does not use it. A private Postfix
(``qpgevent.testing.mta.Postfix``) takes a message from smtplib and relays it to qpgevent,
running in this process, as its ``relayhost``; ``debug_peer_list`` makes Postfix log its
side of the dialogue. BDAT itself is sent by Python clients in ``test_bdat.py`` (exim4,
whose client does BDAT, cannot be installed next to Postfix: both are Debian's MTA).
"""

from __future__ import annotations

import smtplib

from qpgevent.testing import maildir_messages, strip_trace
from qpgevent.testing.mta import Postfix, wait_until

# Lines of text with leading dots (DATA stuffs them, we unstuff them).
BODY = b"".join(b"%s line %05d of the message relayed by Postfix\r\n" % (b"." if i % 7 == 0 else b"", i)
                for i in range(4000))
MESSAGE = (b"From: alice@upstream.test\r\nTo: bob@example.test\r\nSubject: relayed by BDAT\r\n"
           b"Message-ID: <bdat-1@upstream.test>\r\n\r\n" + BODY)


def test_postfix_sees_chunking_and_relays_by_data(make_server):
    server = make_server()
    postfix = Postfix(["nobody@upstream.test"], main={
        "relayhost": f"[127.0.0.1]:{server.port}", "debug_peer_list": "127.0.0.1",
        "smtp_helo_name": "relay.upstream.test"})
    try:
        postfix.start()
        with smtplib.SMTP("127.0.0.1", postfix.port, local_hostname="client.upstream.test", timeout=60) as client:
            assert client.sendmail("alice@upstream.test", ["bob@example.test"], MESSAGE) == {}
        delivered = wait_until(lambda: list(maildir_messages(server.maildir).values()), 60,
                               f"the relayed message in {server.maildir}\n{postfix.log()}")
        log = postfix.log()
    finally:
        postfix.cleanup()
    [message] = delivered
    received_by_postfix = strip_trace(message)
    # Postfix added its own Received; the body is byte for byte what smtplib gave it.
    assert received_by_postfix.startswith(b"Received: from client.upstream.test")
    assert received_by_postfix.endswith(b"\r\n\r\n" + BODY)
    assert ": 250-CHUNKING" in log and ": DATA\n" in log and ": BDAT " not in log, log[-3000:]

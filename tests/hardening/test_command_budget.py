"""Issue 21: a per-session command budget, so that NOOP/RSET/VRFY/HELP floods end.

``[limits] max_junk_commands``: past that many of these since the client's last message,
each one more counts as a bad command, so that a flood ends at ``max_bad_commands`` with
``421 4.7.0 Too many errors`` (Postfix's smtpd_junk_command_limit). A client that delivers
mail starts its budget again.
"""

from __future__ import annotations

import itertools

from qpgevent.testing import RawClient

FLOOD = ("NOOP", "RSET", "VRFY postmaster", "HELP")


def replies_until_421(client: RawClient, commands, bound: int) -> int:
    """Send commands one by one, reading every reply, until a 421; how many were sent."""
    for sent, command in enumerate(itertools.islice(commands, bound), 1):
        client.sock.sendall(command.encode() + b"\r\n")
        code, text = client.reply()
        if code != 421 and client._buffer:  # the reply to the last one, then the 421
            code, text = client.reply()
        if code == 421:
            assert text.startswith("4.7.0 Too many errors"), text
            assert client.is_closed_by_server()
            return sent
        assert code in (250, 252, 214), text
    raise AssertionError(f"no 421 after {bound} commands")


def test_a_flood_of_junk_commands_ends_with_421(make_server):
    server = make_server(max_junk_commands=8, max_bad_commands=3)
    client = RawClient(server)
    try:
        assert client.reply()[0] == 220
        assert client.command("EHLO c.test")[0] == 250
        assert replies_until_421(client, itertools.cycle(FLOOD), bound=100) == 8 + 3
    finally:
        client.close()


def test_a_client_that_delivers_mail_starts_its_budget_again(make_server):
    server = make_server(max_junk_commands=8, max_bad_commands=3)
    client = RawClient(server)
    try:
        assert client.reply()[0] == 220
        assert client.command("EHLO c.test")[0] == 250
        for _ in range(4):  # 4 x 7 junk commands in all, never 8 since a message
            for command in itertools.islice(itertools.cycle(FLOOD), 7):
                assert client.command(command)[0] in (250, 252, 214)
            for command in ("MAIL FROM:<a@c.test>", "RCPT TO:<bob@example.test>"):
                assert client.command(command)[0] == 250
            assert client.command("DATA")[0] == 354
            assert client.command("Subject: budget\r\n\r\nbody\r\n.")[0] == 250
        assert client.command("QUIT")[0] == 221
    finally:
        client.close()

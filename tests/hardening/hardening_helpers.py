"""What the hardening tests share: a raw client in the middle of DATA, sending in pieces."""

from __future__ import annotations

from typing import Any

from qpgevent.testing import RawClient


def client_in_data(server: Any) -> RawClient:
    """A ``RawClient`` that has said HELO, MAIL, RCPT and DATA, and got 354."""
    client = RawClient(server)
    try:
        assert client.reply()[0] == 220
        for command in ("HELO c.test", "MAIL FROM:<a@c.test>", "RCPT TO:<bob@example.test>"):
            assert client.command(command)[0] == 250
        assert client.command("DATA")[0] == 354
    except BaseException:
        client.close()
        raise
    return client


def send_in_pieces(client: RawClient, data: bytes, piece: int) -> None:
    for i in range(0, len(data), piece):
        client.sock.sendall(data[i:i + piece])


def send_message(server: Any, message: bytes, piece: int = 1 << 16) -> tuple[int, str]:
    """One whole transaction, the message sent in ``piece``-octet writes: the reply to the dot."""
    client = client_in_data(server)
    try:
        send_in_pieces(client, message, piece)
        return client.command(".")
    finally:
        client.close()

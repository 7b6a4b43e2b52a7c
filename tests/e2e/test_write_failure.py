"""A reply the client is no longer there to read: the write fails, the session ends quietly.

The client asks MAIL FROM, then resets the connection (SO_LINGER 0) while a plugin holds the
reply back; released, the server's write meets the reset. It must log "write failed" and end
the session as closed by the client, not as an internal error (gevent's sendall keeps a view
of the output buffer alive in the exception's traceback: clearing the buffer inside the
except block raised BufferError).
"""

from __future__ import annotations

import logging
import socket
import struct
from pathlib import Path

from qpgevent.testing import wait_until

PLUGINS = Path(__file__).resolve().parent.parent / "data" / "hold_plugin"


def test_a_reply_to_a_client_that_reset_ends_the_session_without_an_internal_error(make_server, tmp_path,
                                                                                        caplog):
    release = tmp_path / "release"
    server = make_server(plugins=f"[[hold_mail]]\n  release = {release}\n[[rcpt_ok]]\n  domains = example.test\n"
                                 "[[queue/maildir]]\n  path = Maildir\n", plugin_dirs=str(PLUGINS))
    caplog.set_level(logging.INFO)
    sock = socket.create_connection((server.host, server.port), timeout=10)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220")
    sock.sendall(b"EHLO client.example.test\r\n")
    while not reader.readline().startswith(b"250 "):
        pass
    sock.sendall(b"MAIL FROM:<someone@sender.test>\r\n")
    wait_until((tmp_path / "release.entered").exists, timeout=20, what="MAIL held in the plugin")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reader.close()
    sock.close()  # an RST: the server's next write fails
    release.touch()
    wait_until(lambda: not server.server.sessions, timeout=20, what="the session to end")
    assert "write failed" in caplog.text
    assert "internal error" not in caplog.text.lower()
    assert "BufferError" not in caplog.text

"""Issue 21, item 4: once a queue plugin has committed, the client is told 250.

A 4xx for a message already delivered makes a duplicate on the client's retry. A queue
plugin says when its commit is done (``transaction.handed_off``); a test double
(tests/hardening/plugins/commit_then_stall.py) commits, then stalls. When
``plugin_timeout`` expires in the stall, the client still gets 250; when the server is
stopped (SIGTERM, the real process) while the hook stalls, the client gets the 250 and
then the 421, and the message is there once.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from hardening_helpers import client_in_data

from qpgevent.testing import wait_until

PLUGIN_DIR = str(Path(__file__).resolve().parent / "plugins")


def plugins(path: Path) -> str:
    return f"""
[[rcpt_ok]]
  domains = example.test
[[commit_then_stall]]
  path = {path}
  seconds = 300
"""


def committed(path: Path) -> list[str]:
    return [name for name in os.listdir(path) if not name.startswith(".")] if path.is_dir() else []


def test_plugin_timeout_after_the_commit_still_answers_250(make_server, tmp_path):
    queue = tmp_path / "queue"
    server = make_server(plugins=plugins(queue), plugin_dirs=PLUGIN_DIR, plugin_timeout=1)
    client = client_in_data(server)
    try:
        client.sock.sendall(b"Subject: committed\r\n\r\nbody\r\n")
        code, text = client.command(".")
        assert code == 250, text
        assert text.startswith("2.0.0 Queued as ")
        assert client.command("QUIT")[0] == 221
    finally:
        client.close()
    [name] = committed(queue)
    assert text.endswith(name)


def test_sigterm_during_the_stall_answers_250_then_421(server_process, tmp_path):
    queue = tmp_path / "queue"
    process = server_process(plugins(queue), plugin_dirs=PLUGIN_DIR, workers=1, plugin_timeout=300,
                             shutdown_timeout=1)
    client = client_in_data(process)
    try:
        client.sock.sendall(b"Subject: committed\r\n\r\nbody\r\n.\r\n")
        wait_until(lambda: committed(queue), 30, "the message committed")
        process.process.send_signal(signal.SIGTERM)
        code, text = client.reply()
        assert code == 250, text
        code, text = client.reply()
        assert code == 421, text
    finally:
        client.close()
    assert process.wait(60) == 0
    assert len(committed(queue)) == 1

"""Helpers of the outbound tests: messages, the queue folder, sending from the lab client, waiting,
the ini of a server on loopback, the ``qpgevent queue`` tool, a next hop that stops talking."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from gevent.event import Event
from gevent.server import StreamServer

from qpgevent.testing.outbound_lab import lab_smtp
from qpgevent.testing import ServerProcess, plugin_section, wait_until, write_ini


def runner_pids(server: ServerProcess) -> list[int]:
    return [int(pid) for pid in re.findall(r"queue runner started \(pid (\d+)\)", server.log())]


def queued(queue_dir: Path) -> list[str]:
    env = queue_dir / "env"
    return sorted(os.listdir(env)) if env.is_dir() else []


def message(subject: str, sender: str = "sender@sender.test", to: str = "a@pref.test") -> bytes:
    return textwrap.dedent(f"""\
        From: <{sender}>
        To: <{to}>
        Subject: {subject}
        Message-ID: <{subject.replace(' ', '-')}@sender.test>

        body of {subject}
        """).replace("\n", "\r\n").encode()


def with_subject(postfix, address, subject, count=1, timeout=30.0):
    """The messages with ``subject`` delivered to ``address`` once there are ``count``."""
    def found():
        hits = [m for m in postfix.messages(address) if f"Subject: {subject}\n".encode() in m.replace(b"\r\n", b"\n")]
        return len(hits) >= count and hits
    return wait_until(found, timeout, f"{count} message(s) {subject!r} for {address}")


def bounces_about(postfix, subject):
    return [m for m in postfix.messages("sender@sender.test") if f"Subject: {subject}".encode() in m]


def send(internet, sender, recipients, body):
    with lab_smtp(internet.lab, "client", "198.18.0.10") as client:
        refused = client.sendmail(sender, recipients, body)
        assert refused == {}


def loopback_ini(folder: Path, **options) -> Path:
    """The ini of a server on loopback relaying for 127.0.0.1 into queue/outbound (long backoff),
    with the admin pages on; ``options`` are the plugin's (``routes`` at least)."""
    options = {"queue_dir": str(folder / "queue"), "minimal_backoff": 3600, "maximal_backoff": 3600,
               "scan_interval": 0.5, **options}
    plugins = "[[relay]]\n  clients = 127.0.0.1\n[[rcpt_ok]]\n" + plugin_section("queue/outbound", **options)
    return write_ini(folder, plugins=plugins, me="mta.test", workers=1, admin_listen="127.0.0.1:0",
                     run_dir=str(folder / "run"))


def queue(mta, *args):
    """``qpgevent queue ARGS`` on ``mta``'s ini: (exit status, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "qpgevent", "queue", "-c", mta.ini, *args],
                          capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


def listing(mta):
    code, out, err = queue(mta, "--json", "list")
    assert code == 0, err
    return json.loads(out)


def deferred_message(mta, subject):
    """A message for late.test (routed where nothing listens), once its first attempt deferred it."""
    known = {row["id"] for row in listing(mta)}
    with mta.smtp() as client:
        client.sendmail("sender@sender.test", ["late@late.test"], message(subject, to="late@late.test"))
    [row] = wait_until(lambda: [r for r in listing(mta) if r["id"] not in known and r["attempts"] >= 1], 30,
                       "a deferred attempt")
    return row


class SilentServer:
    """Accepts connections and says nothing after ``script`` lines of its own (a stuck MX)."""

    def __init__(self, script: list[bytes]) -> None:
        self.script, self.released, self.reached = script, Event(), Event()  # reached: its script is done
        self.server = StreamServer(("127.0.0.1", 0), self.handle)
        self.server.start()
        self.port = self.server.server_port

    def handle(self, sock: socket.socket, _address) -> None:
        reader = sock.makefile("rb")
        for reply in self.script:
            sock.sendall(reply)
            if reply.startswith(b"354"):
                while reader.readline() not in (b".\r\n", b""):  # the message, to its final dot
                    pass
            else:
                reader.readline()  # the client's next command
        self.reached.set()
        self.released.wait(60)  # then silence, until the test ends

    def stop(self) -> None:
        self.released.set()
        self.server.stop()

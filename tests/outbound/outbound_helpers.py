"""Helpers of the outbound tests: messages, the queue folder, sending from the lab client, waiting."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

from qpgevent.testing.outbound_lab import lab_smtp
from qpgevent.testing import ServerProcess, wait_until


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

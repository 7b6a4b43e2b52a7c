"""queue/outbound on a sick disk: the queue's fsyncs held past the hook's timeout.

The queue folder is on ``qpgevent.testing.faulty_disk`` (FUSE whose fsyncs a test holds; it
logs every rename). The client's 451 and the queue must agree: a message refused is never
queued, not even once the disk lets the fsync go (the queue runner would deliver it, and the
client's retry a second time), and its files are removed.
"""

from __future__ import annotations

import smtplib
import time

import pytest

from qpgevent.outqueue import Queue
from qpgevent.testing import wait_until
from qpgevent.testing.faulty_disk import FaultyDisk

HELD = 120  #: seconds the disk holds an fsync at most: the tests heal it sooner
SLOW = 5  #: seconds an fsync takes where the test does not let it go: well past the hook's timeout (1 s)


@pytest.fixture
def disk(tmp_path):
    with FaultyDisk(tmp_path / "disk", tmp_path / "queue", tmp_path / "faults") as disk:
        yield disk


@pytest.fixture
def server(disk, tmp_path, make_server):
    """queue/outbound with its queue on ``disk`` (mounted before the server starts)."""
    return make_server(f"[[rcpt_ok]]\n  domains = example.test\n"
                       f"[[queue/outbound]]\n  queue_dir = {tmp_path / 'queue'}\n  timeout = 1\n")


def send(server, number: int) -> int:
    with smtplib.SMTP(server.host, server.port, local_hostname="client.example.test", timeout=60) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@client.test")[0] == 250 and smtp.rcpt("bob@example.test")[0] == 250
        return smtp.data(f"Subject: {number}\r\n\r\nmessage {number}\r\n".encode())[0]


def queued(disk) -> list[str]:
    """The queue as its runner sees it (read beside the mount: a held fsync locks its folder)."""
    return Queue(str(disk.backing)).ids()


def left_over(disk) -> list[str]:
    return sorted(p.name for folder in ("tmp", "msg", "env") for p in (disk.backing / folder).iterdir())


def test_a_message_whose_fsync_is_held_past_the_timeout_gets_451_and_is_never_queued(disk, server):
    disk.slow("/tmp/*", HELD, times=1)
    assert send(server, 1) == 451
    (held,) = disk.held()  # the 451 did not wait for the disk
    assert held.endswith(".msg") and queued(disk) == []
    disk.heal()  # the fsync completes now, late: the enqueue must stop before env/
    wait_until(lambda: not disk.held() and left_over(disk) == [], 30, "the late fsync done, its files removed")
    assert [e for e in disk.events() if e.call == "rename" and e.target.startswith("/env/")] == []
    assert send(server, 1) == 250  # the retry, queued once
    assert len(queued(disk)) == 1


def test_an_envelope_in_env_whose_fsync_outlasts_the_timeout_is_taken_back_before_the_451(disk, server):
    disk.slow("/env", SLOW, call="fsyncdir", times=1)
    assert send(server, 1) == 451
    answered = time.time()
    events = disk.events()
    (renamed,) = [e for e in events if e.call == "rename" and e.target.startswith("/env/")]
    (taken_back,) = [e for e in events if e.call == "unlink" and e.path == renamed.target]
    slow, *after = [e for e in events if e.call == "fsyncdir" and e.path == "/env"]
    assert slow.ended - slow.started >= SLOW - 0.5  # the disk held it past the timeout
    # The 451 went out only once the envelope was out of env/ again, and env/ fsynced after:
    # the runner cannot deliver it, and a crash cannot bring it back.
    assert taken_back.ended <= answered
    assert [e.error for e in after if taken_back.ended <= e.started and e.ended <= answered] == [0]
    assert queued(disk) == [] and left_over(disk) == []
    assert send(server, 1) == 250 and len(queued(disk)) == 1

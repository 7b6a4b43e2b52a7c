"""A disk whose writes fail, under a real ext4: the batch's shared syncfs hears it, every client 451.

The other sick-disk tests fail an fsync (FUSE: the daemon answers it with EIO). A failed *write*
is another path through the kernel: the page cache takes the message at once, and the error
comes when the kernel writes the page back, recorded in the file system's error counter
(errseq), which ``syncfs`` reports to a descriptor opened before the failure (Linux 5.8 on) and
``fsync`` to the file's own. So the Maildir here is on a real ext4 (without a journal, as this
machine's root) made on a loop device whose backing file lives on the FUSE ``FaultyDisk``; the
daemon answers the loop device's writes of that file with EIO while the test asks it to.

Every message of the burst must get 451 and none may be left in ``new/`` or ``tmp/``; once
the disk heals, each retry is delivered once.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from qpgevent.backends import filesystem_sync
from qpgevent.testing import maildir_messages
from qpgevent.testing.faulty_disk import FaultyDisk
from qpgevent.testing.syscalls import traced
from test_sick_disk import REFUSED, burst

IMAGE_BYTES = 64 * 1024 * 1024


@pytest.fixture
def ext4_on_faulty_disk(tmp_path):
    """(the FaultyDisk, the folder where an ext4 on a loop device backed by a file on it is mounted)."""
    backing, mounted = tmp_path / "disk", tmp_path / "ext4"
    backing.mkdir()
    mounted.mkdir()
    with open(backing / "image", "wb") as image:
        image.truncate(IMAGE_BYTES)  # sparse; made beside the mount (FUSE truncate needs a path)
    with FaultyDisk(backing, tmp_path / "fuse", tmp_path / "faults") as disk:
        loop = subprocess.run(["losetup", "--find", "--show", str(tmp_path / "fuse" / "image")],
                              check=True, capture_output=True, text=True).stdout.strip()
        try:
            subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", loop], check=True)
            subprocess.run(["mount", "-o", "errors=continue", loop, str(mounted)], check=True)
            try:
                yield disk, mounted
            finally:
                disk.heal()
                subprocess.run(["umount", str(mounted)], check=True)
        finally:
            subprocess.run(["losetup", "-d", loop], check=True)


def test_failed_writes_under_a_shared_syncfs_refuse_every_message(make_server, ext4_on_faulty_disk, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(filesystem_sync, "DIRTY_LIMIT", 1 << 62)  # whatever else this machine writes
    disk, mounted = ext4_on_faulty_disk
    maildir = mounted / "Maildir"
    server = make_server(f"[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n  path = {maildir}\n")
    assert burst(server, [0]) == {0: 250}  # the disk works: delivered

    disk.fail("/image", call="write")
    with traced(os.getpid(), ["syncfs", "io_submit", "io_getevents"], tmp_path / "strace.out") as trace:
        replies = burst(server, range(1, 9))
    assert replies == {number: REFUSED[0] for number in range(1, 9)}
    failed = [c for c in trace.of("syncfs") if "EIO" in c.error]
    assert failed and all("INJECTED" not in c.error for c in failed)  # the kernel's own answer
    assert len(maildir_messages(maildir)) == 1
    assert os.listdir(maildir / "tmp") == []

    disk.heal()
    # ext4 answers EIO to the first changes after the failed write-back of its own blocks (its
    # check of the device's error counter), so some retries may be refused again: the clients
    # retry until the disk takes each message, which is then delivered once.
    waiting, attempts = list(range(1, 9)), []
    while waiting and len(attempts) < 5:
        replies = burst(server, waiting)
        attempts.append(replies)
        waiting = [number for number, code in replies.items() if code != 250]
        assert {replies[number] for number in waiting} <= {REFUSED[0]}
    assert waiting == [], attempts
    delivered = sorted(int(text.rsplit(b"message ", 1)[1].split(b"\r\n")[0])
                       for text in maildir_messages(maildir).values())
    assert delivered == list(range(9)), attempts  # each message once

"""Issue 21, item 8: a full ``spool_dir`` gives ``452 4.3.1``, no traceback, and the session goes on.

The spool is a real, tiny filesystem (a 64 KiB tmpfs mounted by the test, as root): a
message larger than ``size_threshold`` spills there, the write fails with ENOSPC. Where
mounting is not allowed, the worker's RLIMIT_FSIZE is lowered instead (EFBIG, the same
reply). Nothing is delivered; a small message (kept in memory) then is.
"""

from __future__ import annotations

import resource
import shutil
import subprocess

import pytest

from hardening_helpers import client_in_data, send_in_pieces, send_message

from qpgevent.testing import maildir_messages, wait_until


@pytest.fixture
def small_spool(tmp_path):
    """(folder, how): a 64 KiB filesystem when we may mount one, else a plain folder."""
    spool = tmp_path / "spool"
    spool.mkdir()
    mounted = shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(spool)], capture_output=True).returncode == 0
    yield spool, "tmpfs" if mounted else "rlimit"
    if mounted:
        subprocess.run(["umount", "-l", str(spool)], check=True)


def test_a_full_spool_dir_gets_452_and_no_traceback(server_process, small_spool):
    spool, how = small_spool
    process = server_process(workers=1, spool_dir=spool, size_threshold=4096)
    if how == "rlimit":
        [worker] = process.worker_pids()
        resource.prlimit(worker, resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
    client = client_in_data(process)
    try:
        # 400 KiB in 10 KiB writes: far past the 64 KiB of room
        send_in_pieces(client, b"Subject: big\r\n\r\n" + (b"z" * 98 + b"\r\n") * 4000, 10_000)
        code, text = client.command(".")
        assert (code, text.split()[0]) == (452, "4.3.1"), text
        # The session goes on: a small message, kept in memory, is delivered.
        assert client.command("MAIL FROM:<a@c.test>")[0] == 250
        assert client.command("RCPT TO:<bob@example.test>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.sock.sendall(b"Subject: small\r\n\r\nhello\r\n")
        assert client.command(".")[0] == 250
        assert client.command("QUIT")[0] == 221
    finally:
        client.close()
    [message] = maildir_messages(process.maildir).values()
    assert message.endswith(b"Subject: small\r\n\r\nhello\r\n")
    log = wait_until(lambda: "disconnect" in process.log() and process.log(), 20, "the session's summary")
    assert "cannot spill the message body" in log
    assert "Traceback" not in log


def test_a_full_maildir_gets_452_and_leaves_nothing(server_process, tmp_path):
    maildir = tmp_path / "Maildir"
    maildir.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(maildir)],
                             capture_output=True).returncode == 0
    try:
        process = server_process(workers=1, size_threshold=1 << 20)
        if not mounted:
            [worker] = process.worker_pids()
            resource.prlimit(worker, resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
        code, text = send_message(process, b"Subject: big\r\n\r\n" + (b"z" * 98 + b"\r\n") * 2000)  # 200 KB
        assert (code, text.split()[0]) == (452, "4.3.1"), text
        assert maildir_messages(maildir) == {} and list((maildir / "tmp").iterdir()) == []
        log = wait_until(lambda: "cannot write" in process.log() and process.log(), 20, "the error logged")
        assert "Traceback" not in log
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(maildir)], check=True)

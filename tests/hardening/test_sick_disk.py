"""queue/maildir on a sick disk: fsyncs that the kernel holds for long, or that fail when done.

The Maildir is on a real file system whose fsyncs we can slow down or fail per path
(``qpgevent.testing.faulty_disk``: FUSE over a folder of this machine's disk). Unlike strace,
which fails or delays the system call at its entry or exit, it acts where the disk does: on
the fsync the kernel runs, whether the server asked with the ``fsync`` system call (worker
threads) or handed it to the kernel with Linux AIO (then the error arrives with the
completion). The daemon also logs every rename, link and unlink it is asked for, so the
tests see whether a message ever entered ``new/``, not only whether it is there at the end.

The tests run both ways the server fsyncs (``fsync_way``): Linux AIO (the default here) and
worker threads (as where AIO is refused); and both ways it delivers (``seen_as``): as on FUSE,
which this disk is (a worker thread writes, fsyncs and renames), and as on a disk file system
(told so: the event loop writes and renames, the fsyncs go to the kernel or a thread), so
that the way ext4 is served meets the sick disk too. The rules every test checks:

- a message whose fsync is held past the queue hook's timeout gets 4xx and is never renamed
  into ``new/``, not then, not once the disk lets the fsync go; ``tmp/`` is emptied; the server
  keeps serving meanwhile (the gevent hub is never blocked: tests/conftest.py's monitor), and
  the late completion changes nothing;
- a file fsync that fails with EIO gets 4xx, and the message never enters ``new/``;
- a failed or timed-out fsync of ``new/`` gets 4xx only once the message is out of ``new/``
  again (the client will retry: left there, it would be delivered twice);
- on FUSE, an fsync of ``new/`` held stalls no other session: the kernel locks the folder
  meanwhile, and a rename into it waits in a worker thread, never in the event loop.
"""

from __future__ import annotations

import errno
import logging
import os
import smtplib
import time

import gevent
import gevent.event
import pytest

from hardening_helpers import client_in_data
from qpgevent.backends import disk as disk_backend
from qpgevent.backends import kernel_fsync
from qpgevent.testing import RawClient, wait_until
from qpgevent.testing.faulty_disk import FaultyDisk
from qpgevent.testing.syscalls import traced

PLUGINS = "[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n  path = Maildir\n  timeout = 1\n"
HELD = 20  #: seconds the disk holds an fsync at most: the tests let it go sooner (heal)
SLOW = 5  #: seconds an fsync takes where the test does not let it go: well past the hook's timeout (1 s)
REFUSED = (451, b"4.3.0 cannot store the message right now, try again later")
BURST = 6  #: sessions ending at once: without AIO the first is delivered in a thread, the others fsync in threads


@pytest.fixture(params=["aio", "threads"])
def fsync_way(request, monkeypatch):
    if request.param == "threads":
        monkeypatch.setattr(kernel_fsync, "_here", None)  # as where Linux AIO is refused
    else:
        assert kernel_fsync.available()
    return request.param


@pytest.fixture(params=["fuse", "as-on-disk"])
def seen_as(request, monkeypatch):
    if request.param == "as-on-disk":
        monkeypatch.setattr(disk_backend, "on_fuse", lambda folder: False)  # as ext4 is seen
    return request.param


@pytest.fixture
def disk(tmp_path):
    with FaultyDisk(tmp_path / "disk", tmp_path / "Maildir", tmp_path / "faults") as disk:
        yield disk


@pytest.fixture
def server(disk, fsync_way, seen_as, make_server):
    """The server with its Maildir on ``disk`` (mounted before it starts, unmounted after it stops)."""
    return make_server(PLUGINS)


def message(number: int, size: int = 0) -> bytes:
    """Message ``number``, with ``size`` octets of text lines before its last line if asked."""
    filler = (b"y" * 78 + b"\r\n") * (size // 80)
    return f"Subject: {number}\r\n\r\n".encode() + filler + f"message {number}\r\n".encode()


def send(server, number: int, size: int = 0) -> tuple[int, bytes]:
    """One message in a session of its own: the reply to its end of data."""
    with smtplib.SMTP(server.host, server.port, local_hostname="client.example.test", timeout=120) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@client.test")[0] == 250
        assert smtp.rcpt("bob@example.test")[0] == 250
        assert smtp.docmd("DATA")[0] == 354
        smtp.send(message(number, size) + b".\r\n")
        return smtp.getreply()


def burst(server, numbers) -> dict[int, int]:
    """One session per message, all in DATA with their text sent; then every one ends at once.
    The reply code to each."""
    clients = {}
    try:
        for number in numbers:
            clients[number] = client_in_data(server)
            clients[number].sock.settimeout(120)
            clients[number].sock.sendall(message(number))
        for client in clients.values():
            client.sock.sendall(b".\r\n")
        return {number: client.reply()[0] for number, client in clients.items()}
    finally:
        for client in clients.values():
            client.close()


def in_folder(disk, folder: str) -> list[str]:
    """What the disk itself holds in the Maildir's ``folder`` (read beside the mount, never
    through it: the kernel locks a folder while its fsync is held)."""
    return sorted(os.listdir(disk.backing / folder))


def delivered(disk) -> list[int]:
    """The message numbers in new/."""
    return sorted(int((disk.backing / "new" / name).read_bytes().rsplit(b"message ", 1)[1].split(b"\r\n")[0])
                  for name in in_folder(disk, "new"))


def moved_into_new(disk, path: str) -> list:
    """Every rename or link of ``path`` (a file in tmp/) into new/ the disk was asked for."""
    return [e for e in disk.events() if e.call in ("rename", "link") and e.path == path
            and e.target.startswith("/new/")]


def nothing_went_wrong_but_the_timeouts(caplog, capfd):
    """No error logged but the hook's timeouts, no traceback printed (gevent's pool and hub
    print what escapes them): a late completion broke nothing."""
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert [e for e in errors if "timed out" not in e] == [], errors
    assert "Traceback" not in capfd.readouterr().err


def test_a_file_fsync_held_past_the_timeout_gets_4xx_and_never_enters_new(disk, server, caplog, capfd):
    disk.slow("/tmp/*", HELD, times=1)
    assert send(server, 1)[0] == 451
    (held,) = disk.held()  # the kernel is still at it: the 4xx did not wait for the disk
    assert held.startswith("/tmp/") and in_folder(disk, "new") == []

    # The server serves the next client meanwhile (the hub monitor fails the test if it blocked).
    assert send(server, 2)[0] == 250
    assert delivered(disk) == [2]

    disk.heal()  # the fsync completes now, late
    wait_until(lambda: not disk.held() and in_folder(disk, "tmp") == [], 30, "the late fsync done, tmp/ emptied")
    assert [e.error for e in disk.events() if e.path == held and e.call == "fsync"] == [0]
    assert send(server, 3)[0] == 250
    assert moved_into_new(disk, held) == []  # not even for a moment
    assert delivered(disk) == [2, 3] and in_folder(disk, "tmp") == []
    nothing_went_wrong_but_the_timeouts(caplog, capfd)


def test_a_large_message_held_past_the_timeout_gets_4xx_and_never_enters_new(disk, server):
    """Past 256 KiB a message is delivered in a worker thread, however the server fsyncs."""
    disk.slow("/tmp/*", HELD, times=1)
    assert send(server, 1, size=300_000)[0] == 451
    (held,) = disk.held()
    disk.heal()
    wait_until(lambda: not disk.held() and in_folder(disk, "tmp") == [], 30, "the late fsync done, tmp/ emptied")
    assert moved_into_new(disk, held) == [] and in_folder(disk, "new") == []
    assert send(server, 1, size=300_000)[0] == 250
    assert delivered(disk) == [1]


def test_b_a_file_fsync_failing_at_completion_gets_4xx_and_never_enters_new(disk, server):
    disk.fail("/tmp/*", times=1)
    assert send(server, 1) == REFUSED
    (failed,) = [e for e in disk.events() if e.call == "fsync"]
    assert failed.error == errno.EIO  # the fsync was run, and the disk answered EIO
    assert moved_into_new(disk, failed.path) == []
    assert in_folder(disk, "new") == [] and in_folder(disk, "tmp") == []
    assert send(server, 1)[0] == 250  # the retry, on a healthy disk: delivered once
    assert delivered(disk) == [1]


def test_with_aio_the_disk_error_arrives_with_the_completion(disk, make_server, tmp_path, monkeypatch):
    """What strace's injection cannot do: io_submit takes the fsync (returns 1), the kernel runs
    it, and the EIO comes back in the completion that io_getevents reads. (The file's fsync
    goes to the kernel where the loop writes the file: on a disk file system.)"""
    assert kernel_fsync.available()
    monkeypatch.setattr(disk_backend, "on_fuse", lambda folder: False)
    server = make_server(PLUGINS)  # (after the disk is mounted: the argument order)
    disk.fail("/tmp/*", times=1)
    with traced(os.getpid(), ["io_submit", "io_getevents", "fsync"], tmp_path / "strace.out") as trace:
        assert send(server, 1) == REFUSED
    submitted = [c for c in trace.of("io_submit") if "/tmp/" in c.args]
    assert submitted and all(c.result == 1 for c in submitted)  # taken, not refused
    assert any(f"res={-errno.EIO}" in c.args for c in trace.of("io_getevents"))
    assert trace.of("fsync") == []  # no thread's fsync system call took part


def test_c_a_failed_fsync_of_new_takes_the_message_back_out_for_good_before_the_4xx(disk, server):
    disk.fail("/new", call="fsyncdir", times=1)
    assert send(server, 1) == REFUSED
    answered = time.time()
    events = disk.events()
    failed, *after = [e for e in events if e.call == "fsyncdir"]
    assert failed.error == errno.EIO
    (renamed,) = [e for e in events if e.call == "rename" and e.target.startswith("/new/")]
    (taken_back,) = [e for e in events if e.call == "unlink" and e.path == renamed.target]
    assert renamed.ended <= failed.started and failed.ended <= taken_back.started  # the Maildir's order
    # ... and new/ is fsynced again before the 4xx: a crash cannot bring the file back.
    assert [e.error for e in after if taken_back.ended <= e.started and e.ended <= answered] == [0]
    assert in_folder(disk, "new") == [] and in_folder(disk, "tmp") == []
    assert send(server, 1)[0] == 250
    assert delivered(disk) == [1]


def test_c_an_fsync_of_new_slower_than_the_timeout_answers_4xx_once_the_message_is_out(disk, server):
    disk.slow("/new", SLOW, call="fsyncdir", times=1)
    assert send(server, 1)[0] == 451
    answered = time.time()
    (renamed,) = [e for e in disk.events() if e.call == "rename" and e.target.startswith("/new/")]
    (taken_back,) = [e for e in disk.events() if e.call == "unlink" and e.path == renamed.target]
    assert taken_back.ended <= answered  # out of new/ before the 4xx, though the fsync was still running
    wait_until(lambda: [e for e in disk.events() if e.call == "fsyncdir"], SLOW + 30, "the slow fsync of new/ done")
    assert in_folder(disk, "new") == [] and in_folder(disk, "tmp") == []
    assert send(server, 2)[0] == 250
    assert delivered(disk) == [2]


def test_a_burst_whose_file_fsyncs_are_held_gets_4xx_and_nothing_enters_new(disk, server, caplog, capfd):
    disk.slow("/tmp/*", HELD)
    assert set(burst(server, range(BURST)).values()) == {451}
    assert len(disk.held()) == BURST and in_folder(disk, "new") == []
    disk.heal()
    wait_until(lambda: not disk.held() and in_folder(disk, "tmp") == [], 30, "the late fsyncs done, tmp/ emptied")
    assert [e for e in disk.events() if e.call in ("rename", "link")] == []
    assert set(burst(server, range(BURST)).values()) == {250}  # the retries, on a healthy disk
    assert delivered(disk) == list(range(BURST))
    nothing_went_wrong_but_the_timeouts(caplog, capfd)


def test_c_a_failed_fsync_of_new_refuses_the_burst_it_covered_and_no_other(disk, server):
    disk.fail("/new", call="fsyncdir", times=1)
    replies = burst(server, range(BURST))
    refused = sorted(n for n, code in replies.items() if code == 451)
    accepted = sorted(n for n, code in replies.items() if code == 250)
    assert refused and sorted(refused + accepted) == list(range(BURST))
    assert [e.error for e in disk.events() if e.call == "fsyncdir"][:1] == [errno.EIO]
    assert delivered(disk) == accepted and in_folder(disk, "tmp") == []  # each 250 once, no 451 delivered
    assert set(burst(server, refused).values()) == {250}
    assert delivered(disk) == list(range(BURST))


def threads_in_uninterruptible_sleep() -> int:
    """This process's threads asleep in the kernel with state ``D``: waiting for a lock of
    the file system (a rename into a folder being fsynced), not for a futex or a socket
    (``S``). A test cannot look while its own thread is the one waiting: the loop would be."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as stat:
                count += stat.read().rsplit(")", 1)[1].split()[0] == "D"
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return count


def test_a_held_fsync_of_new_stalls_no_other_session(disk, fsync_way, make_server, caplog, capfd):
    """FUSE (fuse-overlayfs, as rootless containers run on) locks a folder while its fsync
    runs: a rename into new/ then waits for the disk. A worker thread must do that wait, never
    the event loop, or every session of the worker stalls with it. (Failed on main at 86dbd8d,
    both ways: the hub monitor saw the loop in os.rename.)"""
    server = make_server(PLUGINS.replace("timeout = 1", "timeout = 120"))  # slow, not past the timeout
    disk.slow("/new", HELD, call="fsyncdir", times=1)
    watcher = RawClient(server)  # a third client, connected before the disk is held
    try:
        assert watcher.reply()[0] == 220 and watcher.command("EHLO watcher.test")[0] == 250
        first = gevent.spawn(send, server, 1)
        wait_until(lambda: disk.held() == ["/new"], 30, "the first message's fsync of new/ held")
        asleep = threads_in_uninterruptible_sleep()
        second = gevent.spawn(send, server, 2)
        wait_until(lambda: threads_in_uninterruptible_sleep() > asleep, 30,
                   "the second message's rename into new/ waiting for the held fsync, in a thread")
        assert watcher.command("NOOP")[0] == 250  # the loop answers meanwhile
        assert disk.held() == ["/new"] and not first.ready() and not second.ready()
        disk.heal()
        assert first.get(timeout=60)[0] == 250 and second.get(timeout=60)[0] == 250
        assert watcher.command("QUIT")[0] == 221
    finally:
        watcher.close()
    assert delivered(disk) == [1, 2] and in_folder(disk, "tmp") == []
    nothing_went_wrong_but_the_timeouts(caplog, capfd)


def test_an_interrupted_fsync_leaves_its_cleanup_until_the_disk_is_done(disk, fsync_way):
    """``kernel_fsync.fsync(fd, abandoned)``, as disk.fsync_file and queue/maildir use it: the
    caller's cleanup (closing, removing the file) may wait for the fsync on a sick disk, so it
    runs once the fsync has ended, never while the disk holds it."""
    fd = os.open(disk.mountpoint / "file", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"data")
    disk.slow("/file", HELD)
    cleaned_up = gevent.event.Event()
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.5):
        kernel_fsync.fsync(fd, abandoned=cleaned_up.set)
    wait_until(lambda: disk.held() == ["/file"], 30, "the fsync held by the disk")
    assert not cleaned_up.is_set()
    disk.heal()
    assert cleaned_up.wait(30), "the cleanup never ran"
    (done,) = [e for e in disk.events() if e.call == "fsync"]
    assert done.error == 0
    os.close(fd)


def test_the_disk_unmounts_and_its_daemon_ends_even_with_a_file_left_open(tmp_path):
    disk = FaultyDisk(tmp_path / "disk", tmp_path / "mount", tmp_path / "faults")
    with disk:
        fd = os.open(disk.mountpoint / "left open", os.O_WRONLY | os.O_CREAT, 0o600)
        daemon = disk.process
    try:
        assert not disk.is_mounted()
        assert daemon is not None and daemon.poll() is not None
    finally:
        with pytest.raises(OSError):  # its file system is gone: ENOTCONN
            os.close(fd)


def test_a_folder_on_the_faulty_disk_is_on_fuse_and_tmp_path_is_not(disk, tmp_path):
    (disk.mountpoint / "new").mkdir()
    assert disk_backend.on_fuse(str(disk.mountpoint / "new"))
    assert disk_backend.on_fuse(str(disk.mountpoint / "not" / "made" / "yet"))  # where it would be made
    assert not disk_backend.on_fuse(str(disk.backing / "new"))  # the same folder, beside the mount
    assert not disk_backend.on_fuse(str(tmp_path))
    assert not disk_backend.on_fuse(str(tmp_path / "not" / "made" / "yet"))
    (tmp_path / "a file").write_text("")
    assert disk_backend.on_fuse(str(tmp_path / "a file" / "new"))  # cannot be asked (ENOTDIR): the safe side


def test_a_maildir_off_fuse_is_checked_once_and_delivered_through_the_kernel(make_server, tmp_path):
    """The fast path stays as it was on a disk file system: one statfs for the Maildir, not
    one per message, and each message's fsync handed to the kernel (no thread's fsync)."""
    assert kernel_fsync.available() and not disk_backend.on_fuse(str(tmp_path))
    server = make_server(PLUGINS)
    with traced(os.getpid(), ["statfs", "io_submit", "fsync"], tmp_path / "strace.out") as trace:
        assert [send(server, number)[0] for number in range(3)] == [250] * 3
    assert len([c for c in trace.of("statfs") if "Maildir" in c.args]) == 1
    assert len([c for c in trace.of("io_submit") if "Maildir/tmp/" in c.args]) == 3
    assert trace.of("fsync") == []

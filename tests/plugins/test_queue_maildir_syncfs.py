"""queue/maildir's files that finish together share one ``syncfs`` of their file system.

Watched with strace, as in test_queue_maildir_group_commit.py: a burst of sessions ends DATA
at once; every message's file is on disk (a syncfs that began after its last write, or its
own fsync) before its rename into ``new/``, and fewer syncs than messages are made. A syncfs
that fails (EIO injected by strace) refuses every message it was to cover; one held past the
hook's timeout leaves nothing behind. Where a syncfs is not to be trusted or would cost others
(not ext4/XFS/btrfs, much else waiting to be written, ``syncfs = no``) each file is fsynced
on its own.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from qpgevent.backends import filesystem_sync
from qpgevent.testing import maildir_messages, wait_until
from qpgevent.testing.syscalls import traced
from test_queue_maildir_group_commit import BURST, burst, delivered_numbers, kernel_fsyncs, sent_replies

CALLS = ["syncfs", "write", "io_submit", "io_getevents", "rename"]


@pytest.fixture
def room_to_write(monkeypatch):
    """Whatever else this machine has waiting to be written, batches get their syncfs."""
    monkeypatch.setattr(filesystem_sync, "DIRTY_LIMIT", 1 << 62)


def plugins(*maildir_options: str) -> str:
    return ("[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n"
            + "".join(f"  {option}\n" for option in ("path = Maildir", *maildir_options)))


def file_synced_before(trace, name, rename, own_syncs) -> bool:
    """Whether message ``name``'s file was on disk before its ``rename`` began: its own fsync
    (``own_syncs``: (path, position it ended) of each that succeeded) ended before, or a syncfs
    that began after the file's last write did."""
    if any(path.endswith(f"/tmp/{name}") and end < rename.start for path, end in own_syncs):
        return True
    written = max(c.end for c in trace.of("write") if f"/tmp/{name}>" in c.args)
    return any(written < c.start and c.end < rename.start for c in trace.of("syncfs") if c.result == 0)


def new_synced_before(trace, new, rename, answered) -> bool:
    """Whether an fsync of ``new`` (handed to the kernel) or a syncfs began after the ``rename``
    ended and was over before the 250 went out (``answered``)."""
    own = [(submit.start, reaped.end) for path, submit, reaped, result in kernel_fsyncs(trace)
           if result == 0 and path == str(new)]
    shared = [(c.start, c.end) for c in trace.of("syncfs") if c.result == 0]
    return any(rename.end < start and end < answered for start, end in own + shared)


def syncs_of_files(trace):
    """(path, end) of each file's own fsync that succeeded, as handed to the kernel (one
    submission whose completion strace shows twice may be listed twice: count the paths)."""
    return [(path, reaped.end) for path, submit, reaped, result in kernel_fsyncs(trace)
            if result == 0 and os.path.basename(os.path.dirname(path)) == "tmp"]


def test_a_burst_shares_a_syncfs_in_the_maildir_order(make_server, tmp_path, room_to_write):
    """Each file on disk before its rename, each rename on disk before its 250."""
    server = make_server()
    with traced(os.getpid(), [*CALLS, "sendto", "sendmsg"], tmp_path / "strace.out") as trace:
        replies = burst(server, range(BURST))
    assert all(code == 250 for code, _ in replies.values()), replies
    assert delivered_numbers(server.maildir) == list(range(BURST))
    assert os.listdir(server.maildir / "tmp") == []
    syncfs, own = [c for c in trace.of("syncfs") if c.result == 0], syncs_of_files(trace)
    assert syncfs, "no batch shared a syncfs"
    files_alone = {path for path, _ in own}
    assert len(syncfs) + len(files_alone) < BURST, f"{len(syncfs)} syncfs and {len(files_alone)} fsyncs for {BURST} files"
    assert all(c.pid != os.getpid() for c in syncfs)  # in a worker thread, never in the loop
    sent = dict(sent_replies(trace))
    assert len(sent) == BURST
    for name, answered in sent.items():
        (rename,) = [c for c in trace.of("rename") if f"/new/{name}\"" in c.args]
        assert file_synced_before(trace, name, rename, own), f"{name}: renamed before it was on disk"
        assert new_synced_before(trace, server.maildir / "new", rename, answered), f"{name}: 250 before new/ was on disk"


def test_maildirs_of_their_own_share_the_syncfs_of_their_new_folders(make_server, tmp_path, room_to_write):
    """One Maildir per recipient (``mailbox = %l``): sixteen messages, sixteen new/ folders. One
    fsync per folder was sixteen more syncs; joined in one batch, a syncfs covers them all."""
    server = make_server(plugins("mailbox = %l"))
    with traced(os.getpid(), CALLS, tmp_path / "strace.out") as trace:
        replies = burst(server, range(BURST), recipient="user{n}@example.test")
    assert all(code == 250 for code, _ in replies.values()), replies
    for number in range(BURST):
        assert len(maildir_messages(server.maildir / f"user{number}")) == 1
    folder_syncs = {path for path, submit, reaped, result in kernel_fsyncs(trace) if path.endswith("/new")}
    syncs = len(trace.of("syncfs")) + len({path for path, _ in syncs_of_files(trace)}) + len(folder_syncs)
    assert syncs < BURST, f"{syncs} syncs for {BURST} files in {BURST} Maildirs"


def test_a_failed_syncfs_refuses_every_message_it_covered(make_server, tmp_path, room_to_write):
    server = make_server()
    # Slow as a sick disk (0.2 s), so that the sessions finishing meanwhile gather behind it.
    with traced(os.getpid(), CALLS, tmp_path / "strace.out",
                inject=["syncfs:error=EIO:delay_enter=200000"]) as trace:
        replies = burst(server, range(BURST))
    refused = sorted(n for n, (code, _) in replies.items() if code == 451)
    failed = trace.of("syncfs")
    assert failed and all("EIO" in c.error and "INJECTED" in c.error for c in failed)
    assert len(refused) >= 2, replies  # a whole batch, not one file
    assert {replies[n][1] for n in refused} == {b"4.3.0 cannot store the message right now, try again later"}
    # Each 250 delivered once, no 451 delivered, nothing left in tmp/.
    assert delivered_numbers(server.maildir) == sorted(set(range(BURST)) - set(refused))
    assert os.listdir(server.maildir / "tmp") == []
    renamed = {c.args.split("/new/")[1].split('"')[0] for c in trace.of("rename")}
    assert len(renamed) == BURST - len(refused)  # a refused file was never renamed into new/

    burst(server, refused)  # the disk is back: every retry delivered, once
    assert delivered_numbers(server.maildir) == list(range(BURST))


def test_a_failed_sync_of_new_takes_back_every_message_it_covered(make_server, tmp_path, room_to_write):
    """The files are on disk and renamed; the sync of new/ that was to cover them fails (new/
    alone in its batch is fsynced by the kernel: every io_submit fails): each of those messages
    is taken back out of new/ before its 451, the others get 250; each retry delivered once."""
    server = make_server()
    new = server.maildir / "new"
    with traced(os.getpid(), ["io_submit", "rename"], tmp_path / "strace.out", inject=["io_submit:error=EIO"]) as trace:
        replies = burst(server, range(BURST))
    refused = sorted(n for n, (code, _) in replies.items() if code == 451)
    assert refused, replies
    assert any(f"<{new}>" in c.args and "EIO" in c.error for c in trace.of("io_submit"))
    renamed = {c.args.split("/new/")[1].split('"')[0] for c in trace.of("rename") if "/new/" in c.args}
    assert {replies[n][1] for n in refused} == {b"4.3.0 cannot store the message right now, try again later"}
    assert len(renamed) > BURST - len(refused), "some refused message had been renamed into new/ first"
    assert delivered_numbers(server.maildir) == sorted(set(range(BURST)) - set(refused))
    assert os.listdir(server.maildir / "tmp") == []
    burst(server, refused)
    assert delivered_numbers(server.maildir) == list(range(BURST))


def test_a_syncfs_held_past_the_timeout_leaves_nothing_behind(make_server, tmp_path, room_to_write):
    """Every syncfs takes 3 s, the hook's timeout is 1 s: the messages it covered get 451 at
    once; their files are removed once the syncfs returns, and never enter new/."""
    server = make_server(plugins("timeout = 1"))
    with traced(os.getpid(), ["syncfs", "rename"], tmp_path / "strace.out",
                inject=["syncfs:delay_exit=3000000"]) as trace:
        replies = burst(server, range(8))
        refused = sorted(n for n, (code, _) in replies.items() if code == 451)
        assert len(refused) >= 2, replies
        wait_until(lambda: trace.log.exists() and "syncfs(" in trace.log.read_text()
                   and not os.listdir(server.maildir / "tmp"), 30, "the held syncfs over and tmp/ emptied")
    assert trace.of("syncfs"), "a syncfs was under way when the timeout struck"
    assert delivered_numbers(server.maildir) == sorted(set(range(8)) - set(refused))


def test_with_much_else_waiting_to_be_written_each_file_is_fsynced_on_its_own(make_server, tmp_path, monkeypatch):
    monkeypatch.setattr(filesystem_sync, "DIRTY_LIMIT", 0)
    server = make_server()
    with traced(os.getpid(), CALLS, tmp_path / "strace.out") as trace:
        replies = burst(server, range(BURST))
    assert all(code == 250 for code, _ in replies.values()), replies
    assert trace.of("syncfs") == []
    assert len({path for path, _ in syncs_of_files(trace)}) == BURST
    assert delivered_numbers(server.maildir) == list(range(BURST))


def test_with_no_way_to_know_what_waits_each_file_is_fsynced_on_its_own(make_server, tmp_path, monkeypatch):
    """/proc/meminfo not readable (a sandbox): no syncfs, and every message still delivered."""
    def unreadable():
        raise PermissionError(13, "Permission denied", "/proc/meminfo")

    monkeypatch.setattr(filesystem_sync, "waiting_to_be_written", unreadable)
    server = make_server()
    with traced(os.getpid(), CALLS, tmp_path / "strace.out") as trace:
        replies = burst(server, range(BURST))
    assert all(code == 250 for code, _ in replies.values()), replies
    assert trace.of("syncfs") == [] and len({path for path, _ in syncs_of_files(trace)}) == BURST


def test_syncfs_no_fsyncs_each_file_on_its_own(make_server, tmp_path, room_to_write):
    server = make_server(plugins("syncfs = no"))
    with traced(os.getpid(), CALLS, tmp_path / "strace.out") as trace:
        replies = burst(server, range(BURST))
    assert all(code == 250 for code, _ in replies.values()), replies
    assert trace.of("syncfs") == [] and len({path for path, _ in syncs_of_files(trace)}) == BURST


def test_a_maildir_on_tmpfs_gets_no_syncfs(make_server, tmp_path, room_to_write):
    """syncfs is trusted on ext4, XFS and btrfs only: a file system of another type (here
    tmpfs; in production NFS, FUSE) has each file fsynced, as before."""
    shm = f"/dev/shm/qpgevent-{uuid.uuid4().hex}"
    assert subprocess.run(["stat", "-f", "-c", "%T", "/dev/shm"], capture_output=True, text=True).stdout.strip() == "tmpfs"
    try:
        server = make_server(plugins().replace("path = Maildir", f"path = {shm}"))
        with traced(os.getpid(), CALLS, tmp_path / "strace.out") as trace:
            replies = burst(server, range(BURST))
        assert all(code == 250 for code, _ in replies.values()), replies
        assert trace.of("syncfs") == [] and len({path for path, _ in syncs_of_files(trace)}) == BURST
        assert len(maildir_messages(shm)) == BURST
    finally:
        subprocess.run(["rm", "-rf", shm], check=True)


def test_files_and_folders_are_closed_without_asking_what_they_are(make_server, tmp_path):
    """gevent's ``os.close`` asks fcntl and fstat whether a descriptor is a socket before
    closing it: two system calls a message's file and its new/ never need."""
    server = make_server()
    with traced(os.getpid(), ["fcntl", "close"], tmp_path / "strace.out") as trace:
        replies = burst(server, range(4))
    assert all(code == 250 for code, _ in replies.values()), replies
    maildir = str(server.maildir)
    closed = [c for c in trace.of("close") if maildir in c.args]
    assert len(closed) >= 8  # each message's file, and new/ after the renames into it
    assert [c.args for c in trace.of("fcntl") if maildir in c.args and "F_GETFD" in c.args] == []


@pytest.mark.parametrize(("release", "reports"), [("5.7.19", False), ("5.8.0", True), ("6.18.44-fc-v1300", True),
                                                  ("4.19.0-27-amd64", False), ("", False), ("x.y", False)])
def test_syncfs_is_shared_only_where_it_reports_a_failed_write(release, reports):
    # Linux 5.8 made syncfs return the file system's write errors; before, it returned 0.
    assert filesystem_sync.syncfs_reports_errors(release) is reports

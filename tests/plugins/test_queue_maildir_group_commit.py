"""queue/maildir's group commit: sessions that finish together share the fsync of ``new/``.

Watched with strace in the kernel's order: for every message, its file is fsynced before
it is renamed into ``new/``, ``new/`` is fsynced after the rename, and the 250 is sent after
both; a burst of sessions costs fewer ``new/`` fsyncs than messages. Both ways an fsync is
run: handed to the kernel with Linux AIO (``io_submit``; done when ``io_getevents`` reads
its completion back; the default here) and, where AIO is not to be had, the ``fsync`` system
call in worker threads (``threads_only``). Disk errors are injected by strace (the call
fails with EIO instead of running): every message the failed fsync was to cover gets 4xx
and is not in ``new/``; the retries deliver each message once.

Where these tests watch or break fsyncs, the files and ``new/`` are fsynced on their own
(``syncfs = no``): by default the small messages that finish together share one ``syncfs``
of their file system for their files and ``new/`` both (tests/plugins/test_queue_maildir_syncfs.py).
"""

from __future__ import annotations

import os
import re
import smtplib

import gevent
import gevent.event
import pytest

from qpgevent.backends import kernel_fsync
from qpgevent.testing import maildir_messages, wait_until
from qpgevent.testing.syscalls import traced

BURST = 16
#: Each file and new/ fsynced on their own: no syncfs of the file system shared by a batch.
NO_SYNCFS = "[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n  path = Maildir\n  syncfs = no\n"
QUEUED = re.compile(r"Queued as ([^\\\s\"]+)")
SUBMITTED = re.compile(r"aio_data=(0x[0-9a-f]+|0), aio_lio_opcode=IOCB_CMD_FD?SYNC, aio_fildes=\d+<([^>]*)>")
COMPLETED = re.compile(r"\{data=(0x[0-9a-f]+|0), obj=[^,]+, res=(-?\d+)")


@pytest.fixture
def threads_only(monkeypatch):
    """As where Linux AIO is refused: every fsync is the system call, in a worker thread."""
    monkeypatch.setattr(kernel_fsync, "_here", None)


def message(number: int) -> bytes:
    return f"Subject: burst {number}\r\nFrom: a@client.test\r\n\r\nmessage {number}\r\n".encode()


def burst(server, numbers, recipient="bob@example.test") -> dict[int, tuple[int, bytes]]:
    """One session per message, each up to DATA's 354; then every message ends at once.
    ``recipient``: "{n}" in it becomes the message's number."""
    ready = [gevent.event.Event() for _ in numbers]
    go = gevent.event.Event()

    def session(number, ready):
        with smtplib.SMTP(server.host, server.port, local_hostname="client.example.test", timeout=60) as smtp:
            smtp.ehlo()
            assert smtp.mail("a@client.test")[0] == 250
            assert smtp.rcpt(recipient.format(n=number))[0] == 250
            assert smtp.docmd("DATA")[0] == 354
            ready.set()
            go.wait()
            smtp.send(message(number) + b".\r\n")
            return smtp.getreply()

    sessions = {n: gevent.spawn(session, n, r) for n, r in zip(numbers, ready)}
    for event in ready:
        assert event.wait(60), "a session did not reach DATA"
    go.set()
    gevent.joinall(list(sessions.values()), timeout=120, raise_error=True)
    return {n: g.get(block=False) for n, g in sessions.items()}


def delivered_numbers(maildir) -> list[int]:
    return sorted(int(m.rsplit(b"message ", 1)[1].split(b"\r\n")[0]) for m in maildir_messages(maildir).values())


def sent_replies(trace):
    """The server's 250 replies in the trace: (queued file name, position the send began)."""
    return [(name, call.start) for call in trace.calls if call.name in ("sendto", "sendmsg")
            for name in QUEUED.findall(call.args)]


def test_a_burst_shares_the_fsyncs_of_new_and_each_250_follows_its_own(make_server, tmp_path, threads_only):
    server = make_server(NO_SYNCFS)
    new = server.maildir / "new"
    with traced(os.getpid(), ["fsync", "rename", "sendto", "sendmsg"], tmp_path / "strace.out") as trace:
        replies = burst(server, range(BURST))
    assert all(code == 250 for code, _ in replies.values()), replies
    assert delivered_numbers(server.maildir) == list(range(BURST))
    assert os.listdir(server.maildir / "tmp") == []

    folder_syncs = [c for c in trace.of("fsync") if c.args.endswith(f"<{new}>") and c.result == 0]
    assert 1 <= len(folder_syncs) < BURST, f"{len(folder_syncs)} fsyncs of new/ for {BURST} messages"
    sent = dict(sent_replies(trace))
    assert len(sent) == BURST
    for name, answered in sent.items():
        (file_sync,) = [c for c in trace.of("fsync") if c.args.endswith(f"/tmp/{name}>")]
        (rename,) = [c for c in trace.of("rename") if f"/new/{name}\"" in c.args]
        assert file_sync.result == 0 and file_sync.end < rename.start, name
        covering = [c for c in folder_syncs if rename.end < c.start and c.end < answered]
        assert covering, f"{name}: answered 250 without an fsync of new/ after its rename"


def test_a_lone_message_pays_one_fsync_of_new(make_server, tmp_path, threads_only):
    server = make_server()
    with traced(os.getpid(), ["fsync", "rename"], tmp_path / "strace.out") as trace:
        replies = burst(server, [7])
    assert replies[7][0] == 250
    calls = sorted(trace.calls, key=lambda c: c.start)
    kinds = [("rename" if c.name == "rename" else "fsync new/" if c.args.endswith("/new>") else "fsync file")
             for c in calls]
    assert kinds == ["fsync file", "rename", "fsync new/"]
    assert len({c.pid for c in calls}) == 1  # all in the one worker thread: no second hand-off


def test_a_failed_fsync_of_new_refuses_every_message_it_covered(make_server, tmp_path, threads_only):
    server = make_server(NO_SYNCFS)
    new = server.maildir / "new"
    # Slow as a sick disk (0.2 s), so that the sessions finishing meanwhile gather behind it.
    with traced(os.getpid(), ["fsync"], tmp_path / "strace.out", paths=[new],
                inject=["fsync:error=EIO:delay_enter=200000"]) as trace:
        replies = burst(server, range(BURST))
    assert set(replies.values()) == {(451, b"4.3.0 cannot store the message right now, try again later")}
    assert maildir_messages(server.maildir) == {}
    assert os.listdir(server.maildir / "tmp") == []
    failed = trace.of("fsync")
    assert failed and all("EIO" in c.error and "INJECTED" in c.error for c in failed)
    assert len(failed) < BURST, "the failing fsyncs were shared too"

    retried = burst(server, range(BURST))  # the disk is back: every retry is delivered, once
    assert all(code == 250 for code, _ in retried.values())
    assert delivered_numbers(server.maildir) == list(range(BURST))


def test_refused_and_accepted_batches_side_by_side(make_server, tmp_path, threads_only):
    """The first fsync of new/ in each worker thread fails (strace counts per thread), the others work."""
    server = make_server(NO_SYNCFS)
    new = server.maildir / "new"
    with traced(os.getpid(), ["fsync"], tmp_path / "strace.out", paths=[new],
                inject=["fsync:error=EIO:when=1"]) as trace:
        replies = burst(server, range(BURST))
    refused = sorted(n for n, (code, _) in replies.items() if code == 451)
    accepted = sorted(n for n, (code, _) in replies.items() if code == 250)
    assert refused and sorted(refused + accepted) == list(range(BURST))
    assert [c.result for c in trace.of("fsync")][:1] == [-1]
    assert delivered_numbers(server.maildir) == accepted  # each 250 once, no 451 delivered

    burst(server, refused)
    assert delivered_numbers(server.maildir) == list(range(BURST))


def test_a_timeout_while_waiting_for_the_fsync_takes_the_message_back(make_server, tmp_path, threads_only):
    """The hook's timeout strikes while new/ is still being fsynced: 451, and nothing stays."""
    server = make_server(NO_SYNCFS + "  timeout = 1\n")
    new = server.maildir / "new"
    with traced(os.getpid(), ["fsync"], tmp_path / "strace.out", paths=[new],
                inject=["fsync:delay_exit=3000000"]) as trace:
        replies = burst(server, [1, 2])
        assert {code for code, _ in replies.values()} == {451}
        # The fsync cannot be stopped: once it returns, what it was to cover is taken back.
        wait_until(lambda: not maildir_messages(server.maildir), 30, "both messages taken back")
    assert trace.of("fsync"), "the fsync was under way when the timeout struck"
    assert os.listdir(server.maildir / "tmp") == []


def test_a_timeout_while_the_files_are_fsynced_leaves_nothing(make_server, tmp_path, threads_only):
    """The hook's timeout strikes during each message's own fsync (every fsync takes 3 s): the
    lone session's whole delivery is in a worker thread, the others' file fsync only (their
    writes and rename are the greenlet's). Each gets 451; nothing stays in new/ or tmp/."""
    server = make_server("[[rcpt_ok]]\n  domains = example.test\n"
                         "[[queue/maildir]]\n  path = Maildir\n  timeout = 1\n")
    with traced(os.getpid(), ["fsync", "syncfs"], tmp_path / "strace.out",
                inject=["fsync:delay_exit=3000000", "syncfs:delay_exit=3000000"]) as trace:
        replies = burst(server, range(4))
        assert {code for code, _ in replies.values()} == {451}
        wait_until(lambda: not maildir_messages(server.maildir) and not os.listdir(server.maildir / "tmp"),
                   30, "every message taken back")
    assert any("/tmp/" in c.args for c in trace.of("fsync") + trace.of("syncfs")), "the files' syncs were under way"


# -- the fsyncs handed to the kernel (Linux AIO), the default where the system has it ------

def kernel_fsyncs(trace):
    """Each fsync handed to the kernel: (path, its io_submit call, the io_getevents call that
    read its completion back or None, the completion's result or the submission's error).
    A submission's data (caio's: its operation's address) is used again once it is reaped:
    its completion is the first one with that data read back after it was submitted."""
    completions = sorted(((call, data, int(res)) for call in trace.of("io_getevents")
                          for data, res in COMPLETED.findall(call.args)), key=lambda c: c[0].end)
    syncs = []
    for call in sorted(trace.of("io_submit"), key=lambda c: c.start):
        for data, path in SUBMITTED.findall(call.args):
            if call.result != 1:
                syncs.append((path, call, None, call.error))
                continue
            mine = next((c for c in completions if c[1] == data and c[0].end > call.end), None)
            if mine is not None:
                completions.remove(mine)
            syncs.append((path, call, mine and mine[0], mine and mine[2]))
    return syncs


def test_with_aio_a_burst_is_fsynced_by_the_kernel_in_the_maildir_order(make_server, tmp_path):
    assert kernel_fsync.available()
    server = make_server(NO_SYNCFS)
    new = server.maildir / "new"
    with traced(os.getpid(), ["fsync", "io_submit", "io_getevents", "rename", "sendto", "sendmsg"],
                tmp_path / "strace.out") as trace:
        replies = burst(server, range(BURST))
    assert all(code == 250 for code, _ in replies.values()), replies
    assert delivered_numbers(server.maildir) == list(range(BURST))
    assert os.listdir(server.maildir / "tmp") == []
    assert trace.of("fsync") == []  # no fsync system call: no worker thread took part
    syncs = kernel_fsyncs(trace)
    folder_syncs = [(submit, reaped) for path, submit, reaped, result in syncs if path == str(new) and result == 0]
    assert 1 <= len(folder_syncs) < BURST, f"{len(folder_syncs)} fsyncs of new/ for {BURST} messages"
    sent = dict(sent_replies(trace))
    assert len(sent) == BURST
    for name, answered in sent.items():
        (file_sync,) = [(submit, reaped, result) for path, submit, reaped, result in syncs if path.endswith(f"/tmp/{name}")]
        (rename,) = [c for c in trace.of("rename") if f"/new/{name}\"" in c.args]
        submit, reaped, result = file_sync
        assert result == 0 and reaped.end < rename.start, f"{name}: renamed before its fsync was done"
        covering = [r for s, r in folder_syncs if rename.end < s.start and r.end < answered]
        assert covering, f"{name}: answered 250 without an fsync of new/ after its rename"


def test_with_aio_a_lone_message_fsyncs_its_file_then_new_from_the_loop(make_server, tmp_path):
    server = make_server()
    with traced(os.getpid(), ["fsync", "io_submit", "io_getevents", "rename"], tmp_path / "strace.out") as trace:
        replies = burst(server, [7])
    assert replies[7][0] == 250
    assert trace.of("fsync") == []
    (file_sync, folder_sync) = sorted(kernel_fsyncs(trace), key=lambda s: s[1].start)
    (rename,) = trace.of("rename")
    assert "/tmp/" in file_sync[0] and folder_sync[0] == str(server.maildir / "new")
    assert file_sync[3] == 0 and folder_sync[3] == 0
    assert file_sync[2].end < rename.start and rename.end < folder_sync[1].start
    assert {c.pid for c in trace.calls} == {os.getpid()}  # the loop's thread: no hand-off at all


def test_with_aio_a_failed_file_fsync_refuses_that_message_only(make_server, tmp_path):
    """The first submission fails with EIO (some message's file): that message gets 451 and
    leaves nothing in tmp/ or new/; the others get 250; its retry is delivered once. (A
    shared syncfs that fails refuses every message it covered: test_queue_maildir_syncfs.py.)"""
    server = make_server(NO_SYNCFS)
    with traced(os.getpid(), ["io_submit"], tmp_path / "strace.out", inject=["io_submit:error=EIO:when=1"]) as trace:
        replies = burst(server, range(BURST))
    refused = sorted(n for n, (code, _) in replies.items() if code == 451)
    assert len(refused) == 1, replies
    assert "EIO" in trace.of("io_submit")[0].error and "/tmp/" in trace.of("io_submit")[0].args
    assert delivered_numbers(server.maildir) == sorted(set(range(BURST)) - set(refused))
    assert os.listdir(server.maildir / "tmp") == []
    burst(server, refused)
    assert delivered_numbers(server.maildir) == list(range(BURST))


def test_with_aio_a_failed_fsync_of_new_takes_the_message_back(make_server, tmp_path):
    """A lone message: its file's fsync is the first submission, new/'s the second, which fails."""
    server = make_server()
    with traced(os.getpid(), ["io_submit", "rename"], tmp_path / "strace.out",
                inject=["io_submit:error=EIO:when=2"]) as trace:
        replies = burst(server, [3])
    assert replies[3] == (451, b"4.3.0 cannot store the message right now, try again later")
    failed = [c for c in trace.of("io_submit") if "EIO" in c.error]
    assert len(failed) == 1 and f"<{server.maildir / 'new'}>" in failed[0].args
    assert trace.of("rename")  # it had been renamed into new/: taken back out
    assert maildir_messages(server.maildir) == {} and os.listdir(server.maildir / "tmp") == []
    assert burst(server, [3])[3][0] == 250
    assert delivered_numbers(server.maildir) == [3]

"""queue/maildir with one Maildir per recipient (virtual users): layout, safety, links, fsync.

The single-Maildir behaviour is tested with the first plugins (test_first_plugins.py);
this file covers ``mailbox`` (the per-recipient sub-path), ``create``, one file hard-linked
into several Maildirs, the copy when a link cannot cross file systems, and the order of
the durability system calls, watched with strace.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import tempfile
from pathlib import Path

import pytest

from qpgevent.core.errors import PluginLoadError
from qpgevent.testing.syscalls import traced

MESSAGE = b"Subject: virtual\r\nFrom: a@client.test\r\n\r\nhello\r\n"


def virtual(*options: str, first: bool = False) -> str:
    maildir = "[[queue/maildir]]\n  path = mail\n  mailbox = %d/%l\n" + "".join(f"  {o}\n" for o in options)
    rcpt_ok = "[[rcpt_ok]]\n  domains = example.test, other.test\n"
    return maildir + rcpt_ok if first else rcpt_ok + maildir


def send(server, recipients, message=MESSAGE):
    with smtplib.SMTP(server.host, server.port, local_hostname="client.example.test", timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail("sender@client.test")
        refused = {}
        for recipient in recipients:
            code, text = smtp.rcpt(recipient)
            if code != 250:
                refused[recipient] = (code, text)
        if len(refused) == len(recipients):
            return refused
        return smtp.data(message), refused


def files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_one_maildir_per_recipient_one_file_linked(make_server, tmp_path):
    server = make_server(virtual())
    (code, text), refused = send(server, ["bob@example.test", "Carol+news@Other.Test", "BOB@example.test"])
    assert code == 250 and not refused
    bob, carol = tmp_path / "mail/example.test/bob", tmp_path / "mail/other.test/carol+news"
    (bob_file,), (carol_file,) = files(bob / "new"), files(carol / "new")
    assert bob_file.name == carol_file.name == text.decode().split()[-1]
    assert os.path.samefile(bob_file, carol_file)  # one file, two names
    assert os.stat(bob_file).st_nlink == 2  # bob@ and BOB@ share a Maildir: one link there
    content = bob_file.read_bytes()
    assert content.startswith(b"Return-Path: <sender@client.test>\r\nReceived: ")
    assert content.endswith(MESSAGE)
    assert files(bob / "tmp") == files(carol / "tmp") == []
    assert (bob / "cur").is_dir() and (carol / "cur").is_dir()


def test_a_maildir_that_refuses_the_message_takes_it_back_from_the_others(make_server, tmp_path):
    """Issue 8's rule: never both a 4xx and a delivery. Bob's link is undone when Carol's fails."""
    server = make_server(virtual())
    carol_new = tmp_path / "mail/other.test/carol/new"
    for sub in ("tmp", "new", "cur"):
        (carol_new.parent / sub).mkdir(parents=True)
    # Immutable: even root cannot create a file there (chattr, e2fsprogs; tests run as root).
    subprocess.run(["chattr", "+i", str(carol_new)], check=True)
    try:
        (code, text), refused = send(server, ["bob@example.test", "carol@other.test"])
    finally:
        subprocess.run(["chattr", "-i", str(carol_new)], check=True)
    assert (code, text) == (451, b"4.3.0 cannot store the message right now, try again later")
    bob = tmp_path / "mail/example.test/bob"
    assert files(bob / "new") == files(bob / "tmp") == files(carol_new) == []
    (code, _), _ = send(server, ["bob@example.test", "carol@other.test"])  # the retry: once each
    assert code == 250 and len(files(bob / "new")) == len(files(carol_new)) == 1


def test_user_without_extension(make_server, tmp_path):
    server = make_server(virtual().replace("%d/%l", "%d/%u"))
    send(server, ["bob+lists@example.test"])
    assert len(files(tmp_path / "mail/example.test/bob/new")) == 1


def test_no_address_names_a_path_outside_the_root(make_server, tmp_path):
    server = make_server(virtual())
    evil = ['"../../../escape"@example.test', '".hidden"@example.test', '"a/b"@example.test']
    (code, _), _ = send(server, evil)
    assert code == 250
    root = tmp_path / "mail"
    made = sorted(str(p.relative_to(root)) for p in root.glob("*/*"))
    assert made == ["example.test/%2E.%2F..%2F..%2Fescape", "example.test/%2Ehidden",
                    "example.test/a%2Fb"]
    assert not (tmp_path / "escape").exists()


def test_postmaster_takes_our_own_name_as_its_domain(make_server, tmp_path):
    server = make_server(virtual())
    send(server, ["postmaster"])
    assert len(files(tmp_path / "mail/mx.example.test/postmaster/new")) == 1


def test_create_no_refuses_unknown_mailboxes_at_rcpt(make_server, tmp_path):
    for sub in ("new", "cur", "tmp"):
        (tmp_path / "mail/example.test/bob" / sub).mkdir(parents=True)
    server = make_server(virtual("create = no", first=True))
    (code, _), refused = send(server, ["bob@example.test", "nobody@example.test"])
    assert code == 250
    assert refused == {"nobody@example.test": (550, b"5.1.1 mailbox unavailable")}
    assert len(files(tmp_path / "mail/example.test/bob/new")) == 1
    assert not (tmp_path / "mail/example.test/nobody").exists()


def test_create_no_and_a_mailbox_removed_before_the_end_is_a_4xx(make_server, tmp_path):
    bob = tmp_path / "mail/example.test/bob"
    for sub in ("new", "cur", "tmp"):
        (bob / sub).mkdir(parents=True)
    server = make_server(virtual("create = no", first=True))
    with smtplib.SMTP(server.host, server.port, local_hostname="client.example.test", timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail("sender@client.test")
        assert smtp.rcpt("bob@example.test")[0] == 250
        shutil.rmtree(bob)
        assert smtp.data(MESSAGE) == (451, b"4.2.1 mailbox unavailable, try again later")


def test_another_file_system_gets_a_copy_of_its_own(make_server, tmp_path):
    """A link cannot cross file systems (EXDEV): that Maildir gets its own, fsynced copy."""
    elsewhere = Path(tempfile.mkdtemp(dir="/dev/shm"))  # tmpfs, where tmp_path is not
    try:
        (tmp_path / "mail").mkdir()
        (tmp_path / "mail/other.test").symlink_to(elsewhere)
        server = make_server(virtual())
        (code, _), _ = send(server, ["bob@example.test", "carol@other.test"])
        assert code == 250
        (bob_file,) = files(tmp_path / "mail/example.test/bob/new")
        (carol_file,) = files(elsewhere / "carol/new")
        assert not os.path.samefile(bob_file, carol_file)
        assert bob_file.read_bytes() == carol_file.read_bytes()
        assert files(elsewhere / "carol/tmp") == files(tmp_path / "mail/example.test/bob/tmp") == []
    finally:
        shutil.rmtree(elsewhere)


@pytest.mark.parametrize("pattern, error", [
    ("%d/%x", r"mailbox: unknown %x"),
    ("fixed/folder", r"mailbox: name a part of the address"),
])
def test_bad_patterns_are_load_errors(make_server, pattern, error):
    with pytest.raises(PluginLoadError, match=error):
        make_server(f"[[queue/maildir]]\n  path = mail\n  mailbox = {pattern}\n")


def test_fsync_before_250_for_every_maildir(make_server, tmp_path):
    """The file is fsynced once, linked into each new/ (renamed into the last), then each new/ is fsynced."""
    server = make_server(virtual())
    with traced(os.getpid(), ["fsync", "link", "linkat", "rename", "renameat", "renameat2"],
                tmp_path / "strace.out") as trace:
        (code, _), _ = send(server, ["a@example.test", "b@example.test", "c@other.test"])
        assert code == 250
    calls = sorted(trace.calls, key=lambda call: call.start)
    assert [call.name for call in calls] == ["fsync", "link", "link", "rename", "fsync", "fsync", "fsync"]
    assert all(call.result == 0 for call in calls)
    folders = sorted(call.args.split("<", 1)[1].rstrip(">") for call in calls[4:])
    assert folders == [str(tmp_path / f"mail/{box}/new") for box in ("example.test/a", "example.test/b", "other.test/c")]
    assert all(calls[3].end < call.start for call in calls[4:])  # new/ fsynced after the last link

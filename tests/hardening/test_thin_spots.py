"""Issue 21, the thin spots that planted bugs walked through.

- An empty password: ``check_hash("", ...)`` is False (even against a hash of ""), and
  AUTH PLAIN / LOGIN with an empty password are refused by the core before any auth
  plugin is asked, even one that would say OK to anything.
- SIZE on the running total: ``max_message_size`` larger than one read (64 KiB), a
  message one line over it sent in many small writes gets 552, nothing is delivered.
- The fsync order of queue/maildir seen from outside (strace on the real worker): the
  file in tmp/ is fsynced, renamed into new/, new/ is fsynced, and only then is 250 sent
  (each fsync the system call, or handed to the kernel with Linux AIO and read back).
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import pytest

from hardening_helpers import client_in_data, send_in_pieces

from qpgevent.testing import RawClient, maildir_messages, syscalls

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = str(ROOT / "tests" / "data" / "plugins")


def flat_file():
    spec = importlib.util.spec_from_file_location("flat_file_under_test", ROOT / "plugins" / "auth" / "flat_file.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_hash_never_takes_an_empty_password():
    module = flat_file()
    cheap = (1 << 4, 1, 1)
    assert module.check_hash("secret", module.make_hash("secret", cheap))
    assert not module.check_hash("", module.make_hash("secret", cheap))
    assert not module.check_hash("", module.make_hash("", cheap))


@pytest.fixture
def accept_any_password(make_server):
    """The real server whose one auth plugin says OK to any user and password."""
    return make_server("[[returns]]\n  hook = auth\n  code = OK\n[[rcpt_ok]]\n  domains = example.test\n",
                       plugin_dirs=PLUGIN_DIR, listen="127.0.0.1:0/plainauth", auth_failure_delay=0)


def auth(server, *lines: str) -> list[int]:
    client = RawClient(server)
    try:
        assert client.reply()[0] == 220
        assert client.command("EHLO c.test")[0] == 250
        return [client.command(line)[0] for line in lines]
    finally:
        client.close()


def b64(text: bytes) -> str:
    return base64.b64encode(text).decode()


def test_auth_plain_with_an_empty_password_is_refused_end_to_end(accept_any_password):
    assert auth(accept_any_password, "AUTH PLAIN " + b64(b"\0dave\0secret")) == [235]  # the plugin says OK
    assert auth(accept_any_password, "AUTH PLAIN " + b64(b"\0dave\0")) == [535]
    assert auth(accept_any_password, "AUTH PLAIN", b64(b"\0dave\0")) == [334, 535]
    assert auth(accept_any_password, "AUTH LOGIN", b64(b"dave"), "") == [334, 334, 535]


def test_size_is_enforced_on_the_running_total(make_server):
    limit = 200_000  # three reads of 64 KiB and more
    server = make_server(max_message_size=limit)
    line = b"x" * 98 + b"\r\n"
    header = b"Subject: big\r\n\r\n"
    body = line * ((limit - len(header)) // len(line) + 1)  # just over: one line more than fits
    assert limit < len(header + body) <= limit + len(line)
    client = client_in_data(server)
    try:
        send_in_pieces(client, header + body, 500)  # many small writes
        code, text = client.command(".")
        assert (code, text.split()[0]) == (552, "5.3.4"), text
        # The same message one line shorter fits and is delivered.
        for command in ("MAIL FROM:<a@c.test>", "RCPT TO:<bob@example.test>"):
            assert client.command(command)[0] == 250
        assert client.command("DATA")[0] == 354
        client.sock.sendall(header + body[len(line):])
        assert client.command(".")[0] == 250
    finally:
        client.close()
    [delivered] = maildir_messages(server.maildir).values()
    assert delivered.endswith(header + body[len(line):])


def test_maildir_fsyncs_file_then_renames_then_fsyncs_new_before_250(server_process, tmp_path):
    # Each fsync is over when its system call returns, or (Linux AIO, the default where the
    # kernel has it) when io_getevents reads its completion back.
    process = server_process(workers=1)
    [worker] = process.worker_pids()
    with syscalls.traced(worker, ["fsync", "fdatasync", "io_submit", "io_getevents", "rename", "sendto", "write"],
                         tmp_path / "strace.out", string_size=40) as trace:
        with process.smtp() as client:
            client.sendmail("a@c.test", ["bob@example.test"], b"Subject: order\r\n\r\nbody\r\n")
    [name] = maildir_messages(process.maildir)
    done = syscalls.syncs(trace)
    log = trace.log.read_text()
    [synced_file] = [sync for sync in done if sync.path.endswith(f"/tmp/{name}") and sync.result == 0]
    [renamed] = [call for call in trace.of("rename") if f"new/{name}" in call.args]
    synced_new = [sync for sync in done if sync.path.endswith("/Maildir/new") and sync.result == 0]
    [replied] = [call for call in trace.calls if call.name in ("sendto", "write") and '"250 2.0.0 Queued' in call.args]
    assert synced_file.done < renamed.start, log
    assert any(renamed.end < sync.start and sync.done < replied.start for sync in synced_new), log

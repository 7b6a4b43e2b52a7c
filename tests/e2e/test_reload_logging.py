"""SIGHUP applies a changed ``[logging]``, through the real ``python -m qpgevent``.

The master sets its logging up again before it forks the new workers, so they log as the
new config says: a protocol trace turned on by a reload is written (it was silently not,
while the level stayed the start's), in the new format, and lines below the new level are not. A log file that cannot be opened
fails the reload like any config mistake: the running workers stay, logging as before.
"""

from __future__ import annotations

import json
import signal
import socket

from qpgevent.testing import DEFAULT_PLUGINS, wait_until, write_ini

SENDER, RECIPIENT = "trace@client.test", "bob@example.test"
MESSAGE = b"Subject: traced\r\n\r\nhello\r\n"


def send_one(process, sender: str = SENDER) -> None:
    with process.smtp(timeout=10) as client:
        assert client.sendmail(sender, [RECIPIENT], MESSAGE) == {}


def test_hup_turns_the_trace_on_in_the_new_format_for_the_new_workers(server_process, tmp_path):
    process = server_process(workers=1)
    send_one(process, "before@client.test")
    wait_until(lambda: "before@client.test" in process.log(), 15, "the first session in the log")
    assert "qpgevent.trace" not in process.log()  # no trace at the start's settings

    write_ini(tmp_path, DEFAULT_PLUGINS, workers=1, logging_trace="yes", logging_format="json",
              logging_level="warning")
    first = process.worker_pids()
    process.process.send_signal(signal.SIGHUP)
    # The master says "reload complete" at info, below the new level: watch the processes.
    wait_until(lambda: (lambda now: len(now) == 1 and not set(now) & set(first))(process.worker_pids()),
               30, "the old worker replaced")
    send_one(process, "after@client.test")

    def traced() -> list[dict]:
        lines = [line for line in process.log().splitlines() if line.startswith("{")]
        return [entry for entry in map(json.loads, lines)
                if entry["logger"] == "qpgevent.trace" and "FROM:<after@client.test>" in entry["msg"]]
    entries = wait_until(traced, 15, "the traced MAIL FROM, as JSON")
    assert entries[0]["msg"].lower().startswith("c: mail from:") and entries[0]["level"] == "debug"
    wait_until(lambda: "S: 221 " in process.log(), 15, "the session's end, traced")
    assert "queued: from=<after@client.test>" not in process.log()  # info: below the new level
    assert process.terminate(20) == 0


def test_hup_with_a_log_file_that_cannot_be_opened_keeps_the_workers_and_the_logging(server_process, tmp_path):
    process = server_process(workers=1, banner="still the first")
    workers = sorted(process.worker_pids())
    write_ini(tmp_path, DEFAULT_PLUGINS, workers=1, banner="never seen",
              logging_file=str(tmp_path / "no-such-folder" / "qpgevent.log"))
    process.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload failed, the running workers stay: [logging]:" in process.log(), 30,
               "the failed reload")
    assert sorted(process.worker_pids()) == workers
    send_one(process, "still@client.test")
    wait_until(lambda: "still@client.test" in process.log(), 15, "the session, logged as before")
    with socket.create_connection(("127.0.0.1", process.port), timeout=10) as raw:
        assert b"still the first" in raw.makefile("rb").readline()
    assert process.terminate(20) == 0

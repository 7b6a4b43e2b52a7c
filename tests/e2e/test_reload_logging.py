"""SIGHUP applies a changed ``[logging]``, through the real ``python -m qpgevent``.

The master sets its logging up again before it forks the new workers, so they log as the
new config says: a protocol trace turned on by a reload is written (it was silently not,
while the level stayed the start's), in the new format, and lines below the new level are not. A log file that cannot be opened
fails the reload like any config mistake: the running workers stay, logging as before; so
do new workers that die before serving, after which the master logs as before again.
"""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

from qpgevent.testing import DEFAULT_PLUGINS, wait_until, write_ini

SENDER, RECIPIENT = "trace@client.test", "bob@example.test"
MESSAGE = b"Subject: traced\r\n\r\nhello\r\n"
PLUGIN_DIR = str(Path(__file__).resolve().parents[1] / "data" / "plugins")


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


def test_hup_whose_new_workers_die_before_serving_sets_the_master_logging_back(server_process, tmp_path):
    poison = tmp_path / "poison"
    plugins = DEFAULT_PLUGINS + f"[[post_fork_probe]]\n  die_if = {poison}\n"
    process = server_process(plugins, workers=1, plugin_dirs=PLUGIN_DIR)
    workers = process.worker_pids()
    poison.write_text("the new workers' pool cannot open\n")
    write_ini(tmp_path, plugins, workers=1, plugin_dirs=PLUGIN_DIR, logging_format="json")
    process.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "before serving; stopping the new workers" in process.log(), 30, "the failed reload")
    assert process.worker_pids() == workers

    # The master logs as the running workers' config says: a broken config's failure is plain text.
    (tmp_path / "qpsmtpd.ini").write_text("[server\n", encoding="utf-8")
    process.process.send_signal(signal.SIGHUP)
    failed = wait_until(lambda: [line for line in process.log().splitlines()
                                 if "reload failed, the running workers stay" in line], 30, "the second reload")
    assert not failed[0].startswith("{"), failed[0]

    # The same [logging] once the workers can start: applied, as the change it still is.
    poison.unlink()
    write_ini(tmp_path, plugins, workers=1, plugin_dirs=PLUGIN_DIR, logging_format="json")
    process.process.send_signal(signal.SIGHUP)
    wait_until(lambda: (lambda now: len(now) == 1 and not set(now) & set(workers))(process.worker_pids()),
               30, "the old worker replaced")
    send_one(process, "after@client.test")
    wait_until(lambda: [line for line in process.log().splitlines()
                        if line.startswith("{") and "after@client.test" in line], 15, "the session, in JSON")
    assert process.terminate(20) == 0


def test_hup_turns_syslog_on_for_the_new_workers(server_process, tmp_path):
    process = server_process(workers=1)
    address = str(tmp_path / "syslog.sock")  # our own receiver stands in for the syslog daemon's socket
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(15)
    try:
        write_ini(tmp_path, DEFAULT_PLUGINS, workers=1, logging_syslog="yes", logging_syslog_facility="local3",
                  logging_syslog_address=address)
        first = process.worker_pids()
        process.process.send_signal(signal.SIGHUP)
        wait_until(lambda: (lambda now: len(now) == 1 and not set(now) & set(first))(process.worker_pids()),
                   30, "the old worker replaced")
        (worker,) = process.worker_pids()
        send_one(process, "syslogged@client.test")
        for _ in range(200):  # the master's and the new worker's lines, up to the session's
            datagram = receiver.recv(65536).decode()
            if "syslogged@client.test" in datagram:
                break
        else:
            raise AssertionError("the session never reached syslog")
    finally:
        receiver.close()
    # RFC 3164 PRI: facility local3 (19) * 8 + severity info (6); sent by the new worker.
    assert datagram.startswith(f"<158>qpgevent[{worker}]: INFO "), datagram
    assert process.terminate(20) == 0

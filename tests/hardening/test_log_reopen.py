"""Issue 21, item 8: the log file is reopened on SIGUSR1 (log rotation), in the master and every worker.

The real ``python -m qpgevent`` with ``[logging] file``: the file is moved away (as
logrotate does), SIGUSR1 goes to the master; the master's lines and a worker's session
lines then go to a new file by the configured name, none to the moved one. (HUP is the
reload signal, so it cannot be the reopen one.)
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys

from qpgevent.testing import child_pids, wait_until, write_ini


def open_files(pid: int) -> set[str]:
    names = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            names.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return names


def test_sigusr1_reopens_the_log_file_everywhere(tmp_path):
    log_path = tmp_path / "qpgevent.log"
    ini = write_ini(tmp_path, workers=2, file=log_path)
    process = subprocess.Popen([sys.executable, "-m", "qpgevent", "-c", str(ini)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: log_path.exists() and "ready (pid" in log_path.read_text(), 30, "the server ready")
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text()).group(1))
        rotated = tmp_path / "qpgevent.log.1"
        os.rename(log_path, rotated)
        process.send_signal(signal.SIGUSR1)
        wait_until(lambda: log_path.exists() and "log file reopened" in log_path.read_text(), 30,
                   "the master writing to the new file")
        workers = child_pids(process.pid)
        assert len(workers) == 2  # none died of the signal
        # Every worker holds the new file open, and not the moved one any more.
        for pid in (process.pid, *workers):
            wait_until(lambda: open_files(pid) >= {str(log_path)} and str(rotated) not in open_files(pid), 30,
                       f"process {pid} reopened the log")
        before = rotated.read_text()
        # Every worker reopened: sessions served by either one log into the new file.
        for n in range(8):
            with smtplib.SMTP("127.0.0.1", port, local_hostname="c.test", timeout=10) as client:
                client.noop()
        wait_until(lambda: log_path.read_text().count("disconnect:") == 8, 30, "8 sessions in the new file")
        logged_by = set(re.findall(r"^\S+ \S+ (\d+) INFO qpgevent.session", log_path.read_text(), re.M))
        assert rotated.read_text() == before
        assert child_pids(process.pid) == workers
        assert logged_by <= {str(pid) for pid in workers}
    finally:
        process.terminate()
        assert process.wait(30) == 0

"""loadtest/distributed.py: a small distributed Locust run (a master and 2 workers, a few
hundred users) against a real qpgevent with 2 workers; every message answered 250 is in
the Maildir, counted here again from the files and Locust's CSV."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import locust  # noqa: F401  -- in the test extra; a missing one must fail, not skip

SCRIPT = Path(__file__).resolve().parents[2] / "loadtest" / "distributed.py"


def test_master_and_two_workers_deliver_every_message(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--users", "200", "--spawn-rate", "100", "--run-time", "6",
         "--stop-timeout", "60", "--locust-workers", "2", "--server-workers", "2", "--smtp-timeout", "60",
         "--out", str(out)], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "locust_stats.csv", newline="") as stats:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(stats)}
    answered = int(rows[("SMTP", "DATA")]["Request Count"])
    files = len(list((out / "Maildir" / "new").iterdir()))
    assert answered > 200 and files == answered   # nothing lost, nothing counted twice
    assert rows[("TXN", "clean")]["Failure Count"] == "0" and int(rows[("TXN", "clean")]["Request Count"]) == files
    # Both workers ran users, and the table the README keeps is printed.
    master = (out / "master.log").read_text()
    assert re.search(r"to 2 ready workers", master), master[-2000:]
    for number in (0, 1):
        assert "Traceback" not in (out / f"worker{number}.log").read_text()
    for step in ("CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "QUIT", "TXN (whole message)"):
        row = rf"^\| {re.escape(step)} \| \d+ \| 0 \| \d+ \| \d+ \| \d+ \|"
        assert re.search(row, result.stdout, re.MULTILINE), step
    assert "OK: every message answered 250 is in the Maildir" in result.stdout

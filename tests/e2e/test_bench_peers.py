"""tools/bench end to end with tiny numbers, against qpgevent and smtp-sink only (no peers needed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench"
SMTP_SOURCE, SMTP_SINK = "/usr/sbin/smtp-source", "/usr/sbin/smtp-sink"

# smtp-source and smtp-sink (Debian postfix) come with tools/install-test-deps: missing, these fail.
# queue size concurrency server msg/s min-max CPU ratio ratio-min-max
ROW = re.compile(r"^(maildir|discard) +(\d+) +(\d+) +(\S+) +(\d+) +(\d+)-(\d+) +(\d+\.\d+) +(\S+) +(\S+)$", re.MULTILINE)


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), "--python", sys.executable, "--workdir", str(tmp_path),
                           "--smtp-source", SMTP_SOURCE, "--smtp-sink", SMTP_SINK, *args],
                          capture_output=True, text=True, timeout=120)


def test_help_names_every_server():
    result = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for name in ("qpgevent-fsync", "smtp-sink", "aiosmtpd", "haraka2", "qpsmtpd", "idle"):
        assert name in result.stdout


def test_throughput_table_with_ratios_and_delivery_checked(tmp_path):
    result = bench(tmp_path, "--servers", "qpgevent,qpgevent-fsync,smtp-sink", "--messages", "20",
                   "--rounds", "2", "--concurrency", "1,4", "--sizes", "500", "--workers", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {(queue, int(concurrency), server): ratio
            for queue, _, concurrency, server, rate, _, _, _, ratio, _ in ROW.findall(result.stdout) if int(rate) > 0}
    assert set(rows) == {(queue, concurrency, server) for concurrency in (1, 4) for queue, server in
                         [("maildir", "qpgevent"), ("maildir", "qpgevent-fsync"),
                          ("discard", "qpgevent"), ("discard", "smtp-sink")]}
    assert rows[("maildir", 4, "qpgevent")] == "-" and float(rows[("discard", 4, "smtp-sink")]) > 0
    assert list(tmp_path.iterdir()) == []   # its temporary folder is gone


def test_idle_mode_holds_sessions_and_times_fresh_transactions(tmp_path):
    result = bench(tmp_path, "idle", "--servers", "qpgevent", "--connections", "50", "--probes", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^qpgevent +50 +\d+\.\d +\d+\.\d +\d+\.\d +-?\d+\.\d +\d+\.\d +\d+\.\d", result.stdout,
                     re.MULTILINE), result.stdout


def test_a_missing_peer_is_skipped_with_the_reason(tmp_path):
    result = bench(tmp_path, "--servers", "qpgevent,haraka", "--haraka", "/nonexistent/haraka",
                   "--messages", "5", "--rounds", "1", "--concurrency", "2", "--queues", "discard")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped haraka: program not found (/nonexistent/haraka)" in result.stderr

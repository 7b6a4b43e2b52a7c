"""The tools in tools/ run end to end: the smtp-source benchmark, with tiny numbers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "tools" / "bench_smtp_source.py"
SMTP_SOURCE = "/usr/sbin/smtp-source"
# config, concurrency, messages, seconds, messages/second, server CPU ms/message
ROW = re.compile(r"^(discard|maildir) +(\d+) +(\d+) +(\d+\.\d+) +(\d+\.\d+) +(\d+\.\d+)$", re.MULTILINE)

# smtp-source (Debian postfix) comes with tools/install-test-deps: missing, these fail.


def test_bench_smtp_source_runs_both_configs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH), "--python", sys.executable, "--smtp-source", SMTP_SOURCE,
         "--messages", "20", "--size", "300", "--concurrency", "1,4", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^config +concurrency +messages +seconds +messages/second +server CPU ms/message$",
                     result.stdout, re.MULTILINE)
    # Each row is printed twice: as it is measured, then in the final table.
    rows = {(config, int(concurrency), int(messages)) for config, concurrency, messages, _, rate, _
            in ROW.findall(result.stdout) if float(rate) > 0}
    assert rows == {(config, concurrency, 20) for config in ("discard", "maildir") for concurrency in (1, 4)}
    for concurrency in (1, 4):
        assert (f"maildir concurrency {concurrency}: 20 messages sent, 20 delivered in Maildir/new: OK"
                in result.stdout)
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone


def test_bench_smtp_source_fails_loudly_when_the_server_does_not_start(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH), "--python", "/bin/false", "--messages", "5", "--concurrency", "1",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "FAILED: server exited with status 1" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_bench_ab_drives_both_servers_at_once(tmp_path):
    # The same code on both sides: the tool runs, measures both, and prints the ratios.
    tool = REPO / "tools" / "bench_ab.py"
    result = subprocess.run(
        [sys.executable, str(tool), "--before-python", sys.executable, "--python", sys.executable,
         "--workers", "1", "--rounds", "1", "--messages", "20", "--concurrency", "4", "--size", "300",
         "--smtp-source", SMTP_SOURCE, "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^conc 4 round 1: before +\d+\.\d msg/s \d+\.\d\d CPU s/1000 \| after +\d+\.\d msg/s",
                     result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^conc 4 median after/before: msg/s \d+\.\d{3}, CPU per message \d", result.stdout, re.MULTILINE)
    assert list(tmp_path.iterdir()) == []  # its folders are gone


def test_bench_ab_takes_the_discard_queue(tmp_path):
    tool = REPO / "tools" / "bench_ab.py"
    result = subprocess.run(
        [sys.executable, str(tool), "--before-python", sys.executable, "--workers", "1", "--rounds", "1",
         "--messages", "10", "--concurrency", "2", "--size", "300", "--queue", "discard",
         "--smtp-source", SMTP_SOURCE, "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^conc 2 median after/before: msg/s \d+\.\d{3}", result.stdout, re.MULTILINE), result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tls", [[], ["--tls"]])  # --tls: in STARTTLS sessions of the C client, 2 each
def test_bench_instructions_counts_a_worker_under_callgrind(tmp_path, tls):
    # valgrind comes with tools/install-test-deps. Two short server lives, one worker each.
    tool = REPO / "tools" / "bench_instructions.py"
    result = subprocess.run(
        [sys.executable, str(tool), "--python", sys.executable, "--messages", "4,14", "--concurrency", "2",
         "--size", "300", "--smtp-source", SMTP_SOURCE, "--workdir", str(tmp_path), *tls],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"^after: ([\d,]+) instructions for 4 messages, ([\d,]+) for 14: ([\d,]+) per message$",
                      result.stdout, re.MULTILINE)
    assert match, result.stdout
    fewer, more, each = (int(group.replace(",", "")) for group in match.groups())
    assert 0 < fewer < more and each == round((more - fewer) / 10)
    assert list(tmp_path.iterdir()) == []

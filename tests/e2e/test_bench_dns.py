"""tools/bench_dns_checks.py runs end to end with tiny numbers, and prints what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "tools" / "bench_dns_checks.py"
SMTP_SOURCE = "/usr/sbin/smtp-source"
HEADER = re.compile(r"^checks +dns delay +concurrency +messages +seconds +messages/second +"
                    r"server CPU ms/message +DNS queries/message +front CPU %$", re.MULTILINE)
# checks, delay, concurrency, messages, seconds, messages/second, CPU ms/message, queries/message, front CPU %
ROW = re.compile(r"^(off|on|chain|serial) +(-|\d+ ms) +(\d+) +(\d+) +(\d+\.\d+) +(\d+\.\d+) +(\d+\.\d+) +(\d+\.\d) +(\d+)$",
                 re.MULTILINE)

# smtp-source (Debian postfix) and nsd come with tools/install-test-deps; without them
# these tests fail rather than skip.


def test_bench_dns_checks_prints_the_three_runs_side_by_side(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH), "--python", sys.executable, "--smtp-source", SMTP_SOURCE,
         "--messages", "30", "--size", "200", "--concurrency", "10", "--delays", "0,50",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(HEADER.findall(result.stdout)) == 2  # as the runs go, and in the final table
    rows = {(checks, delay, int(concurrency), int(messages)): float(queries)
            for checks, delay, concurrency, messages, _, rate, _, queries, _ in ROW.findall(result.stdout)
            if float(rate) > 0}
    assert set(rows) == {("off", "-", 10, 30), ("on", "0 ms", 10, 30), ("on", "50 ms", 10, 30)}
    assert rows[("off", "-", 10, 30)] == 0  # no DNS at all without the checks
    # Nothing cached: each message asks PTR, A, 3 DNSBL, MX, A and AAAA again.
    assert rows[("on", "0 ms", 10, 30)] == rows[("on", "50 ms", 10, 30)] == 8.0
    assert re.search(r"^concurrency 10, messages/second \(median of 1 rounds\): checks off \d+\.\d \| "
                     r"checks on, DNS 0 ms \d+\.\d \| checks on, DNS 50 ms \d+\.\d$", result.stdout,
                     re.MULTILINE), result.stdout
    assert "warning" not in result.stderr.lower(), result.stderr
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone


def test_the_chain_in_rounds_asks_spf_and_the_dkim_key_too_and_gives_ratios_per_round(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH), "--python", sys.executable, "--smtp-source", SMTP_SOURCE,
         "--messages", "20", "--size", "200", "--concurrency", "5", "--delays", "0",
         "--configs", "off,chain", "--rounds", "2", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    # SPF and DKIM refuse anything but a pass: a completed run had every message pass both.
    assert result.returncode == 0, result.stdout + result.stderr
    rows = ROW.findall(result.stdout)
    assert len([row for row in rows if row[0] == "chain"]) == 4  # 2 rounds, as they go and in the table
    # PTR, A, 3 DNSBL, MX, A, AAAA, the SPF TXT and the DKIM key: nothing cached.
    assert {float(row[7]) for row in rows if row[0] == "chain"} == {10.0}
    assert result.stdout.count("# round ") == 2
    assert re.search(r"^  checks chain, DNS 0 ms / checks off: \d+\.\d{3} \(\d+\.\d{3}-\d+\.\d{3}\)$",
                     result.stdout, re.MULTILINE), result.stdout
    assert list(tmp_path.iterdir()) == []


def test_bench_dns_checks_fails_loudly_when_the_server_does_not_start(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH), "--python", "/bin/false", "--smtp-source", SMTP_SOURCE,
         "--messages", "5", "--concurrency", "1", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "FAILED: server exited with status 1" in result.stderr
    assert list(tmp_path.iterdir()) == []

"""tools/bench's guard and anchors end to end, briefly: --quick with its record, --netns, Postfix.

Output shape and delivery checks only: the numbers of a loaded 2-core machine say nothing here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "tools" / "bench"
SMTP_SOURCE, SMTP_SINK = "/usr/sbin/smtp-source", "/usr/sbin/smtp-sink"
# queue size concurrency server msg/s min-max CPU ratio ratio-min-max
ROW = re.compile(r"^(maildir|discard) +(\d+) +(\d+) +(\S+) +(\d+) +(\d+)-(\d+) +(\d+\.\d+) +(\S+) +(\S+)$", re.MULTILINE)
SUMMARY = re.compile(r"ratio (\S+)/(\S+): median (\d+\.\d+), min-max (\d+\.\d+)-(\d+\.\d+) over (\d+) rounds "
                     r"\((spread known|maximum rounds|time budget spent|rounds as asked)\)")


def bench(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), "--python", sys.executable, "--workdir", str(tmp_path),
                           "--smtp-source", SMTP_SOURCE, "--smtp-sink", SMTP_SINK, *args],
                          capture_output=True, text=True, timeout=timeout)


def rows(output: str) -> dict[str, tuple[str, ...]]:
    return {row[3]: row for row in ROW.findall(output)}


def test_quick_prints_the_ratio_to_smtp_sink_over_rounds_and_records_it(tmp_path):
    record = tmp_path / "record" / "bench-quick.txt"
    result = bench(tmp_path, "--quick", "--record", str(record), "--messages", "60", "--warmup", "10",
                   "--max-rounds", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout)
    assert set(table) == {"qpgevent", "smtp-sink"}  # the guard's pair, discard, concurrency 100
    assert table["smtp-sink"][:3] == ("discard", "2048", "100") and table["qpgevent"][8] == "-"
    (summary,) = {m.group(0) for m in SUMMARY.finditer(result.stdout)}
    reference, peer, median, low, high, rounds, why = SUMMARY.search(summary).groups()
    assert (reference, peer) == ("qpgevent", "smtp-sink")
    assert 3 <= int(rounds) <= 4 and float(low) <= float(median) <= float(high)
    assert why in ("spread known", "maximum rounds")
    assert len(re.findall(r"^discard +2048 +100 round \d+  smtp-sink", result.stdout, re.MULTILINE)) == int(rounds)

    text = record.read_text()
    head = text.splitlines()
    assert head[0].startswith("# tools/bench ") and f"--quick --record {record}" in head[0]
    assert re.match(r"# \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, commit [0-9a-f]{12}(\+changes)?$", head[1]), head[1]
    assert summary in text and rows(text) == table
    assert list(tmp_path.iterdir()) == [tmp_path / "record"]  # its temporary folder is gone


def lab_namespaces() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def test_netns_mode_runs_everything_in_a_lab_namespace_and_removes_it(tmp_path):
    result = bench(tmp_path, "--netns", "--servers", "qpgevent,smtp-sink", "--queues", "discard",
                   "--messages", "30", "--warmup", "0", "--rounds", "1", "--concurrency", "5", "--sizes", "500")
    assert result.returncode == 0, result.stdout + result.stderr
    namespace = re.search(r"in network namespace (qn-(\d+)-\S+) \(its own loopback\)", result.stdout)
    assert namespace, result.stdout
    assert set(rows(result.stdout)) == {"qpgevent", "smtp-sink"}
    assert not {n for n in lab_namespaces() if n.startswith(f"qn-{namespace.group(2)}-")}


def test_postfix_is_the_durable_anchor_and_every_message_reaches_its_maildir(tmp_path):
    result = bench(tmp_path, "--servers", "qpgevent-fsync,postfix", "--queues", "maildir",
                   "--reference", "qpgevent-fsync", "--messages", "40", "--warmup", "0", "--rounds", "2",
                   "--concurrency", "4", "--sizes", "500")
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout)
    assert set(table) == {"qpgevent-fsync", "postfix"}
    assert float(table["postfix"][8]) > 0  # the ratio qpgevent-fsync/postfix
    # The delivery check: every message accepted is in Postfix's Maildir, waited for after the 250s.
    assert len(re.findall(r"round \d+  postfix .*; all 40 in the Maildir \d+\.\ds after the last 250$",
                          result.stdout, re.MULTILINE)) == 2
    assert "ratio qpgevent-fsync/postfix: median" in result.stdout


def test_help_names_the_guard_the_namespace_mode_and_the_anchor():
    result = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for option in ("--quick", "--netns", "--max-rounds", "--budget", "--record", "postfix"):
        assert option in result.stdout

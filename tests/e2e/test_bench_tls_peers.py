"""tools/bench_tls_peers.py runs end to end with tiny numbers (qpgevent and a private Postfix;
Haraka is not installed by tools/install-test-deps), and prints what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "tools" / "bench_tls_peers.py"
# measure, concurrency, server, rate, min-max, CPU ms/unit, client ms, ratio, ratio min-max
ROW = re.compile(r"^(sessions/s|messages/s) +4 +(qpgevent|postfix) +(\d+) +(\d+-\d+) +(\d+\.\d\d) +(\d+\.\d\d)"
                 r" +(-|\d+\.\d\d) *(\d+\.\d\d-\d+\.\d\d)?$", re.MULTILINE)


@pytest.mark.parametrize("client", ["python", "c"])
def test_bench_tls_peers_measures_starttls_sessions_and_messages_against_postfix(tmp_path, client):
    result = subprocess.run(
        [sys.executable, str(BENCH), "--python", sys.executable, "--servers", "qpgevent,postfix",
         "--concurrency", "4", "--sessions", "12", "--messages", "24", "--per-connection", "3",
         "--rounds", "2", "--client", client, "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {(measure, server): ratio for measure, server, *_, ratio, _ in ROW.findall(result.stdout)}
    assert set(rows) == {(m, s) for m in ("sessions/s", "messages/s") for s in ("qpgevent", "postfix")}, \
        result.stdout
    assert rows[("sessions/s", "qpgevent")] == "-" and rows[("sessions/s", "postfix")] != "-"
    assert result.stdout.count("  round: qpgevent ") == 4  # 2 rounds of each measure
    assert f"2 {client} client processes" in result.stdout
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone (the built C client with it)


def test_bench_tls_peers_refuses_an_unknown_server():
    result = subprocess.run([sys.executable, str(BENCH), "--servers", "qpgevent,exim"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown servers ['exim']" in result.stderr


def test_bench_instructions_refuses_messages_that_do_not_split_into_sessions():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench_instructions.py"), "--tls",
                             "--messages", "5,14", "--concurrency", "2"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "multiple of --concurrency" in result.stderr

"""tools/bench idle across workers and client processes (tools/bench_idle.py): the plan of
client processes and source addresses, the limits it checks, and a small real run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))
import bench_idle  # noqa: E402


def test_the_plan_spreads_sessions_over_clients_and_source_addresses():
    shares = bench_idle.plan(30000, 0, 5000)
    assert [count for count, _ in shares] == [15000, 15000]           # one client per 15,000 by default
    addresses = [address for _, sources in shares for address in sources]
    assert len(addresses) == len(set(addresses)) == 6                  # none shared between clients
    assert all(address.startswith("127.") for address in addresses)
    assert all(count / len(sources) <= 5000 for count, sources in shares)
    assert sum(count for count, _ in bench_idle.plan(10001, 3, 1000)) == 10001


def test_limits_that_cannot_hold_the_sessions_are_named():
    problems = bench_idle.check_limits(30000, 1, 2)
    assert problems and "--clients" in problems[0]
    assert any("more --workers" in line for line in bench_idle.check_limits(30000, 2, 1))
    assert bench_idle.check_limits(30000, 2, 2) == []


def test_a_small_run_over_two_workers_and_two_clients():
    result = subprocess.run(
        [sys.executable, str(TOOLS / "bench"), "idle", "--python", sys.executable, "--servers", "qpgevent",
         "--connections", "300", "--idle-workers", "2", "--clients", "2", "--per-address", "100", "--probes", "5"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "300 sessions from 2 client process(es), 4 source addresses" in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.startswith("qpgevent   held"))
    assert line.count("held 150 failed 0") == 2
    # The master holds no session; its two workers hold them all (plus a listener each).
    sockets = sorted(int(count) for count in re.findall(r"\d+:(\d+)", line.split("open sockets per process")[1]
                                                             .split(";")[0]))
    assert len(sockets) == 3 and sum(sockets[1:]) >= 300 and sockets[0] <= 5
    assert re.search(r"^qpgevent +300 ", result.stdout, re.MULTILINE)

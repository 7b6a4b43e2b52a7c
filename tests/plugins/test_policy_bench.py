"""tools/bench_policy.py runs end to end with tiny numbers: every configuration, a row each."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_policy.py"
ROW = re.compile(r"^(none|embedded|redis) +(\d+) +(\d+) +\d+\.\d+ +(\d+\.\d+) +\d+\.\d+ +(\d+\.\d+|-)$", re.MULTILINE)


def test_bench_policy_runs_every_config(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH), "--python", sys.executable, "--messages", "30", "--size", "200",
         "--concurrency", "5", "--ops", "20", "--workers", "1", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {(name, int(concurrency), int(messages), redis != "-") for name, concurrency, messages, rate, redis
            in ROW.findall(result.stdout) if float(rate) > 0}
    assert rows == {("none", 5, 30, False), ("embedded", 5, 30, False), ("redis", 5, 30, True)}
    assert re.search(r"^embedded \(thread\) +\d", result.stdout, re.MULTILINE)
    assert re.search(r"^embedded \(inline\) +\d", result.stdout, re.MULTILINE)
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone

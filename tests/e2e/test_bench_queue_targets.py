"""tools/bench_queue_targets.py runs end to end (small numbers) and checks what it claims."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_queue_targets.py"


def test_bench_queue_targets_small_run():
    done = subprocess.run([sys.executable, str(TOOL), "--messages", "30", "--concurrency", "5",
                           "--pool-size", "3", "--timeout", "120"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = re.findall(r"^(maildir|smtp_forward|lmtp) +5 +30 +[\d.]+ +([\d.]+) +[\d.]+ +30$", done.stdout, re.M)
    assert [name for name, _ in rows] == ["maildir", "smtp_forward", "lmtp"], done.stdout
    assert all(float(rate) > 0 for _, rate in rows)
    assert "every message accepted was delivered (90 in all): OK" in done.stdout


def test_bench_queue_targets_bad_options():
    done = subprocess.run([sys.executable, str(TOOL), "--targets", "carrier_pigeon"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--targets: choose from maildir, smtp_forward, lmtp" in done.stderr

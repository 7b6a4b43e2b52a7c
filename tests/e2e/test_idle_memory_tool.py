"""tools/idle_memory.py runs end to end, with tiny numbers: sessions held, parked, measured."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "idle_memory.py"
SUMMARY = re.compile(r"^40 parked sessions per batch: RSS (-?\d+) B/session \(-?\d+\.\d+ KiB\); "
                     r"traced (\d+) B/session in (\d+\.\d) blocks; gc objects (\d+\.\d)/session$", re.MULTILINE)


def test_idle_memory_measures_parked_sessions():
    result = subprocess.run([sys.executable, str(TOOL), "--sessions", "40", "--top", "40"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    match = SUMMARY.search(result.stdout)
    assert match is not None, result.stdout
    traced, objects = int(match.group(2)), float(match.group(4))
    # A parked session is some objects of its own (a Driver, a Conversation, ...): not nothing.
    assert traced > 500 and objects >= 10
    assert re.search(r"^ +\d+\.\d+ +\d+\.\d\d  \S+:\d+$", result.stdout, re.MULTILINE)  # the lines that allocated
    assert re.search(r"^ +1\.00  Conversation$", result.stdout, re.MULTILINE)  # one per session

"""Issue 21: a small bounded run of the socket-level fuzzer (tools/fuzz_server.py).

60 mutated sessions against the real ``python -m qpgevent`` (a child process of the
tool): no traceback, no worker death, every connection ended in time, nothing with a
bare CR or LF delivered, memory flat. The tool itself says what it checks; longer runs
are for the command line (``--sessions 2000``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "fuzz_server.py"


def test_sixty_mutated_sessions_break_nothing():
    result = subprocess.run([sys.executable, "-m", "gevent.monkey", str(TOOL), "--sessions", "60", "--seed", "21",
                             "--concurrency", "10"], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert "sessions 60;" in result.stdout and "0 problem(s)" in result.stdout, result.stdout
    assert "messages delivered" in result.stdout  # some of them were well-formed enough to get through

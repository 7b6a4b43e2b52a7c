"""tools/bench_directory.py runs end to end with tiny numbers: a row per integration, its folder gone."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_directory.py"
ROW = re.compile(r"^(\S+) +conc +(\d+): +(\d+) msg/s \(\d+-\d+\) +(\d+\.\d+) ms CPU/msg$", re.MULTILINE)


def test_bench_directory_runs_every_integration(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH), "--python", sys.executable, "--messages", "20",
                             "--concurrency", "5", "--rounds", "1", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {name for name, concurrency, rate, _ in ROW.findall(result.stdout) if concurrency == "5" and int(rate) > 0}
    assert rows == {"rcpt-baseline", "rcpt_dovecot", "rcpt_ldap", "rcpt_ldap-cached", "auth-baseline",
                    "auth/dovecot", "auth/ldap"}
    assert list(tmp_path.iterdir()) == []

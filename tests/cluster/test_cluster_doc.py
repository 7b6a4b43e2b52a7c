"""docs/cluster.md shows the HAProxy settings the cluster tests run with, and names real tests."""

from __future__ import annotations

import re
from pathlib import Path

from lab_cluster import HAPROXY

ROOT = Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "docs" / "cluster.md").read_text(encoding="utf-8")


def test_the_guide_shows_the_tested_haproxy_backend():
    tested = [line.strip() for line in HAPROXY.splitlines()
              if line.strip().startswith(("option ", "http-check ", "retries ", "balance ", "default-server "))]
    assert len(tested) >= 6
    shown = {line.strip() for line in GUIDE.splitlines()}
    for line in tested:
        assert line.format(admin=8025) in shown, f"docs/cluster.md lacks the tested line: {line}"


def test_the_tests_the_guide_names_exist():
    named = set(re.findall(r"`(test_\w+)`", GUIDE))
    assert len(named) >= 6
    defined = {match for path in (ROOT / "tests").rglob("test_*.py")
               for match in re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.M)}
    assert named <= defined, sorted(named - defined)

"""loadtest/locustfile.py runs headless against the real server and counts successes in its CSV."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

import locust  # noqa: F401  -- in the test extra; a missing one must fail, not skip

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"
LOCUST = Path(sys.executable).with_name("locust")


def run_locust(tmp_path: Path, port: int, name: str, *args: str) -> dict[tuple[str, str], dict[str, str]]:
    prefix = tmp_path / name
    result = subprocess.run(
        [str(LOCUST), "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4", "-t", "3s",
         "--host", f"smtp://127.0.0.1:{port}", "--csv", str(prefix), "--html", f"{prefix}.html",
         "--only-summary", *args],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(f"{prefix}.html").stat().st_size > 10000
    with open(f"{prefix}_stats.csv", newline="") as stats:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(stats)}


def test_clean_sender_steps_and_transactions_succeed(server_process, tmp_path):
    server = server_process()
    rows = run_locust(tmp_path, server.port, "clean", "--rcpts", "2", "--body-bytes", "3000", "CleanSender")
    transactions = rows[("TXN", "clean")]
    assert int(transactions["Request Count"]) > 10 and transactions["Failure Count"] == "0"
    for step in ("CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"):
        assert int(rows[("SMTP", step)]["Request Count"]) > 0, step
    assert int(rows[("SMTP", "RCPT")]["Request Count"]) >= 2 * int(transactions["Request Count"])
    assert len(os.listdir(server.maildir / "new")) >= int(transactions["Request Count"])


def test_bulk_pipelined_spammer_and_real_messages(server_process, tmp_path):
    server = server_process()
    messages = tmp_path / "messages"
    messages.mkdir()
    (messages / "1.eml").write_bytes(b"Subject: one\n\n.leading dot\nbody\n")
    (messages / "2.eml").write_bytes(b"Subject: two\r\n\r\nsecond\r\n")
    rows = run_locust(tmp_path, server.port, "bulk", "--pipelining", "--messages-dir", str(messages),
                      "BulkSender", "Spammer")
    assert int(rows[("TXN", "bulk")]["Request Count"]) > 10 and rows[("TXN", "bulk")]["Failure Count"] == "0"
    assert int(rows[("SMTP", "PIPELINE")]["Request Count"]) > 10
    assert rows[("TXN", "spam rejected")]["Failure Count"] == "0"
    delivered = [path.read_bytes() for path in (server.maildir / "new").iterdir()]
    assert any(b"\r\n.leading dot\r\n" in message or b"\n.leading dot\n" in message for message in delivered)


def test_starttls_and_auth_steps(server_process, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
    import tls_helpers
    tls_helpers.Certs(tmp_path).issue("server.pem")
    tls_helpers.write_users(tmp_path)
    user, password = next(iter(tls_helpers.USERS.items()))
    server = server_process(tls_helpers.AUTH_PLUGINS, tls_certificate="server.pem")
    rows = run_locust(tmp_path, server.port, "tls", "--tls", "--auth", f"{user}:{password}", "CleanSender")
    for step in ("STARTTLS", "AUTH", "TXN"):
        name = "clean" if step == "TXN" else step
        kind = "TXN" if step == "TXN" else "SMTP"
        assert int(rows[(kind, name)]["Request Count"]) > 0 and rows[(kind, name)]["Failure Count"] == "0", step

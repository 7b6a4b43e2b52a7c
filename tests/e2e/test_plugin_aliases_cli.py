"""``--check-config`` with qpsmtpd's plugin names: OK, the current names, one deprecation line each."""

from __future__ import annotations

import subprocess
import sys


def test_check_config_shows_the_current_names_and_a_note_per_old_one(tmp_path):
    ini = tmp_path / "qpsmtpd.ini"
    ini.write_text("\n".join([
        "[server]", "  me = mx.example.test", "  listen = 127.0.0.1:0", "  allow_root = yes", "[plugins]",
        "  [[check_earlytalker]]", "  [[check_badmailfrom]]", "    list = @spam.test",
        "  [[rcpt_ok]]", "    domains = example.test", "  [[queue/smtp-forward]]", "    routes = *:127.0.0.1:2526"]) + "\n")
    result = subprocess.run([sys.executable, "-m", "qpgevent", "-c", str(ini), "--check-config"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{ini}: OK"
    assert "plugins: earlytalker, badmailfrom, rcpt_ok, queue/smtp_forward" in lines
    deprecated = [line for line in lines if line.startswith("deprecated: ")]
    assert deprecated == [
        "deprecated: [[check_earlytalker]] is qpsmtpd's name of the earlytalker plugin: write [[earlytalker]] "
        "(the old name is deprecated)",
        "deprecated: [[check_badmailfrom]] is qpsmtpd's name of the badmailfrom plugin: write [[badmailfrom]] "
        "(the old name is deprecated)",
        "deprecated: [[queue/smtp-forward]] is qpsmtpd's name of the queue/smtp_forward plugin: write "
        "[[queue/smtp_forward]] (the old name is deprecated)"]
    assert "  connect: earlytalker" in lines and "  mail: badmailfrom" in lines
    assert "  queue: queue/smtp_forward" in lines


def test_an_option_the_plugin_does_not_use_is_one_line_and_exit_2(tmp_path):
    ini = tmp_path / "qpsmtpd.ini"
    lines = ["[server]", "  me = mx.example.test", "  listen = 127.0.0.1:0", "  allow_root = yes", "[plugins]",
             "  [[queue/maildir]]", "    path = Maildir", "    reject_type = temp"]
    ini.write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, "-m", "qpgevent", "-c", str(ini), "--check-config"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and result.stdout == ""
    [error] = result.stderr.splitlines()
    assert error.startswith(f"qpgevent: {ini}:8: [[queue/maildir]] reject_type: not used by queue/maildir (")
    assert "maildir.py), which refuses nothing by it; remove it" in error

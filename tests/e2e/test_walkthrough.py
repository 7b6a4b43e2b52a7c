"""docs/walkthrough.md, run end to end as a new user would, step by step.

Each step of the page is a code block after a ``<!-- step: NAME -->`` marker; this test
runs them in order: the shell commands as written (``qpgevent`` is this interpreter's
``python -m qpgevent``; ``~`` is a temporary home), the Python as written, the ini lines
edited into the copied config, and it checks the outputs the page shows. Only the ports
change (2525 and 8025 become free ones), so that tests can run side by side.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import smtplib
import subprocess
import sys
import urllib.request
from pathlib import Path

from qpgevent.testing import ServerProcess, maildir_messages, wait_until
from qpgevent.testing.redis_server import free_tcp_port

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "walkthrough.md").read_text(encoding="utf-8")
STEPS = {match.group(1): (match.group(2), match.group(4))
         for match in re.finditer(r"<!-- step: (\S+)(?: (\S+))? -->\n```(\w+)\n(.*?)```", PAGE, re.DOTALL)}


def step(name: str) -> str:
    return STEPS[name][1]


def run(command: str, cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """A command of the page: ``qpgevent ...`` as this interpreter's module, anything else by bash."""
    words = shlex.split(command)
    if words[0] == "qpgevent":
        argv = [sys.executable, "-m", "qpgevent", *words[1:]]
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HOME": str(home)}, stdin=subprocess.DEVNULL)


def test_the_walkthrough_runs_as_written(tmp_path):
    assert set(STEPS) >= {"copy", "admin", "start", "first-mail", "plugin", "dry-run", "dry-run-output", "enable",
                          "check", "check-output", "reload", "status", "hold", "kick", "kick-output"}
    smtp_port, admin_port = free_tcp_port(), free_tcp_port()

    def ported(text: str) -> str:
        return text.replace("2525", str(smtp_port)).replace("8025", str(admin_port))

    # 1. the shipped config, copied into a folder of one's own, the status page turned on
    copied = run(step("copy"), ROOT, tmp_path)
    assert copied.returncode == 0, copied.stderr
    mx = tmp_path / "mx"
    ini = mx / "qpsmtpd.ini"
    text = ini.read_text(encoding="utf-8")
    for admin_line in step("admin").strip().splitlines():
        admin_line = admin_line.strip()
        assert f"# {admin_line}" in text, "the shipped ini has the admin lines the page says to uncomment"
        text = text.replace(f"# {admin_line}", admin_line)
    ini.write_text(ported(text), encoding="utf-8")
    assert step("start").strip() == "qpgevent -c qpsmtpd.ini"
    server = ServerProcess(ini)
    try:
        # 2. the first mail, with the page's own Python
        exec(compile(ported(step("first-mail")), "walkthrough.md", "exec"), {})  # noqa: S102 - the page's code
        assert len(maildir_messages(mx / "spool" / "Maildir")) == 1

        # 3. the first plugin, in the site folder
        where, source = STEPS["plugin"]
        (mx / where).parent.mkdir(parents=True, exist_ok=True)
        (mx / where).write_text(source, encoding="utf-8")

        # 4. the dry run: refused, as shown
        dry = run(step("dry-run"), mx, tmp_path)
        assert dry.returncode == 1, dry.stdout + dry.stderr
        assert step("dry-run-output") in dry.stdout, dry.stdout

        # 5. on in the config, checked, and the running server reloaded
        config = ini.read_text(encoding="utf-8")
        assert config.count("\n[plugins]\n") == 1
        ini.write_text(config.replace("\n[plugins]\n", "\n[plugins]\n" + step("enable")), encoding="utf-8")
        check = run(step("check"), mx, tmp_path)
        assert check.returncode == 0, check.stderr
        assert check.stdout.startswith(f"{ini}: OK") and step("check-output") in check.stdout, check.stdout
        assert re.search(r"ready \(pid (\d+),", server.log()).group(1) == str(server.process.pid)
        reload = run(step("reload").replace(" N", f" {server.process.pid}"), mx, tmp_path)
        assert reload.returncode == 0, reload.stderr

        def refused() -> bool:
            with smtplib.SMTP("127.0.0.1", smtp_port, local_hostname="client.example.test") as client:
                client.ehlo()
                return client.mail("someone@spam.example") == (550, b"5.7.1 no mail from spam.example")

        wait_until(refused, 60, "the reloaded server refusing spam.example")

        # 6. the status page, for scripts and for a browser
        command = shlex.split(ported(step("status")))
        assert command[:3] == ["curl", "-s", "-H"] and command[3].startswith("Authorization: Bearer ")
        token = command[3].split()[-1]
        request = urllib.request.Request(command[4], headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            status = json.loads(response.read())
        assert status["totals"]["processes"] >= 1 and isinstance(status["sessions"], list)
        with urllib.request.urlopen(command[4].replace("status.json", f"status?token={token}"),
                                    timeout=30) as response:
            assert response.status == 200 and b'id="sessions"' in response.read()

        # 7. a session held open, kicked by its connection id
        held: dict = {}
        exec(compile(ported(step("hold")), "walkthrough.md", "exec"), held)  # noqa: S102 - the page's code

        def held_row():
            with urllib.request.urlopen(request, timeout=30) as response:
                rows = json.loads(response.read())["sessions"]
            return next((r for r in rows if r["helo"] == "slow.client.test"), None)

        row = wait_until(held_row, 30, "the held session on the page")
        kicked = run(ported(step("kick")).replace("1a2b.3", row["id"]), mx, tmp_path)
        assert kicked.returncode == 0, kicked.stderr
        assert kicked.stdout.startswith(step("kick-output").strip().replace("1a2b.3", row["id"])), kicked.stdout
        assert held["client"].getreply()[0] == 421  # said before the close
        held["client"].close()
        assert f"conn={row['id']} kicked by the operator" in server.log()
    finally:
        # 8. stop: gracefully, exit status 0
        assert server.terminate() == 0

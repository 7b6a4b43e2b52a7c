"""Per-listener plugin chains (``[listeners]``): one server, two listeners, two plugin lists.

The "MX" listener runs ``[plugins]`` (etrn, rcpt_ok, queue/maildir); the "submission"
listener leaves etrn out and has a badrcptto of its own. One InProcessServer serves both;
smtplib clients on each port must get each chain's answers. ``--check-config`` (a real
``python -m qpgevent``) must show both chains, and mistakes in ``[listeners]`` are
one-line config errors. The same through the pre-fork master (``ServerProcess``).
"""

from __future__ import annotations

import smtplib
import subprocess
import sys

import pytest

from qpgevent import config
from qpgevent.core.errors import ConfigError
from qpgevent.testing import InProcessServer, ServerProcess, write_ini
from qpgevent.testing.mta import free_port

COMMON = "[[etrn]]\n[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n  path = Maildir\n"


def two_listeners(tmp_path, listeners: str | None = None):
    mx, submission = free_port(), free_port()
    ini = write_ini(tmp_path, COMMON, listen=[f"127.0.0.1:{mx}", f"127.0.0.1:{submission}"])
    if listeners is None:
        listeners = (f"[[127.0.0.1:{submission}]]\n  without = etrn\n"
                     "  [[[badrcptto]]]\n    list = bob@example.test\n")
    with open(ini, "a", encoding="utf-8") as handle:
        handle.write("[listeners]\n" + listeners)
    return ini, mx, submission


@pytest.fixture
def server(tmp_path):
    ini, mx, submission = two_listeners(tmp_path)
    instance = InProcessServer(ini)
    try:
        yield instance, mx, submission
    finally:
        instance.stop(0.5)


def answers(port: int) -> tuple[bool, int, int]:
    """(ETRN offered, the reply to ETRN, the reply to RCPT TO bob@)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.test", timeout=30) as smtp:
        smtp.ehlo()
        offered = smtp.has_extn("etrn")
        etrn = smtp.docmd("ETRN", "example.test")[0]
        smtp.mail("a@client.test")
        return offered, etrn, smtp.rcpt("bob@example.test")[0]


def test_two_listeners_of_one_server_answer_with_their_own_chains(server):
    _, mx, submission = server
    assert answers(mx) == (True, 458, 250)
    assert answers(submission) == (False, 500, 550)
    assert answers(mx) == (True, 458, 250)  # the MX's chain is untouched by the other's


def test_the_master_s_workers_serve_each_listener_with_its_chain(tmp_path):
    ini, mx, submission = two_listeners(tmp_path)
    ini.write_text(ini.read_text(encoding="utf-8").replace("[server]\n", "[server]\n  workers = 2\n", 1),
                   encoding="utf-8")
    process = ServerProcess(ini)
    try:
        for _ in range(3):  # whichever worker accepts, the listener decides the chain
            assert answers(submission) == (False, 500, 550)
            assert answers(mx) == (True, 458, 250)
    finally:
        assert process.terminate() == 0


def test_check_config_shows_each_listener_s_chain(tmp_path):
    ini, mx, submission = two_listeners(tmp_path)
    result = subprocess.run([sys.executable, "-m", "qpgevent", "-c", str(ini), "--check-config"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "plugins: etrn, rcpt_ok, queue/maildir" in result.stdout
    assert f"listener 127.0.0.1:{submission}: plugins: badrcptto, rcpt_ok, queue/maildir" in result.stdout
    assert f"listener 127.0.0.1:{mx}" not in result.stdout


def test_only_replaces_the_common_plugins(tmp_path):
    ini, _, submission = two_listeners(tmp_path, "")
    text = ini.read_text(encoding="utf-8")
    ini.write_text(text + f"[[127.0.0.1:{submission}]]\n  only = yes\n  [[[rcpt_ok]]]\n    domains = other.test\n",
                   encoding="utf-8")
    instance = InProcessServer(ini)
    try:
        with smtplib.SMTP("127.0.0.1", submission, local_hostname="client.example.test", timeout=30) as smtp:
            smtp.ehlo()
            assert not smtp.has_extn("etrn")
            smtp.mail("a@client.test")
            assert smtp.rcpt("bob@example.test")[0] != 250  # example.test is the MX's, not ours
            assert smtp.rcpt("carol@other.test")[0] == 250
    finally:
        instance.stop(0.5)


@pytest.mark.parametrize("listeners, problem", [
    ("[[127.0.0.1:1]]\n  without = etrn\n", "not one of [server] listen"),
    ("[[{submission}]]\n  without = nosuch\n", "without: nosuch is not in [plugins]"),
    ("[[{submission}]]\n  instead = etrn\n", "instead: unknown key"),
    ("[[{submission}]]\n  only = perhaps\n", "only: not yes or no"),
])
def test_mistakes_in_listeners_are_config_errors(tmp_path, listeners, problem):
    ini, _, submission = two_listeners(tmp_path, "")
    ini.write_text(ini.read_text(encoding="utf-8") + listeners.format(submission=f"127.0.0.1:{submission}"),
                   encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[listeners\] \[\[.*\]\]: " + problem.replace("[", r"\[")
                       .replace("]", r"\]")):
        config.load(str(ini))

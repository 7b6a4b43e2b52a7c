"""The command line as an operator meets it: help, version, exit codes, check-config's words.

Every test runs the real ``python -m qpgevent`` (or the real tool) in a child process and
reads what a shell would: standard output, standard error, the exit status.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from qpgevent import __version__
from qpgevent.server.cli import EXIT_CODES, build_parser

ROOT = Path(__file__).resolve().parents[2]
HEAD = "[server]\n  me = mx.example.test\n  listen = 127.0.0.1:0\n  allow_root = yes\n[dns]\n  reverse_lookup = no\n"
ACCEPT = "[plugins]\n  [[rcpt_ok]]\n    domains = example.test\n  [[queue/discard]]\n"


def qpgevent(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qpgevent", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "100"})


def ini(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "qpsmtpd.ini"
    path.write_text(text, encoding="utf-8")
    return path


def commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser: ("plugin",), ("plugin", "test"), ("store", "list")..."""
    found = []
    for action in parser._actions:  # noqa: SLF001 - argparse keeps its sub-parsers here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                found.append((*words, name))
                found += commands(sub, (*words, name))
    return found


# -- help and version -----------------------------------------------------------------

def test_help_names_every_command_and_the_exit_codes():
    result = qpgevent("--help")
    assert result.returncode == 0
    assert "plugin test" in result.stdout
    for path in commands(build_parser()):
        parent = qpgevent(*path[:-1], "--help")
        assert parent.returncode == 0, (path, parent.stderr)
        assert f"    {path[-1]} " in parent.stdout, (path, parent.stdout)
    for code in EXIT_CODES:
        assert f"\n  {code}  " in result.stdout


@pytest.mark.parametrize("words", [("plugin",), ("store",), ("plugin", "test"), ("store", "list")],
                         ids=" ".join)
def test_every_command_prints_its_full_help_and_exits_0(words):
    result = qpgevent(*words, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: qpgevent {' '.join(words)} ")
    assert "options:" in result.stdout


def test_a_command_without_its_subcommand_is_a_usage_error():
    result = qpgevent("plugin")
    assert result.returncode == 2
    assert "usage: qpgevent plugin" in result.stderr and "required: COMMAND" in result.stderr


def test_version():
    result = qpgevent("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"qpgevent {__version__}")


def test_new_plugin_tool_is_executable_as_documented(tmp_path):
    tool = ROOT / "tools" / "new_plugin.py"
    if (ROOT / ".git").exists():
        mode = subprocess.run(["git", "ls-files", "-s", "tools/new_plugin.py"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.split()[0]
        assert mode == "100755", "commit tools/new_plugin.py with its executable bit"
    result = subprocess.run([str(tool), "sender_block", "--dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "qpgevent-sender-block" / "qpgevent_sender_block.py").is_file()


# -- plugin test ------------------------------------------------------------------------

def test_plugin_test_takes_angle_brackets_and_the_null_sender(tmp_path):
    assert "'<>' or '' is the null sender" in " ".join(qpgevent("plugin", "test", "--help").stdout.split())
    result = qpgevent("plugin", "test", "rcpt_ok", "-o", "domains=example.test", "--from", "<>",
                      "--to", "<bob@example.test>", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "C: MAIL FROM:<>\nS: 250 " in result.stdout
    assert "C: RCPT TO:<bob@example.test>\n" in result.stdout


def test_an_unknown_plugin_named_on_the_command_line_is_reported_as_such(tmp_path):
    result = qpgevent("plugin", "test", "no_such_plugin", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("qpgevent: plugin test: unknown plugin 'no_such_plugin' (looked in ")
    assert ":?:" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("option, expected", [
    ("domians=example.test", "qpgevent: --option domians=example.test: [[rcpt_ok]] domians: unknown option"),
    ("reject=sometimes", "qpgevent: --option reject=sometimes: [[rcpt_ok]] reject: "),
])
def test_a_mistake_in_an_option_is_blamed_on_the_option_not_on_the_ini(tmp_path, option, expected):
    path = ini(tmp_path, HEAD + ACCEPT)
    result = qpgevent("plugin", "test", "rcpt_ok", "-c", str(path), "-o", option, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(expected), result.stderr
    assert str(path) not in result.stderr


def test_plugin_test_exit_status_says_whether_the_message_was_accepted(tmp_path):
    path = ini(tmp_path, HEAD + ACCEPT)
    assert qpgevent("plugin", "test", "-c", str(path), "--to", "bob@example.test").returncode == 0
    assert qpgevent("plugin", "test", "-c", str(path), "--to", "bob@elsewhere.test").returncode == 1


# -- config checks ------------------------------------------------------------------------

@pytest.mark.parametrize("section, expected", [
    ("[server]\n  me = mx.example.test\n  shutdown_timeout = soon\n[plugins]\n",
     "[server] shutdown_timeout: the value \"soon\" is of the wrong type. (expected a number)"),
    ("[server]\n  me = mx.example.test\n[limits]\n  max_recipients = many\n[plugins]\n",
     "[limits] max_recipients: the value \"many\" is of the wrong type. (expected an integer)"),
    (HEAD + "[plugins]\n  [[queue/maildir]]\n    path = Maildir\n    fsync = maybe\n",
     "[[queue/maildir]] fsync: the value \"maybe\" is of the wrong type. (expected yes or no"),
    (HEAD + "[plugins]\n  [[naughty]]\n    reject_at = connect\n",
     "[[naughty]] reject_at: the value \"connect\" is unacceptable. (expected one of: mail, rcpt, data)"),
])
def test_type_errors_name_the_expected_type(tmp_path, section, expected):
    result = qpgevent("-c", str(ini(tmp_path, section)), "--check-config")
    assert result.returncode == 2
    assert expected in result.stderr, result.stderr


def test_check_config_warns_that_without_a_queue_plugin_every_message_gets_451(tmp_path):
    result = qpgevent("-c", str(ini(tmp_path, HEAD + "[plugins]\n  [[rcpt_ok]]\n")), "--check-config")
    assert result.returncode == 0
    assert ("warning: no queue plugin (such as queue/maildir): every message will get 451 4.3.0 "
            "Queuing declined or disabled; try again later") in result.stdout
    queued = qpgevent("-c", str(ini(tmp_path, HEAD + ACCEPT)), "--check-config")
    assert queued.returncode == 0 and "warning" not in queued.stdout


def test_check_config_keeps_the_listener_flags(tmp_path):
    # --check-config loads the certificate (one that does not load is a config error).
    trustme.CA().issue_cert("mx.example.test").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    text = HEAD.replace("listen = 127.0.0.1:0", "listen = 127.0.0.1:2525, 127.0.0.1:465/smtps, "
                        "127.0.0.1:587/submission, [::1]:2526/plainauth, 127.0.0.1:2527/tls")
    result = qpgevent("-c", str(ini(tmp_path, text + "[tls]\n  certificate = cert.pem\n" + ACCEPT)), "--check-config")
    assert result.returncode == 0, result.stderr
    assert ("listen: 127.0.0.1:2525, 127.0.0.1:465/smtps, 127.0.0.1:587/submission, [::1]:2526/plainauth, "
            "127.0.0.1:2527/tls\n") in result.stdout


@pytest.fixture
def busy_port():
    """A port something else already listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield holder.getsockname()[1]


def test_a_busy_port_does_not_hide_a_plugin_error(tmp_path, busy_port):
    text = HEAD.replace("127.0.0.1:0", f"127.0.0.1:{busy_port}") + ACCEPT + "  [[no_such_plugin]]\n"
    result = qpgevent("-c", str(ini(tmp_path, text)))
    assert result.returncode == 2, result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("qpgevent:")]
    assert "unknown plugin 'no_such_plugin'" in error, result.stderr
    assert "cannot listen" not in result.stderr


def test_a_busy_port_with_a_good_config_cannot_start_exit_1(tmp_path, busy_port):
    result = qpgevent("-c", str(ini(tmp_path, HEAD.replace("127.0.0.1:0", f"127.0.0.1:{busy_port}") + ACCEPT)))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("qpgevent: cannot listen: "), result.stderr


def test_the_queue_command_after_the_server_options_reads_that_ini(tmp_path):
    # "qpgevent -c INI queue list" reached argparse's queue entry, which had no handler: a
    # traceback. Now the queue tools get the ini named before the command.
    config = ini(tmp_path, "[plugins]\n  [[rcpt_ok]]\n")
    for words in (("-c", str(config), "queue", "list"), ("queue", "-c", str(config), "list")):
        done = qpgevent(*words)
        assert done.returncode == 2, done
        assert "Traceback" not in done.stderr
        assert done.stderr.startswith(f"qpgevent queue: {config}: no [[queue/outbound]] in [plugins]"), done.stderr

"""The real ``qpgevent`` command on good and bad configurations.

A bad config or plugin: exit status 2 and exactly one line on standard error, naming
file, line and key, never a traceback. ``--check-config`` prints the plugin and hook
order and exits 0. Relative paths in the ini resolve against its folder whatever the
working directory, and ``--listen`` (repeatable) replaces ``[server] listen``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qpgevent.engine.hooks import HOOKS
from qpgevent.testing import ServerProcess, maildir_messages

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO / "tests" / "data" / "plugins"
# allow_root: the tests may run as root (a container); serving as root needs saying so.
HEAD = ["[server]", "  me = mx.example.test", "  listen = 127.0.0.1:0", f"  plugin_dirs = {PLUGIN_DIR}",
        "  allow_root = yes"]


def write(directory: Path, lines: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "qpsmtpd.ini"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def line_of(lines: list[str], text: str) -> int:
    return next(i for i, line in enumerate(lines, 1) if text in line)


def qpgevent(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qpgevent", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


#: id -> (ini lines, the text of the line the error must point at, the key it must name)
CASES = {
    "unknown plugin": (HEAD + ["[plugins]", "  [[rcpt_ok]]", "  [[no_such_plugin]]"],
                       "[[no_such_plugin]]", "no_such_plugin"),
    "plugin fails to import": (HEAD + ["[plugins]", "  [[broken_import]]"], "[[broken_import]]", "broken_import"),
    "import error of several lines": (HEAD + ["[plugins]", "  [[import_error_lines]]"],
                                      "[[import_error_lines]]", "a second line of explanation"),
    "two Plugin classes": (HEAD + ["[plugins]", "  [[two_classes]]"], "[[two_classes]]", "First, Second"),
    "unknown hook": (HEAD + ["[plugins]", "  [[hook_typo]]"], "[[hook_typo]]", "hook_mial"),
    "wrong hook signature": (HEAD + ["[plugins]", "  [[bad_signature]]"], "[[bad_signature]]", "hook_mail"),
    "bad option type": (HEAD + ["[plugins]", "  [[queue/maildir]]", "    fsync = maybe"], "fsync", "fsync"),
    "unknown option": (HEAD + ["[plugins]", "  [[rcpt_ok]]", "    domian = x.test"], "domian", "domian"),
    "unknown key in limits": (HEAD + ["[limits]", "  max_conections = 5", "[plugins]"],
                              "max_conections", "max_conections"),
    "wrong type in server": (HEAD + ["  shutdown_timeout = soon", "[plugins]"],
                             "shutdown_timeout", "shutdown_timeout"),
    "unknown section": (HEAD + ["[limts]", "  max_connections = 5", "[plugins]"], "[limts]", "limts"),
    "configobj syntax error": (HEAD + ["[limits", "[plugins]"], "[limits", "[limits"),
    "plugins scalar instead of section": (HEAD + ["[plugins]", "  rcpt_ok = yes"], "rcpt_ok = yes", "rcpt_ok"),
}


@pytest.mark.parametrize("check", [False, True], ids=["run", "check-config"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_exits_2_with_one_line(tmp_path: Path, case: str, check: bool) -> None:
    lines, at, key = CASES[case]
    path = write(tmp_path, lines)
    result = qpgevent("-c", str(path), *(["--check-config"] if check else []), cwd=tmp_path)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    error_lines = result.stderr.splitlines()
    assert len(error_lines) == 1, result.stderr
    assert error_lines[0].startswith(f"qpgevent: {path}:{line_of(lines, at)}: "), error_lines[0]
    assert key in error_lines[0]
    assert result.stdout == ""


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = qpgevent("-c", str(tmp_path / "absent.ini"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()] and "absent.ini" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_listen_argument_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + ["[plugins]"])
    result = qpgevent("-c", str(path), "--listen", "nowhere", "--check-config")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "nowhere" in result.stderr
    assert "--listen" in result.stderr  # the flag is to blame, not the ini file
    assert "Traceback" not in result.stderr


# --- --check-config ----------------------------------------------------------------------


def test_check_config_prints_plugin_and_hook_order(tmp_path: Path) -> None:
    lines = HEAD + ["[plugins]", "  [[hosts_allow]]", "  [[relay]]", "  [[rcpt_ok]]", "    domains = example.test",
                    "  [[recorder]]", "  [[queue/discard]]", "  [[rcpt_ok:2]]"]
    path = write(tmp_path, lines)
    result = qpgevent("-c", str(path), "--check-config")
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0] == f"{path}: OK"
    assert out[1] == "listen: 127.0.0.1:0"
    assert out[2] == "plugins: hosts_allow, relay, rcpt_ok, recorder, queue/discard, rcpt_ok:2"
    hooks = dict(line.strip().split(": ", 1) for line in out[3:])
    assert hooks["pre_connection"] == "hosts_allow"
    assert hooks["connect"] == "relay"
    assert hooks["rcpt"] == "relay -> rcpt_ok -> rcpt_ok:2"
    assert hooks["queue"] == "queue/discard"
    for hook in ("reset_transaction", "disconnect", "post_connection", "deny", "ok", "queue_post"):
        assert hooks[hook] == "recorder"
    assert list(hooks) == [hook for hook in HOOKS if hook in hooks], "hooks are listed in firing order"
    assert "mail" not in hooks


def test_check_config_does_not_start_a_server(tmp_path: Path) -> None:
    # A listen address nobody could bind: --check-config must not try.
    path = write(tmp_path, ["[server]", "  listen = 192.0.2.1:25", "[plugins]", "  [[queue/discard]]"])
    result = qpgevent("-c", str(path), "--check-config")
    assert result.returncode == 0, result.stderr
    assert "listen: 192.0.2.1:25" in result.stdout.splitlines()


def test_shipped_config_passes_check_config(tmp_path: Path) -> None:
    result = qpgevent("-c", str(REPO / "qpsmtpd.ini"), "--check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{REPO / 'qpsmtpd.ini'}: OK"
    assert "  queue: queue/maildir" in result.stdout.splitlines()
    assert list(tmp_path.iterdir()) == [], "nothing is created in the working directory"


# --- relative paths -----------------------------------------------------------------------


def relative_config(conf: Path) -> Path:
    (conf / "my-plugins").mkdir(parents=True)
    (conf / "rcpthosts").write_text("listed.test\n")
    (conf / "my-plugins" / "local_one.py").write_text(
        '"""local_one: a plugin found through a relative plugin_dirs."""\n'
        "from qpgevent.plugin import Plugin\n\n\nclass LocalOne(Plugin):\n    pass\n")
    return write(conf, [
        "[server]", "  me = mx.example.test", "  listen = 127.0.0.1:0", "  allow_root = yes",
        "  spool_dir = spool/tmp", "  plugin_dirs = my-plugins",
        "[plugins]", "  [[local_one]]",
        "  [[rcpt_ok]]", "    rcpthosts = rcpthosts",
        "  [[queue/maildir]]", "    path = Maildir", "    fsync = no"])


def test_relative_paths_resolve_against_the_ini_folder_in_check_config(tmp_path: Path) -> None:
    path = relative_config(tmp_path / "conf")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # rcpt_ok reads rcpthosts at load time, and local_one is only in my-plugins: both
    # fail (exit 2) if resolved against the working directory.
    result = qpgevent("-c", str(path), "--check-config", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert "plugins: local_one, rcpt_ok, queue/maildir" in result.stdout
    result = qpgevent("-c", "../conf/qpsmtpd.ini", "--check-config", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert list(elsewhere.iterdir()) == []


def test_relative_paths_resolve_against_the_ini_folder_when_serving(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    path = relative_config(conf)
    server = ServerProcess(path)  # our working directory is the checkout, not conf/
    try:
        with server.smtp() as client:
            assert client.sendmail("a@client.test", ["x@listed.test"], b"Subject: r\r\n\r\nrelative\r\n") == {}
    finally:
        assert server.terminate() == 0
    assert (conf / "spool" / "tmp").is_dir()
    (message,) = maildir_messages(conf / "Maildir").values()
    assert message.endswith(b"\r\n\r\nrelative\r\n")
    assert not (Path.cwd() / "Maildir").exists()


# --- --listen ---------------------------------------------------------------------------


def test_listen_option_overrides_the_ini_and_repeats(tmp_path: Path) -> None:
    path = write(tmp_path, ["[server]", "  me = mx.example.test", "  listen = 192.0.2.1:25", "  allow_root = yes",
                            "[plugins]", "  [[queue/discard]]"])
    result = qpgevent("-c", str(path), "--listen", "127.0.0.1:0", "-l", "[::1]:0", "--check-config")
    assert result.returncode == 0, result.stderr
    assert "listen: 127.0.0.1:0, [::1]:0" in result.stdout.splitlines()
    server = ServerProcess(path, "--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0")
    try:
        assert len(server.ports) == 2 and len(set(server.ports)) == 2
        for port in server.ports:
            server.port = port
            with server.smtp() as client:
                assert client.noop()[0] == 250
    finally:
        assert server.terminate() == 0
    assert "192.0.2.1" not in server.log()


def test_without_listen_option_the_ini_address_is_used(tmp_path: Path) -> None:
    # The counterpart of the test above: the same ini, no --listen, and the server tries
    # (and fails) to bind the documentation address of [server] listen.
    path = write(tmp_path, ["[server]", "  me = mx.example.test", "  listen = 192.0.2.1:25", "  allow_root = yes",
                            "[plugins]", "  [[queue/discard]]"])
    result = qpgevent("-c", str(path))
    assert result.returncode == 1, result
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("check", [False, True], ids=["run", "check-config"])
def test_a_certificate_that_does_not_load_exits_2(tmp_path: Path, check: bool) -> None:
    """A [tls] certificate that is not one fails the start, and so the check too (not only at STARTTLS)."""
    garbage = tmp_path / "cert.pem"
    garbage.write_text("not a certificate\n", encoding="utf-8")
    path = write(tmp_path, HEAD + ["[tls]", f"  certificate = {garbage}", f"  key = {garbage}", "[plugins]",
                                   "  [[rcpt_ok]]"])
    result = qpgevent("-c", str(path), *(["--check-config"] if check else []), cwd=tmp_path)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"qpgevent: {path}: [tls]: cannot load the certificates"), result.stderr
    assert result.stdout == ""

"""The README's promises, checked: its example plugin works as written, its commands exist."""

import re
import subprocess
from pathlib import Path

README = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")


def code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, re.DOTALL)


def test_readme_opens_with_the_two_commands():
    run, test = code_blocks("sh")[:2]
    assert "qpgevent -c qpsmtpd.ini" in run
    assert "pytest" in test
    ci = (Path(__file__).parents[2] / ".ci" / "run").read_text(encoding="utf-8")
    assert test.strip() in ci, "CI must run the README's test command"


def test_readme_example_plugin_works_as_written(tmp_path, make_server):
    plugin = next(block for block in code_blocks("python") if "class NoBouncesToBob" in block)
    assert "`site_plugins/no_bounces_to_bob.py`" in README  # where the README puts it
    (tmp_path / "site_plugins").mkdir()
    (tmp_path / "site_plugins" / "no_bounces_to_bob.py").write_text(plugin, encoding="utf-8")
    ini = next(block for block in code_blocks("ini") if "[[no_bounces_to_bob]]" in block)
    plugins = ini.split("[plugins]", 1)[1]
    server = make_server(plugins=plugins, plugin_dirs="site_plugins")
    with server.smtp() as client:
        client.ehlo()
        assert client.mail("<>")[0] == 250
        assert client.rcpt("bob@example.test") == (550, b"5.7.1 bob does not take bounces")
        assert client.rcpt("alice@example.test")[0] == 250
        client.rset()
        assert client.mail("someone@client.test")[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250


def test_swaks_reaches_the_ipv6_listener_as_the_readme_says(make_server):
    assert "`--server ::1 --port 2525`" in README and "`libio-socket-inet6-perl`" in README
    server = make_server(listen="[::1]:0")
    result = subprocess.run(["swaks", "--server", "::1", "--port", str(server.port), "--from", "you@client.test",
                             "--to", "postmaster@example.test", "--timeout", "10"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250 " in result.stdout and "Queued" in result.stdout

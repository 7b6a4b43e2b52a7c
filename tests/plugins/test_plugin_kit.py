"""The plugin author's kit: the harness, the pytest fixtures, the dry run, plugin packages.

The harness (``qpgevent.testing.PluginHarness``) loads plugins through the real config
reader and loader and plays sessions through the real Session over a socketpair; the
fixtures come from ``qpgevent.testing.pytest_plugin`` (the ``pytest11`` entry point). A package
made by ``tools/new_plugin.py`` is installed with pip into a new venv and loaded by its
entry point name by a running server.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from qpgevent.core.errors import PluginLoadError
from qpgevent.testing import PluginHarness, ServerProcess, maildir_messages, strip_trace, write_ini
from qpgevent.testing.dns import blocklist_zone

ROOT = Path(__file__).resolve().parents[2]
ACCEPT = "[[rcpt_ok]]\n  domains = example.test\n[[queue/discard]]\n"
SESSION = ["EHLO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<bob@example.test>",
           "RCPT TO:<bob@elsewhere.test>", "DATA", "Subject: hi\n\n.a dotted line\n", "QUIT"]


def test_run_session_gives_the_replies_a_client_reads_and_every_decision(tmp_path):
    harness = PluginHarness(tmp_path, "rcpt_ok", domains=["example.test"], after="[[queue/discard]]")
    transcript = harness.run_session(SESSION)
    assert transcript.codes == [220, 250, 250, 250, 550, 354, 250, 221]
    assert transcript.replies[4] == (550, "5.7.1 Relaying denied")
    assert transcript.replies[6] == (250, "2.0.0 Queued (discarded)")
    assert [str(d) for d in transcript.decisions] == [
        "rcpt: rcpt_ok -> OK", "rcpt: rcpt_ok -> DENY '5.7.1 Relaying denied'",
        "queue: queue/discard -> OK 'Queued (discarded)'"]
    assert transcript.closed
    assert "C: RCPT TO:<bob@elsewhere.test>\n     rcpt: rcpt_ok -> DENY" in transcript.format()


def test_the_message_is_sent_dot_stuffed_and_delivered_as_written(tmp_path):
    harness = PluginHarness(tmp_path, "rcpt_ok", domains=["example.test"],
                            after=f"[[queue/maildir]]\n  path = {tmp_path / 'Maildir'}")
    transcript = harness.run_session(SESSION[:3] + ["DATA", "Subject: hi\n\n.a dotted line\n..two\n"])
    assert transcript.codes[-1] == 250
    [message] = maildir_messages(tmp_path / "Maildir").values()
    assert strip_trace(message) == b"Subject: hi\r\n\r\n.a dotted line\r\n..two\r\n"


def test_refused_data_skips_the_message_and_a_closing_reply_ends_the_script(tmp_path):
    harness = PluginHarness(tmp_path, "rcpt_ok", domains=["example.test"])
    transcript = harness.run_session(["EHLO c.test", "MAIL FROM:<>", "RCPT TO:<x@elsewhere.test>", "DATA",
                                      "QUIT is the message, never sent", "QUIT", "NOOP"])
    assert transcript.codes == [220, 250, 250, 550, 554, 221]
    assert transcript.closed


def test_run_hook_goes_through_the_runner_and_the_reply_table(tmp_path):
    harness = PluginHarness(tmp_path, "rcpt_ok", domains=["example.test"])
    refused = harness.run_hook("rcpt", "bob@elsewhere.test")
    assert (refused.code, refused.reply.code, refused.reply.enhanced) == ("DENY", 550, "5.7.1")
    accepted = harness.run_hook("rcpt", "<bob@example.test>")
    assert accepted.reply.to_bytes() == b"250 2.1.5 <bob@example.test>, recipient ok\r\n"
    with pytest.raises(TypeError, match="takes"):
        harness.run_hook("helo")


def test_a_plugin_from_a_file_and_its_options_validated_by_the_real_loader(tmp_path):
    plugin = tmp_path / "lib" / "say_no.py"
    plugin.parent.mkdir()
    plugin.write_text('"""say_no: refuse every HELO."""\nfrom qpgevent.plugin import DENY, Plugin\n\n\n'
                      'class SayNo(Plugin):\n    configspec = "why = string(default=no)"\n\n'
                      '    def hook_ehlo(self, session, host):\n        return DENY, self.config["why"]\n')
    harness = PluginHarness(tmp_path, plugin, why="not today")
    assert harness.run_session(["EHLO c.test"]).replies[1] == (550, "5.7.1 not today")
    (tmp_path / "again").mkdir()
    with pytest.raises(PluginLoadError, match="wrong"):
        PluginHarness(tmp_path / "again", plugin, wrong="option")


def test_fixtures_dnsbl_against_a_loopback_nameserver(plugin_harness, loopback_dns):
    dns = loopback_dns(blocklist_zone("zen.test", {"192.0.2.9": ("127.0.0.2", "Listed: test entry")}))
    harness = plugin_harness("dnsbl", zones=["zen.test"], dns=dns, after=ACCEPT)
    listed = harness.run_session(["EHLO client.test"], ip="192.0.2.9")
    assert listed.codes == [554] and listed.closed
    assert "zen.test" in listed.replies[0].text
    assert harness.run_session(["EHLO client.test", "QUIT"], ip="192.0.2.10").codes == [220, 250, 221]


def test_qpgevent_server_fixture_is_the_real_server(qpgevent_server):
    server = qpgevent_server()
    with server.smtp() as client:
        assert client.ehlo()[0] == 250


# -- qpgevent plugin test: the dry run ------------------------------------------

def dry_run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qpgevent", "plugin", "test", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_dry_run_of_one_plugin_prints_decisions_and_replies(tmp_path):
    (tmp_path / "message.txt").write_text("Subject: hello\n\nbody\n")
    result = dry_run("rcpt_ok", "-o", "domains=example.test", "--ip", "192.0.2.7", "--helo", "h.test",
                     "--from", "a@client.test", "--to", "bob@example.test", "--to", "x@elsewhere.test",
                     "--message", "message.txt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "C: EHLO h.test\nS: 250-mx.example.test Hi there [192.0.2.7]" in out
    assert "C: RCPT TO:<x@elsewhere.test>\n     rcpt: rcpt_ok -> DENY '5.7.1 Relaying denied'\n" \
           "S: 550 5.7.1 Relaying denied" in out
    assert "S: 250 2.0.0 Queued (dry run: not delivered)" in out
    assert out.rstrip().endswith("result: accepted")


def test_dry_run_of_the_configured_chain_delivers_nothing(tmp_path):
    ini = write_ini(tmp_path, ACCEPT.replace("[[queue/discard]]", "[[queue/maildir]]\n  path = Maildir"))
    result = dry_run("-c", str(ini), "--to", "x@elsewhere.test", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "plugins: rcpt_ok, dry-run-queue" in result.stdout
    assert "S: 554 5.5.1 No valid recipients" in result.stdout
    assert not (tmp_path / "Maildir").exists()


def test_dry_run_errors_are_one_line_and_exit_2(tmp_path):
    result = dry_run("no_such_plugin", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown plugin 'no_such_plugin'" in result.stderr


def test_the_server_command_line_is_unchanged(tmp_path):
    ini = write_ini(tmp_path)
    result = subprocess.run([sys.executable, "-m", "qpgevent", "-c", str(ini), "--check-config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith(f"{ini}: OK")


# -- a plugin as a package ------------------------------------------------------

@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """tools/new_plugin.py sender_block, pip-installed into a new venv that sees this one's packages."""
    root = tmp_path_factory.mktemp("package")
    subprocess.run([sys.executable, str(ROOT / "tools" / "new_plugin.py"), "sender_block", "--dir", str(root)],
                   check=True, capture_output=True, timeout=60)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # qpgevent and its dependencies from the venv running these tests: no network needed.
    Path(site, "zz_base_venv.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    # With setuptools and wheel at hand the build needs no network; else pip fetches them (PyPI).
    offline = subprocess.run([str(python), "-c", "import setuptools, wheel"], capture_output=True).returncode == 0
    flags = ["--no-build-isolation", "--no-index"] if offline else []
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", *flags,
                              str(root / "qpgevent-sender-block")], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    return root / "qpgevent-sender-block", python


def test_a_scaffolded_package_installs_and_a_running_server_loads_it_by_name(installed_plugin, tmp_path):
    package, python = installed_plugin
    ini = write_ini(tmp_path, "[[sender_block]]\n  domains = spam.example\n" + ACCEPT)
    server = ServerProcess(ini, python=str(python))
    try:
        with server.smtp() as client:
            client.ehlo()
            assert client.mail("a@mx.spam.example") == (550, b"5.7.1 mail from spam.example is not accepted here")
            assert client.mail("a@good.example")[0] == 250
            assert client.rcpt("bob@example.test")[0] == 250
    finally:
        assert server.terminate() == 0


def test_a_scaffolded_package_passes_its_own_tests_with_the_pytest_plugin(installed_plugin):
    package, python = installed_plugin
    result = subprocess.run([str(python), "-m", "gevent.monkey", "--module", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests"], cwd=package, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_the_scaffold_refuses_a_bad_name_and_an_existing_folder(tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "new_plugin.py")]
    bad = subprocess.run([*tool, "Bad-Name", "--dir", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "lower case" in bad.stderr
    assert subprocess.run([*tool, "twice", "--dir", str(tmp_path)], capture_output=True).returncode == 0
    again = subprocess.run([*tool, "twice", "--dir", str(tmp_path)], capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr


def fake_distribution(folder: Path, name: str, entry_points: str, module: str = "", source: str = "") -> None:
    """An installed distribution as importlib.metadata sees one: a dist-info folder on sys.path."""
    info = folder / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[qpgevent.plugins]\n{entry_points}\n")
    if module:
        (folder / f"{module}.py").write_text(source)


def test_entry_points_load_by_name_and_two_claims_on_one_name_are_an_error(tmp_path, monkeypatch):
    site = tmp_path / "site"
    fake_distribution(site, "qpgevent_say_hi", "say_hi = qpgevent_say_hi\ntwice = qpgevent_say_hi",
                      "qpgevent_say_hi", '"""say_hi: HELP says hi."""\nfrom qpgevent.plugin import OK, Plugin\n\n\n'
                      'class SayHi(Plugin):\n    def hook_help(self, session, argument):\n        return OK, "hi"\n')
    fake_distribution(site, "other", "twice = other_module")
    monkeypatch.syspath_prepend(str(site))
    (tmp_path / "a").mkdir()
    harness = PluginHarness(tmp_path / "a", "say_hi")
    assert harness.run_session(["HELP"]).replies[1] == (214, "2.0.0 hi")
    (tmp_path / "b").mkdir()
    with pytest.raises(PluginLoadError, match="entry point twice is ambiguous: other_module, qpgevent_say_hi"):
        PluginHarness(tmp_path / "b", "twice")

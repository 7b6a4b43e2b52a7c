"""Claims of the README and the guides that are written by hand, checked against the code.

The bundled-plugin list against ``plugins/``; the install line against the install
script; the migration guide's rows against the plugins' configspecs and the hook table;
and the promise that an operator's own plugins, in the documented site folder, never
break the project's own tests.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from configobj import ConfigObj

from qpgevent.engine.hooks import HOOKS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
MIGRATING = (ROOT / "docs" / "migrating.md").read_text(encoding="utf-8")
BUNDLED = sorted(path.relative_to(ROOT / "plugins").with_suffix("").as_posix()
                 for path in (ROOT / "plugins").rglob("*.py"))


def plugin_configspec(name: str) -> str:
    source = (ROOT / "plugins" / f"{name}.py").read_text(encoding="utf-8")
    return re.search(r"configspec = (.*?)\n\n", source, re.DOTALL).group(1)


def test_the_readme_lists_every_bundled_plugin_and_no_other():
    paragraph = README[README.index("Bundled plugins ("):]
    paragraph = paragraph[:paragraph.index("\n\n")].split("):", 1)[1]
    listed = re.findall(r"`([a-z_/]+)`", paragraph.split(".\n", 1)[0] + ".")
    assert sorted(set(listed)) == BUNDLED


def test_the_readme_install_lines_come_in_the_order_a_bare_machine_needs():
    first_command = README.index("```sh\npython3 -m venv")
    assert README.index("python3-venv") < first_command, "the python3-venv hint must come before the command"
    assert "the Debian packages listed in `tools/install-test-deps`" in README
    script = (ROOT / "tools" / "install-test-deps").read_text(encoding="utf-8")
    assert "libio-socket-inet6-perl" in script and "libio-socket-inet6-perl" in README


def test_the_readme_plugin_goes_in_the_site_folder_the_shipped_config_names_and_git_ignores():
    assert "`site_plugins/no_bounces_to_bob.py`" in README
    shipped = ConfigObj(str(ROOT / "qpsmtpd.ini"), interpolation=False)
    assert shipped["server"]["plugin_dirs"] == "site_plugins"
    assert "/site_plugins/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_migrating_lists_naughtys_reject_at_stages_from_its_configspec():
    row = re.search(r"\| `naughty` \| `naughty` \| `reject_at` \(([^)]*)\)", MIGRATING).group(1)
    choices = re.findall(r'"(\w+)"', plugin_configspec("naughty").split("default=")[0])
    assert [stage.strip() for stage in row.split(",")] == choices


def test_migrating_says_dkim_signs_as_it_does():
    assert "sign_keys" in plugin_configspec("dkim")
    assert "no signing" not in MIGRATING
    assert "| `dkim` | `dkim` | verifies" in MIGRATING and "signs mail from authenticated users" in MIGRATING


def test_migrating_does_not_equate_data_headers_end_with_data_post_headers():
    assert "data_headers_end" in HOOKS and "data_post_headers" not in HOOKS
    assert "(qpsmtpd's `data_post_headers`)" not in MIGRATING
    assert "qpsmtpd's `data_post_headers`" in MIGRATING and "has no hook of its own here" in MIGRATING


@pytest.fixture
def site_plugin():
    """An operator's plugin in the checkout's site folder, as the README says; removed after."""
    folder = ROOT / "site_plugins"
    made = not folder.exists()
    folder.mkdir(exist_ok=True)
    path = folder / f"operator_{uuid.uuid4().hex[:8]}.py"
    # Undocumented, no Example, no Options part: everything the bundled plugins' tests refuse.
    path.write_text('from qpgevent.plugin import Plugin\n\n\nclass Mine(Plugin):\n'
                    '    configspec = "secret = string(default=x)"\n\n'
                    '    def hook_rcpt(self, session, recipient, params):\n        return None\n', encoding="utf-8")
    yield path
    path.unlink()
    if made and not any(folder.iterdir()):
        folder.rmdir()


def test_a_site_plugin_in_the_checkout_breaks_no_docs_test(site_plugin):
    check = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_docs.py"), "--check"], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    # The tests that check every bundled plugin's docs and imports find them where these do.
    for name in ("test_docs", "test_layers"):
        module = _load(ROOT / "tests" / "unit" / f"{name}.py")
        seen = module.PLUGINS if name == "test_docs" else module.plugin_files()
        assert seen and site_plugin not in seen and all(ROOT / "plugins" in path.parents for path in seen)
    ignored = subprocess.run(["git", "check-ignore", "-q", str(site_plugin)], cwd=ROOT)
    assert ignored.returncode == 0 or not (ROOT / ".git").exists(), "git must ignore the site folder"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"docs_claims_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reload_page_cites_real_tests_and_the_hook_table_has_no_teardown():
    page = (ROOT / "docs" / "reloading.md").read_text(encoding="utf-8")
    cited = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", page)
    assert len(cited) >= 3
    for path, name in cited:
        source = (ROOT / path).read_text(encoding="utf-8")
        assert not name or f"def {name}(" in source, f"{path}::{name} does not exist"
    assert not [hook for hook in HOOKS if re.search(r"teardown|shutdown|close|unload", hook)]
    assert "reload complete: every worker runs generation" in (ROOT / "qpgevent" / "server" / "reload.py").read_text()
    assert "`reload complete: every worker runs generation N`" in page

"""The standard ``reject`` / ``reject_type`` options: honoured by every plugin that takes them,
refused at load by every plugin that does not.

Every bundled plugin either declares them (``reject_options``) or refuses them with one line
naming the ini file and line, the plugin, its file and the key. Each plugin that declares
them is driven, through the plugin harness (the real loader, session and hook runner, real
NSD on loopback for the DNS checks), into the refusal it exists for; then the same session
is played with each value of the options:

- the default: the plugin refuses, with its default type (5xx, or 4xx for the checks whose
  refusals are temporary by nature);
- ``reject = 0``: the plugin refuses nothing (it only logs);
- ``reject_type = temp`` (``perm`` for the temporary ones): the other class of reply;
- ``reject = naughty``: nothing at the plugin's own hook, the refusal recorded in the
  plugin's connection result; the ``naughty`` plugin refuses at DATA, with the plugin's
  text (for the checks before DATA; a check at data_post has no later hook to defer to).
"""

from __future__ import annotations

import importlib.util
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
from configobj import ConfigObj

from qpgevent.core.errors import PluginLoadError
from qpgevent.engine.loader import bundled_plugin_dir
from qpgevent.plugin import DENY, DENYSOFT, Plugin
from qpgevent.testing import PluginHarness
from qpgevent.testing.dns import LoopbackDns, blocklist_zone, ptr_zone_for

PLUGINS = bundled_plugin_dir()
IP = "192.0.2.9"
ENVELOPE = ["EHLO client.example.test", "MAIL FROM:<alice@sender.test>", "RCPT TO:<bob@example.test>", "DATA"]
MESSAGE = "From: <alice@sender.test>\nTo: <bob@example.test>\nSubject: hello\n\nhello\n"
ACCEPT = "[[rcpt_ok]]\n  domains = example.test\n[[queue/discard]]\n"
ZONES = {
    "sender.test": {"@": [("MX", "10 mail.sender.test.")], "mail": [("A", "192.0.2.25")]},
    "spf.test": {"@": [("TXT", '"v=spf1 -all"')]},
    **blocklist_zone("zen.test", {IP: ("127.0.0.2", "listed for the test")}),
    "dbl.test": {"spam.test": [("A", "127.0.1.2")]},
    "multi.test": {"spam.test": [("A", "127.0.0.2")]},
    **ptr_zone_for("192.0.2.0/24", {}),
}


@dataclass
class Case:
    """How to make ``plugin`` refuse: its options, the session, which reply is the refusal."""

    plugin: str
    options: dict = field(default_factory=dict)
    script: list = field(default_factory=lambda: ENVELOPE + [MESSAGE, "QUIT"])
    refused: int = 2  #: the index of the refused reply (0 is the greeting)
    ip: str = IP
    after: str = ACCEPT
    files: dict = field(default_factory=dict)  #: file name -> text, written beside the ini
    dns: bool = False
    #: Whether ``reject = naughty`` can reach the naughty plugin: not for rcpt_ok, whose
    #: recipient, accepted by nobody, is refused by the core (450) before DATA.
    deferrable: bool = True


CASES = [
    Case("badmailfrom", {"list": ["@sender.test"]}),
    Case("badmailfromto", {"list": ["@sender.test bob@example.test"]}, refused=3),
    Case("badrcptto", {"list": ["bob@example.test"]}, refused=3),
    Case("rcpt_ok", {"domains": ["other.test"]}, refused=3, after="[[queue/discard]]\n", deferrable=False),
    Case("rcpt_regexp", {"list": ["/^bob@/ DENY no such user"]}, refused=3),
    Case("rcpt_map", {"domain": "example.test", "file": "map"}, refused=3, files={"map": "carol OK\n"}),
    Case("helo", {}, script=["EHLO 192.0.2.9", *ENVELOPE[1:], MESSAGE, "QUIT"], refused=1),
    Case("loadcheck", {"max_load": 1, "loadavg_file": "loadavg"}, refused=0, files={"loadavg": "9.5 1 1 1/1 1\n"}),
    Case("greylisting", {}, refused=3),
    Case("limit", {"rate_rcpt_host": "1/1h"}, script=ENVELOPE[:3] + ["RCPT TO:<carol@example.test>", "DATA", MESSAGE, "QUIT"],
         refused=4),
    Case("bogus_bounce", {}, script=["EHLO client.example.test", "MAIL FROM:<>", "RCPT TO:<bob@example.test>",
                                     "RCPT TO:<carol@example.test>", "DATA", MESSAGE, "QUIT"], refused=6),
    Case("headers", {}, script=ENVELOPE + ["Subject: no From\n\nhello\n", "QUIT"], refused=5),
    Case("dnsbl", {"zones": ["zen.test"]}, refused=0, dns=True),
    Case("fcrdns", {}, refused=0, dns=True),
    Case("rhsbl", {"zones": ["dbl.test"]}, script=[ENVELOPE[0], "MAIL FROM:<a@spam.test>", *ENVELOPE[2:], MESSAGE, "QUIT"],
         dns=True),
    Case("resolvable_fromhost", {}, script=[ENVELOPE[0], "MAIL FROM:<a@nowhere.sender.test>", *ENVELOPE[2:], MESSAGE, "QUIT"],
         dns=True),
    Case("sender_permitted_from", {}, script=[ENVELOPE[0], "MAIL FROM:<a@spf.test>", *ENVELOPE[2:], MESSAGE, "QUIT"],
         dns=True),
    Case("uribl", {"zones": ["multi.test"], "action": "deny"},
         script=ENVELOPE + ["From: <alice@sender.test>\nSubject: hi\n\nsee http://www.spam.test/offer\n", "QUIT"],
         refused=5, dns=True),
]
#: Plugins that declare the options but need what this table cannot give them here; the
#: tests named drive their reject options against the real thing.
ELSEWHERE = {
    "earlytalker": "tests/plugins/test_first_plugins.py (a client that talks before the greeting)",
    "karma": "tests/plugins/test_policy_karma.py (a history in the store: the penalty box)",
    "naughty": "tests/plugins/test_dns_plugins_identity.py, test_policy_lists.py (deferred refusals)",
    "dkim": "tests/plugins/test_content_auth.py (signed mail, reject_on)",
    "dmarc": "tests/plugins/test_content_auth.py (a p=reject policy)",
    "spamassassin": "tests/plugins/test_content_scanners.py (a real spamd)",
    "rcpt_dovecot": "tests/directory/test_rcpt_dovecot.py (a real Dovecot userdb)",
    "rcpt_ldap": "tests/directory/test_ldap.py (a real slapd)",
    "rspamd": "tests/services/test_rspamd.py (a real rspamd: GTUBE with reject = 0, reject_type = temp)",
    "virus/clamdscan": "tests/plugins/test_content_scanners.py (a real clamd)",
}


def plugin_module(name: str) -> ModuleType:
    """The bundled plugin's module, imported from its file (not loaded: no options, no setup)."""
    spec = importlib.util.spec_from_file_location("reject_options." + name.replace("/", "."), PLUGINS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plugin_class(name: str) -> type[Plugin]:
    module = plugin_module(name)
    [cls] = [obj for obj in vars(module).values() if inspect.isclass(obj) and issubclass(obj, Plugin)
             and obj.__module__ == module.__name__]
    return cls


BUNDLED = sorted(path.relative_to(PLUGINS).with_suffix("").as_posix() for path in PLUGINS.rglob("*.py"))
DECLARING = [name for name in BUNDLED if plugin_class(name).reject_options]


def test_every_plugin_that_declares_the_options_is_driven_here_or_named_with_its_test():
    driven = [case.plugin for case in CASES]
    assert len(set(driven)) == len(driven) and not set(driven) & set(ELSEWHERE)
    assert sorted(driven + list(ELSEWHERE)) == sorted(DECLARING)


@pytest.mark.parametrize("name", [name for name in BUNDLED if name not in DECLARING])
@pytest.mark.parametrize("key, value", [("reject", "0"), ("reject_type", "temp")])
def test_a_plugin_that_refuses_nothing_refuses_the_options_at_load(tmp_path, name, key, value):
    example = example_options(name)
    with pytest.raises(PluginLoadError) as raised:
        PluginHarness(tmp_path, name, **{**example, key: value})
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    ini = tmp_path / "qpsmtpd.ini"
    line = next(number for number, text in enumerate(ini.read_text().splitlines(), 1) if text.strip().startswith(key))
    assert message.startswith(f"{ini}:{line}: [[{name}]] {key}: not used by {name} ({PLUGINS / name}.py)"), message


def example_options(name: str) -> dict:
    """The options of the plugin's documented example (required ones included)."""
    text = plugin_module(name).__doc__
    example = textwrap.dedent(text.split("Example::", 1)[1].split("\n\n", 2)[1])
    if "[plugins]" not in example:
        example = "[plugins]\n" + example
    sections = ConfigObj(example.splitlines(), interpolation=False)["plugins"]
    label = next(label for label in sections if label.split(":", 1)[0] == name)
    # Sub-sections (milter's [[[NAME]]]) are left out: the options are refused before they matter.
    return {key: value for key, value in sections[label].items() if not isinstance(value, dict)}


@pytest.fixture(scope="module")
def nsd():
    with LoopbackDns(ZONES) as server:
        yield server


def play(tmp_path: Path, case: Case, nsd, **options):
    folder = tmp_path / ("_".join(f"{key}-{value}" for key, value in options.items()) or "defaults")
    folder.mkdir()
    for name, text in case.files.items():
        (folder / name).write_text(text, encoding="utf-8")
    given = {key: (str(folder / value) if key in ("file", "loadavg_file") else value)
             for key, value in case.options.items()}
    after = case.after + ("[[naughty]]\n  reject_at = data\n" if options.get("reject") == "naughty" else "")
    harness = PluginHarness(folder, case.plugin, after=after, dns=nsd if case.dns else None,
                            settings={"me": "mx.example.test"}, **given, **options)
    try:
        return harness.run_session(case.script, ip=case.ip)
    finally:
        harness.services.close()


def refusals_by(transcript, plugin):
    return [d for d in transcript.decisions if d.plugin == plugin and d.code.startswith("DENY")]


@pytest.mark.parametrize("case", CASES, ids=[case.plugin for case in CASES])
def test_reject_and_reject_type_are_honoured(tmp_path, nsd, case):
    cls = plugin_class(case.plugin)
    default_code = DENYSOFT if cls.default_reject_type == "temp" else DENY
    other_type, other_code = ("perm", DENY) if default_code is DENYSOFT else ("temp", DENYSOFT)

    refused = play(tmp_path, case, nsd)
    [decision] = refusals_by(refused, case.plugin)
    assert decision.code == default_code.name, refused.format()
    reply = refused.replies[case.refused]
    assert reply.code // 100 == (4 if default_code is DENYSOFT else 5), refused.format()
    assert refused.steps[case.refused].decisions[-1] == decision, refused.format()

    tolerated = play(tmp_path, case, nsd, reject="0")
    assert not refusals_by(tolerated, case.plugin), tolerated.format()

    if "reject_type" in cls.reject_options:
        other = play(tmp_path, case, nsd, reject_type=other_type)
        [decision] = refusals_by(other, case.plugin)
        assert decision.code == other_code.name, other.format()
        assert other.replies[case.refused].code // 100 == (4 if other_code is DENYSOFT else 5), other.format()
    else:
        with pytest.raises(PluginLoadError, match=f"reject_type: not used by {case.plugin}"):
            play(tmp_path, case, nsd, reject_type=other_type)

    deferred = play(tmp_path, case, nsd, reject="naughty")
    assert not refusals_by(deferred, case.plugin), deferred.format()
    recorded = deferred.results.get(case.plugin)  # the deferred refusal, in the connection's results
    assert recorded.get("naughty") == decision_text(refused, case) and recorded.get("naughty_reject_type"), \
        deferred.format()
    by_naughty = refusals_by(deferred, "naughty")
    if case.deferrable and "DATA" in case.script and case.refused <= case.script.index("DATA"):
        [decision] = by_naughty
        assert decision.hook == "data" and decision.message[0].endswith(refused_text(refused, case)), \
            deferred.format()


def decision_text(transcript, case):
    """The text the plugin refused with (its decision's message, as it gave it)."""
    [decision] = refusals_by(transcript, case.plugin)
    return decision.message[0]


def refused_text(transcript, case):
    """The plugin's refusal text, without the enhanced status code some plugins put first."""
    text = transcript.replies[case.refused].text
    first = text.split(" ", 1)
    return first[1] if first[0].count(".") == 2 and first[0][0] in "45" else text

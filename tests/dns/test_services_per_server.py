"""Services per server: two servers in one process, each with its own ``[dns]`` and ``[store]``.

Two real NSD servers on loopback answer the same name differently; two real in-process
servers, each pointed at one of them by its ini, look the name up at connect (the
``lookup_at_connect`` test plugin, through the module-level ``qpgevent.dns`` functions
every plugin uses). Clients of both, at once, each get the greeting only when their
server saw its own nameserver's answer. The same for the state store: each server's
``[store]`` is its own file.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import gevent
import pytest

from qpgevent import dns, store
from qpgevent.backends.services import Services
from qpgevent.testing import InProcessServer, wait_until, write_ini
from qpgevent.testing.dns import LoopbackDns

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "data" / "dns_plugins"
ANSWERS = {"first": "192.0.2.1", "second": "192.0.2.2"}
CLIENTS = 40  #: per server, all at once


@pytest.fixture
def nameservers():
    """Two NSDs: mail.example.test is 192.0.2.1 on the first, 192.0.2.2 on the second."""
    started = {}
    try:
        for label, address in ANSWERS.items():
            started[label] = LoopbackDns({"example.test": {"mail": [("A", address)]}})
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture
def servers(tmp_path, nameservers):
    """Two in-process servers, each expecting its own nameserver's answer at connect."""
    running = {}
    try:
        for label, address in ANSWERS.items():
            folder = tmp_path / label
            folder.mkdir()
            ini = write_ini(folder, f"[[lookup_at_connect]]\n  expect = {address}\n[[rcpt_ok]]\n"
                                    "  domains = example.test\n[[queue/maildir]]\n  path = Maildir\n",
                            plugin_dirs=str(PLUGIN_DIR), dns_nameservers="127.0.0.1",
                            dns_port=nameservers[label].port, dns_timeout=5, store_path=str(folder / "store.sqlite"))
            running[label] = InProcessServer(ini)
        yield running
    finally:
        for server in running.values():
            server.stop(0.5)


def greeting(server):
    client = smtplib.SMTP(timeout=30)
    try:
        return client.connect(server.host, server.port)
    except smtplib.SMTPConnectError as refused:
        return refused.smtp_code, refused.smtp_error
    finally:
        client.close()


def test_two_servers_with_different_dns_each_see_their_own_answers_at_once(servers):
    jobs = {label: [gevent.spawn(greeting, server) for _ in range(CLIENTS)]
            for label, server in servers.items()}
    gevent.joinall([job for group in jobs.values() for job in group], timeout=60, raise_error=True)
    for label, group in jobs.items():
        # A wrong answer (the other server's) would be a 554 naming the address found.
        assert [job.value[0] for job in group] == [220] * CLIENTS, (label, group[0].value)
    first, second = (servers[label].services.resolver for label in ANSWERS)
    assert first is not second and first.port != second.port


LOOKUP_AT_MAIL = '''"""lookup_at_mail: looks ``name`` up at MAIL and says what it found (550). Tests only."""
from qpgevent import dns
from qpgevent.plugin import DENY, Plugin


class LookupAtMail(Plugin):
    def hook_mail(self, session, sender, params):
        return DENY, "found " + ",".join(dns.a("mail.example.test"))
'''


def test_a_parked_session_wakes_with_its_own_server_s_resolver(tmp_path, nameservers):
    """Parked between commands (no greenlet holds it), a session wakes in a new greenlet:
    the resolver it then asks is still its server's."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "lookup_at_mail.py").write_text(LOOKUP_AT_MAIL, encoding="utf-8")
    running = {}
    try:
        for label in ANSWERS:
            folder = tmp_path / label
            folder.mkdir()
            ini = write_ini(folder, "[[lookup_at_mail]]\n", plugin_dirs=str(plugins), park_after=0.05,
                            dns_nameservers="127.0.0.1", dns_port=nameservers[label].port, dns_timeout=5)
            running[label] = InProcessServer(ini)
        clients = {label: server.smtp(timeout=30) for label, server in running.items()}
        for client in clients.values():
            assert client.ehlo()[0] == 250
        wait_until(lambda: all(len(server.server.parking) == 1 for server in running.values()), 10,
                   "both sessions parked")
        for label, client in clients.items():
            assert client.mail("a@client.test") == (550, f"5.7.1 found {ANSWERS[label]}".encode()), label
            client.close()
    finally:
        for server in running.values():
            server.stop(0.5)


def test_each_server_has_its_own_store(servers):
    first, second = (servers[label].services for label in ANSWERS)
    with first.active():
        store.default().set("who", "first")
    with second.active():
        assert store.default().get("who") is None
        store.default().set("who", "second")
    with first.active():
        assert store.default().get("who") == "first"


def test_outside_any_server_the_module_functions_use_the_block_s_resolver(nameservers):
    resolvers = {label: dns.Resolver(["127.0.0.1"], server.port, timeout=5) for label, server in nameservers.items()}
    with dns.use(resolvers["first"]):
        assert dns.a("mail.example.test") == ["192.0.2.1"]
        with dns.use(resolvers["second"]):
            assert dns.a("mail.example.test") == ["192.0.2.2"]
        assert dns.a("mail.example.test") == ["192.0.2.1"]
        # A greenlet started inside a block runs with a copy of its context: the same resolver.
        assert dns.parallel([(dns.a, "mail.example.test")] * 2) == [["192.0.2.1"]] * 2
    assert dns.current() is not resolvers["first"]


def test_services_built_from_settings_follow_the_ini(tmp_path, nameservers):
    ini = write_ini(tmp_path, "", dns_nameservers="127.0.0.1", dns_port=nameservers["second"].port,
                    store_path=str(tmp_path / "mine.sqlite"))
    from qpgevent import config

    services = Services.from_settings(config.load(str(ini)))
    with services.active():
        assert dns.a("mail.example.test") == ["192.0.2.2"]
        assert dns.current() is services.resolver
        assert store.default() is services.store

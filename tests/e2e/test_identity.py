"""Who the client is: remote_host by forward-confirmed reverse DNS, remote_info by ident.

The real server (in process, and once as the ``qpgevent`` command) against a real NSD on
loopback whose zones say who 127.0.0.x and ::1 are, and a small RFC 1413 responder
written here (it has to be silent on demand, which oidentd will not do). Clients are
smtplib from 127.0.0.x source addresses. The show_notes test plugin reads back, at MAIL,
what the core wrote on the connection.
"""

from __future__ import annotations

import smtplib
import socket
import time
from pathlib import Path

import gevent
import pytest
from gevent.server import StreamServer

from qpgevent import config as config_module
from qpgevent.core.errors import ConfigError
from qpgevent.testing import DEFAULT_PLUGINS, maildir_messages
from qpgevent.testing.dns import DeadDns, LoopbackDns, SlowDnsFront, ptr_zone_for

ZONES = {
    "example.test": {
        "mx": [("A", "127.0.0.1")],
        "good": [("A", "127.0.0.2")],
        "liar": [("A", "192.0.2.99")],
        "near": [("A", "127.0.0.200")],
        "v6": [("AAAA", "::1")],
    },
    "xn--bcher-kva.test": {"mail": [("A", "127.0.0.7")]},
    **ptr_zone_for("127.0.0.0/8", {
        "127.0.0.1": "mx.example.test.",
        "127.0.0.2": "good.example.test.",
        "127.0.0.3": "liar.example.test.",
        "127.0.0.5": "near.example.test.",
        "127.0.0.6": "missing.example.test.",
        "127.0.0.7": "mail.xn--bcher-kva.test.",
    }),
    **ptr_zone_for("::/64", {"::1": "v6.example.test."}),
}
TEST_PLUGINS = str(Path(__file__).resolve().parent.parent / "data" / "identity_plugins")
SHOW_NOTES = "[[show_notes]]\n  keys = result:reverse_lookup:fcrdns\n"
MESSAGE = b"Subject: identity\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def nsd():
    with LoopbackDns(ZONES) as server:
        yield server


@pytest.fixture
def start(make_server, nsd):
    """A server asking the NSD above, with reverse_lookup on."""

    def start(plugins=DEFAULT_PLUGINS, **settings):
        settings.setdefault("dns_nameservers", "127.0.0.1")
        settings.setdefault("dns_port", nsd.port)
        settings.setdefault("dns_timeout", 2)
        settings.setdefault("reverse_lookup", "yes")
        settings.setdefault("plugin_dirs", TEST_PLUGINS)
        return make_server(plugins, **settings)

    return start


def connect(server, source="127.0.0.2"):
    client = smtplib.SMTP(server.host, server.port, local_hostname="client.example.test",
                          source_address=(source, 0), timeout=10)
    return client


def timed_greeting(server, source="127.0.0.2"):
    """(seconds until the greeting, the client), the greeting being 220."""
    started = time.monotonic()
    client = connect(server, source)
    return time.monotonic() - started, client


def ehlo_line(server, source="127.0.0.2"):
    with connect(server, source) as client:
        code, text = client.ehlo()
    assert code == 250
    return text.decode().splitlines()[0]


def notes(client):
    """What show_notes says at MAIL: {"fcrdns": ..., "remote_host": ..., "remote_info": ...};
    "fcrdns" is the outcome the core recorded in the connection's results."""
    code, text = client.mail("a@client.test")
    assert code == 450, (code, text)
    words = text.decode().split("notes: ", 1)[1].split()
    shown = dict(word.split("=", 1) for word in words)
    shown["fcrdns"] = shown.pop("result:reverse_lookup:fcrdns")
    return shown


def received(server, source="127.0.0.2"):
    """The Received header of a message sent from ``source``, unfolded."""
    with connect(server, source) as client:
        client.sendmail("a@client.test", ["bob@example.test"], MESSAGE)
    (message,) = maildir_messages(server.maildir).values()
    header = message.split(b"\r\n\r\n", 1)[0].decode()
    (line,) = [line for line in header.replace("\r\n\t", " ").replace("\r\n ", " ").split("\r\n")
               if line.startswith("Received:")]
    return line


# -- remote_host ---------------------------------------------------------------------------
def test_confirmed_name_in_the_hello_replies_and_the_received_header(start):
    server = start()
    assert ehlo_line(server) == "mx.example.test Hi good.example.test [127.0.0.2]"
    with connect(server) as client:
        assert client.helo()[1].decode() == (
            "mx.example.test Hi good.example.test [127.0.0.2]; I am so happy to meet you.")
    assert received(server).startswith("Received: from client.example.test (good.example.test [127.0.0.2])")


@pytest.mark.parametrize("source", [
    "127.0.0.3",  # liar.example.test is 192.0.2.99
    "127.0.0.4",  # no PTR
    "127.0.0.5",  # near.example.test is 127.0.0.200: close is not confirmed
    "127.0.0.6",  # missing.example.test has no address
])
def test_no_confirmed_name_no_remote_host(start, source):
    server = start()
    assert ehlo_line(server, source) == f"mx.example.test Hi there [{source}]"
    assert received(server, source).startswith(f"Received: from client.example.test (unknown [{source}])")


def test_ipv6_client_named_through_ip6_arpa(start):
    server = start(listen="[::1]:0")
    assert ehlo_line(server, "::1") == "mx.example.test Hi v6.example.test [::1]"


def test_idn_name_shown_in_a_label_form(start):
    assert ehlo_line(start(), "127.0.0.7") == "mx.example.test Hi mail.xn--bcher-kva.test [127.0.0.7]"


@pytest.mark.parametrize("source, outcome, host", [
    ("127.0.0.2", "pass", "good.example.test"),
    ("127.0.0.3", "fail", "None"),
    ("127.0.0.4", "fail", "None"),
])
def test_the_outcome_is_a_connection_note(start, source, outcome, host):
    with connect(start(SHOW_NOTES), source) as client:
        client.ehlo()
        assert notes(client) == {"fcrdns": outcome, "remote_host": host, "remote_info": "None"}


def test_reverse_lookup_off_asks_nothing(start, nsd):
    with SlowDnsFront(nsd.port, delay=0) as counter:
        server = start(dns_port=counter.port, reverse_lookup="no")
        assert ehlo_line(server) == "mx.example.test Hi there [127.0.0.2]"
        assert received(server).startswith("Received: from client.example.test (unknown [127.0.0.2])")
        assert counter.queries == 0
        server = start(SHOW_NOTES, dns_port=counter.port, reverse_lookup="no")
        with connect(server) as client:
            client.ehlo()
            assert notes(client)["fcrdns"] == "None"  # not looked up: no outcome either
        assert counter.queries == 0
        on = start(dns_port=counter.port)  # the same through the counter, reverse_lookup on
        assert ehlo_line(on) == "mx.example.test Hi good.example.test [127.0.0.2]"
        assert counter.queries == 2  # PTR, then A


def test_dead_dns_greets_within_the_timeout_without_a_name(start):
    with DeadDns() as dead:
        server = start(SHOW_NOTES, dns_port=dead.port, dns_timeout=0.5)
        elapsed, client = timed_greeting(server)
        with client:
            client.ehlo()
            assert notes(client) == {"fcrdns": "temperror", "remote_host": "None", "remote_info": "None"}
    assert 0.45 <= elapsed < 0.95, elapsed


def test_slow_dns_is_cut_at_the_timeout(start, nsd):
    with SlowDnsFront(nsd.port, delay=2.0) as slow:
        server = start(dns_port=slow.port, dns_timeout=0.4)
        elapsed, client = timed_greeting(server)
        with client:
            code, text = client.ehlo()
    assert text.decode().splitlines()[0] == "mx.example.test Hi there [127.0.0.2]"
    assert 0.35 <= elapsed < 0.9, elapsed


def test_the_reverse_and_forward_look_ups_together_keep_to_the_timeout(start, nsd):
    # Each answer comes within dns_timeout (0.4 s late, 0.5 s allowed), the two together
    # would not: the name is not confirmed, and the greeting comes at the timeout.
    with SlowDnsFront(nsd.port, delay=0.4) as slow:
        server = start(SHOW_NOTES, dns_port=slow.port, dns_timeout=0.5, dns_cache_size=0)
        elapsed, client = timed_greeting(server)
        with client:
            client.ehlo()
            assert notes(client) == {"fcrdns": "temperror", "remote_host": "None", "remote_info": "None"}
    assert 0.45 <= elapsed < 0.75, elapsed


def test_sessions_look_up_at_once(start, nsd):
    # 50 clients, each name 0.3 s away (PTR, then A: 0.6 s): 0.6 s in all, not 30 s.
    with SlowDnsFront(nsd.port, delay=0.3) as slow:
        server = start(dns_port=slow.port, dns_cache_size=0)
        started = time.monotonic()
        jobs = [gevent.spawn(ehlo_line, server) for _ in range(50)]
        gevent.joinall(jobs, timeout=20, raise_error=True)
        elapsed = time.monotonic() - started
    assert [job.value for job in jobs] == ["mx.example.test Hi good.example.test [127.0.0.2]"] * 50
    assert elapsed < 3, elapsed


def test_session_budget_bounds_the_dns_time_of_the_whole_session(start):
    # 0.6 s go on the reverse look-up at connect; helo's look-ups get the 0.4 s left;
    # after that a look-up fails at once, and the session is not kept waiting again.
    with DeadDns() as dead:
        server = start("[[helo]]\n  policy = rfc\n" + DEFAULT_PLUGINS, dns_port=dead.port,
                       dns_timeout=0.6, dns_session_budget=1.0)
        elapsed, client = timed_greeting(server)
        with client:
            started = time.monotonic()
            assert client.ehlo("good.example.test")[0] == 450
            first = time.monotonic() - started
            started = time.monotonic()
            assert client.ehlo("good.example.test")[0] == 450
            second = time.monotonic() - started
    assert 0.55 <= elapsed < 1.0, elapsed
    assert 0.3 <= first < 0.6, first
    assert second < 0.2, second


def test_no_session_budget(start):
    with DeadDns() as dead:
        server = start("[[helo]]\n  policy = rfc\n" + DEFAULT_PLUGINS, dns_port=dead.port,
                       dns_timeout=0.4, dns_session_budget=0)
        _, client = timed_greeting(server)
        with client:
            for _ in range(3):  # every look-up gets its whole timeout
                started = time.monotonic()
                assert client.ehlo("good.example.test")[0] == 450
                assert 0.35 <= time.monotonic() - started < 0.8


# -- remote_info (ident) ---------------------------------------------------------------------
class IdentResponder:
    """An RFC 1413 server on the client's address: answers ``user`` for whatever it is asked,
    or says nothing at all (``silent``) until the asker gives up."""

    def __init__(self, host="127.0.0.2", user="alice", silent=False):
        self.user, self.silent = user, silent
        self.questions: list[bytes] = []
        self.server = StreamServer((host, 0), self.handle)
        self.server.start()
        self.port = self.server.server_port

    def handle(self, sock, address):
        sock.settimeout(10)
        question = b""
        while b"\n" not in question and len(question) < 1000:
            chunk = sock.recv(1000)
            if not chunk:
                return
            question += chunk
        self.questions.append(question)
        if self.silent:
            sock.recv(1)  # until the asker closes
            return
        ports = question.decode("ascii").strip()
        sock.sendall(f"{ports} : USERID : UNIX : {self.user}\r\n".encode())

    def stop(self):
        self.server.stop(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def test_ident_answer_becomes_remote_info(start):
    with IdentResponder() as responder:
        server = start(SHOW_NOTES, ident_enabled="yes", ident_port=responder.port)
        with connect(server) as client:
            client.ehlo()
            assert notes(client)["remote_info"] == "alice"
            client_port = client.sock.getsockname()[1]
        assert responder.questions == [f"{client_port} , {server.port}\r\n".encode()]


def test_ident_answer_in_the_received_header(start):
    with IdentResponder(user="émilie") as responder:
        server = start(ident_enabled="yes", ident_port=responder.port)
        assert received(server).startswith(
            "Received: from client.example.test (émilie@good.example.test [127.0.0.2])")


def test_ident_off_asks_nothing(start):
    with IdentResponder() as responder:
        server = start(SHOW_NOTES, ident_port=responder.port)
        with connect(server) as client:
            client.ehlo()
            assert notes(client)["remote_info"] == "None"
    assert responder.questions == []


def test_silent_ident_never_holds_the_session_past_its_timeout(start):
    with IdentResponder(silent=True) as responder:
        server = start(SHOW_NOTES, ident_enabled="yes", ident_port=responder.port, ident_timeout=0.5)
        elapsed, client = timed_greeting(server)
        with client:
            client.ehlo()
            assert notes(client)["remote_info"] == "None"
        assert len(responder.questions) == 1
    assert 0.45 <= elapsed < 0.95, elapsed


def test_no_ident_service_is_no_wait(start):
    with IdentResponder() as gone:
        port = gone.port  # a port nobody listens on once it is stopped
    server = start(SHOW_NOTES, ident_enabled="yes", ident_port=port, ident_timeout=5)
    elapsed, client = timed_greeting(server)
    with client:
        client.ehlo()
        assert notes(client)["remote_info"] == "None"
    assert elapsed < 0.5, elapsed


def test_ident_and_reverse_dns_run_at_once(start):
    # Each waits out its 0.6 s timeout: the greeting comes after 0.6 s, not 1.2 s.
    with DeadDns() as dead, IdentResponder(silent=True) as responder:
        server = start(SHOW_NOTES, dns_port=dead.port, dns_timeout=0.6,
                       ident_enabled="yes", ident_port=responder.port, ident_timeout=0.6)
        elapsed, client = timed_greeting(server)
        with client:
            client.ehlo()
            assert notes(client) == {"fcrdns": "temperror", "remote_host": "None", "remote_info": "None"}
    assert 0.55 <= elapsed < 1.1, elapsed


def test_ident_is_not_asked_through_a_proxy(start):
    # The client's ident service would see the balancer's connection, not ours.
    with IdentResponder(host="127.0.0.1") as responder:
        server = start(SHOW_NOTES, ident_enabled="yes", ident_port=responder.port,
                       proxy_trusted="127.0.0.1", reverse_lookup="no")
        client = smtplib.SMTP(local_hostname="client.example.test", timeout=10)
        client.sock = socket.create_connection((server.host, server.port), 10,
                                               source_address=("127.0.0.1", 0))
        client.sock.sendall(b"PROXY TCP4 127.0.0.2 192.0.2.25 40000 25\r\n")
        with client:
            assert client.getreply()[0] == 220
            client.ehlo()
            assert notes(client)["remote_info"] == "None"
    assert responder.questions == []


# -- configuration -----------------------------------------------------------------------------
def test_bad_nameserver_is_a_config_error_naming_the_line(tmp_path):
    ini = tmp_path / "qpsmtpd.ini"
    ini.write_text("[server]\n  listen = 127.0.0.1:0\n[dns]\n  timeout = 2\n"
                   "  nameservers = 127.0.0.1, ns.example.test\n[plugins]\n")
    with pytest.raises(ConfigError, match=r"qpsmtpd.ini:5: \[dns\] nameservers: 'ns.example.test' "
                                          r"is not an IP address"):
        config_module.load(str(ini))


def test_dns_and_ident_defaults(tmp_path):
    ini = tmp_path / "qpsmtpd.ini"
    ini.write_text("[server]\n  listen = 127.0.0.1:0\n[plugins]\n")
    settings = config_module.load(str(ini))
    assert (settings.dns_nameservers, settings.dns_port, settings.dns_timeout,
            settings.dns_session_budget, settings.dns_cache_size, settings.reverse_lookup) == (
        (), 53, 5.0, 30.0, 10000, True)
    assert (settings.ident, settings.ident_timeout, settings.ident_port) == (False, 2.0, 113)


def test_shipped_config_keeps_reverse_lookup_off():
    # It listens on loopback only and the tests run it: it must not ask the system resolver.
    shipped = Path(__file__).resolve().parents[2] / "qpsmtpd.ini"
    settings = config_module.load(str(shipped))
    assert settings.reverse_lookup is False
    assert settings.ident is False


def test_the_command_sets_up_the_resolver_from_the_config(server_process, nsd):
    process = server_process(dns_nameservers="127.0.0.1", dns_port=nsd.port, reverse_lookup="yes")
    with smtplib.SMTP("127.0.0.1", process.port, local_hostname="client.example.test",
                      source_address=("127.0.0.2", 0), timeout=10) as client:
        assert client.ehlo()[1].decode().splitlines()[0] == "mx.example.test Hi good.example.test [127.0.0.2]"
    assert process.terminate() == 0

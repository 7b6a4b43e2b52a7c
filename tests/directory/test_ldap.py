"""auth/ldap and rcpt_ldap against a real slapd with a test directory loaded by slapadd.

The directory (directory_daemons.PEOPLE): alice (mail alice@example.test, mailLocalAddress
a.example@example.test) and bob (mail bob@example.test, mailRoutingAddress
bob@elsewhere.test: an alias), each with a password.
"""

from __future__ import annotations

import gevent
import psutil
import pytest
import trustme

from qpgevent.address import Address
from qpgevent.testing import maildir_messages, plugin_section as section

from directory_daemons import PEOPLE, SUFFIX, LoopbackSlapd
from directory_smtp import auth_code as login, rcpt_replies as rcpt
from tls_helpers import write_users

ALICE_PW = PEOPLE["alice"]["userPassword"]
QUEUE = "[[rcpt_ok]]\n  domains = example.test, other.test\n[[queue/maildir]]\n  path = Maildir\n  mailbox = %d/%l\n"


# -- auth/ldap ---------------------------------------------------------------------


def auth_ldap(slapd, **options: str) -> str:
    return section("auth/ldap", uri=slapd.uri, base=f"ou=people,{SUFFIX}", **options)


def test_user_found_by_search_then_bound_as(tls_server, slapd):
    server = tls_server(auth_ldap(slapd, filter="(&(objectClass=inetOrgPerson)(mail=%s))") + QUEUE)
    with server.smtp(timeout=30) as client:
        client.starttls(context=server.certs.client_context())
        client.ehlo()
        client.login("alice@example.test", ALICE_PW)
        client.sendmail("alice@example.test", ["x@other.test"], b"Subject: hi\r\n\r\nvia LDAP bind\r\n")
    assert b"(authenticated as alice@example.test)" in next(iter(maildir_messages(server.maildir / "other.test" / "x").values()))
    assert login(server, "alice@example.test", ALICE_PW, "LOGIN") == 235
    assert login(server, "alice@example.test", "wrong") == 535
    assert login(server, "nobody@example.test", ALICE_PW) == 535


def test_dn_template_and_the_default_uid_filter(tls_server, slapd):
    server = tls_server(section("auth/ldap", uri=slapd.uri, dn_template=f"uid=%s,ou=people,{SUFFIX}") + QUEUE)
    assert login(server, "alice", ALICE_PW) == 235
    assert login(server, "alice", "wrong") == 535
    assert login(server, "alice,ou=people", ALICE_PW) == 535  # DN specials are escaped
    assert login(server, "alice\0", ALICE_PW, "LOGIN") == 535
    by_uid = tls_server(auth_ldap(slapd) + QUEUE)
    assert login(by_uid, "alice", ALICE_PW) == 235


@pytest.mark.parametrize("user", ["*", "al*", "alice*", "*)(uid=alice", "*)(|(mail=*", "alice@example.test)(",
                                  "alice@example.test\0", "alice@example.test\\"])
def test_filter_injection_matches_nothing(tls_server, slapd, user):
    # Unescaped, each of these would find alice's entry (or a wider set) and bind with her password.
    server = tls_server(auth_ldap(slapd, filter="(&(objectClass=inetOrgPerson)(mail=%s))") + QUEUE)
    assert login(server, user, ALICE_PW, "LOGIN") == 535


def test_back_ends_chain_with_flat_file(tls_server, slapd, tmp_path):
    write_users(tmp_path, {"carol@example.test": "carol-pw"})
    server = tls_server(auth_ldap(slapd, filter="(mail=%s)") + section("auth/flat_file", users="users.auth") + QUEUE)
    assert login(server, "carol@example.test", "carol-pw") == 235  # LDAP has no carol: DECLINED, flat_file OK
    assert login(server, "alice@example.test", ALICE_PW) == 235
    assert login(server, "carol@example.test", "wrong") == 535


def test_a_fallback_ends_the_chain(tls_server, slapd, tmp_path):
    write_users(tmp_path, {"carol@example.test": "carol-pw"})
    flat_file = section("auth/flat_file", users="users.auth")
    ldap_first = tls_server(auth_ldap(slapd, filter="(mail=%s)") + flat_file + QUEUE)
    flat_file_first = tls_server(flat_file + auth_ldap(slapd, filter="(mail=%s)") + QUEUE)
    slapd.stop()
    assert login(ldap_first, "carol@example.test", "carol-pw") == 454
    assert login(flat_file_first, "carol@example.test", "carol-pw") == 235


@pytest.mark.parametrize("on_failure, expected", [("tempfail", 454), ("reject", 535), ("accept", 235)])
def test_auth_with_slapd_down_gets_the_configured_fallback(tls_server, slapd, on_failure, expected):
    server = tls_server(auth_ldap(slapd, filter="(mail=%s)", on_failure=on_failure) + QUEUE)
    slapd.stop()
    assert login(server, "alice@example.test", ALICE_PW) == expected
    slapd.start()
    assert login(server, "alice@example.test", ALICE_PW) == 235


def test_auth_with_slapd_hung_gets_454_and_other_sessions_go_on(tls_server, slapd):
    server = tls_server(auth_ldap(slapd, filter="(mail=%s)", lookup_timeout="5") + QUEUE)
    slapd.pause()
    waiting = gevent.spawn(login, server, "alice@example.test", ALICE_PW)
    with server.smtp(timeout=30) as other:
        other.starttls(context=server.certs.client_context())
        other.sendmail("x@example.test", ["y@other.test"], b"Subject: meanwhile\r\n\r\nhello\r\n")
    assert not waiting.ready()  # the other session finished while AUTH still waits on slapd
    assert waiting.get(timeout=30) == 454
    slapd.resume()
    assert login(server, "alice@example.test", ALICE_PW) == 235


# -- rcpt_ldap ---------------------------------------------------------------------


def rcpt_ldap(slapd, **options) -> str:
    options = {"uri": slapd.uri, "base": SUFFIX, "domains": "example.test",
               "address_attributes": ["mail", "mailLocalAddress"], **options}
    return section("rcpt_ldap", **options)


def test_known_recipients_accepted_unknown_refused(make_server, slapd):
    server = make_server(rcpt_ldap(slapd) + QUEUE)
    assert rcpt(server, "alice@example.test", "A.Example@example.test", "nobody@example.test", "x@other.test") == [
        (250, b"2.1.5 <alice@example.test>, recipient ok"),
        (250, b"2.1.5 <A.Example@example.test>, recipient ok"),  # mailLocalAddress, any case
        (550, b"5.1.1 nobody@example.test: no such user here"),
        (250, b"2.1.5 <x@other.test>, recipient ok"),  # not ours to check
    ]


@pytest.mark.parametrize("recipient", ["*@example.test", '"*)(mail=*"@example.test', '"a*"@example.test',
                                       '"\\\\2a"@example.test'])
def test_recipient_filter_injection_matches_nothing(make_server, slapd, recipient):
    server = make_server(rcpt_ldap(slapd) + QUEUE)
    assert rcpt(server, recipient)[0][0] == 550


def test_nul_in_a_recipient_matches_nothing(plugin_harness, slapd):
    # SMTP cannot carry a NUL (the server refuses control characters): the plugin is asked directly.
    harness = plugin_harness("rcpt_ldap", uri=slapd.uri, base=SUFFIX, address_attributes=["mail"])
    assert harness.run_hook("rcpt", Address("alice\0", "example.test"), {}).reply.code == 550
    # slapd compares only up to an escaped NUL: this one would find alice if it were sent.
    assert harness.run_hook("rcpt", Address("alice", "example.test\0"), {}).reply.code == 550
    assert harness.run_hook("rcpt", "<alice@example.test>").reply.code == 250


def test_alias_replaces_the_recipient_in_the_envelope(make_server, slapd):
    server = make_server(rcpt_ldap(slapd, alias_attribute="mailRoutingAddress") + QUEUE)
    with server.smtp(timeout=30) as client:
        refused = client.sendmail("sender@example.net", ["bob@example.test", "alice@example.test"],
                                  b"Subject: hi\r\n\r\nfor bob and alice\r\n")
    assert refused == {}
    assert len(maildir_messages(server.maildir / "elsewhere.test" / "bob")) == 1  # bob's alias target
    assert len(maildir_messages(server.maildir / "example.test" / "alice")) == 1  # not an alias
    assert not (server.maildir / "example.test" / "bob").exists()


DATA_OK = """\"\"\"data_ok: answers OK at DATA, which ends that hook's chain.\"\"\"
from qpgevent.plugin import OK, Plugin


class DataOk(Plugin):
    def hook_data(self, session):
        return OK
"""


def test_alias_replaced_even_when_another_plugin_answers_data_first(make_server, slapd, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "data_ok.py").write_text(DATA_OK)
    server = make_server("[[data_ok]]\n" + rcpt_ldap(slapd, alias_attribute="mailRoutingAddress") + QUEUE,
                         plugin_dirs=str(plugins))
    with server.smtp(timeout=30) as client:
        client.sendmail("sender@example.net", ["bob@example.test"], b"Subject: hi\r\n\r\nfor bob\r\n")
    assert len(maildir_messages(server.maildir / "elsewhere.test" / "bob")) == 1
    assert not (server.maildir / "example.test" / "bob").exists()


@pytest.mark.parametrize("on_failure, expected", [
    ("tempfail", (451, b"4.4.3 Recipient cannot be verified now, try again later")),
    ("reject", (550, b"5.4.3 Recipient cannot be verified (directory failure)")),
    ("accept", (250, b"2.1.5 <alice@example.test>, recipient ok")),
])
def test_rcpt_with_slapd_down_gets_the_configured_fallback(make_server, slapd, on_failure, expected):
    server = make_server(rcpt_ldap(slapd, on_failure=on_failure, cache_ttl="0", negative_ttl="0") + QUEUE)
    slapd.stop()
    assert rcpt(server, "alice@example.test") == [expected]
    slapd.start()
    assert rcpt(server, "alice@example.test", "nobody@example.test")[1][0] == 550


def connections_to(port: int) -> int:
    return sum(1 for c in psutil.Process().net_connections(kind="tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def test_searches_reuse_a_connection_and_survive_a_directory_restart(make_server, slapd):
    server = make_server(rcpt_ldap(slapd, cache_ttl="0", negative_ttl="0") + QUEUE)
    for _ in range(5):
        assert [code for code, _ in rcpt(server, "alice@example.test", "nobody@example.test")] == [250, 550]
    assert connections_to(slapd.port) == 1  # ten searches, one connection kept
    slapd.stop()
    slapd.start()
    # The kept connection is dead now: the search is made again on a new one, not refused.
    assert rcpt(server, "alice@example.test") == [(250, b"2.1.5 <alice@example.test>, recipient ok")]
    assert connections_to(slapd.port) == 1


def test_answers_are_cached_within_the_ttl(make_server, slapd):
    server = make_server(rcpt_ldap(slapd, cache_ttl="600", negative_ttl="600") + QUEUE)
    assert [code for code, _ in rcpt(server, "alice@example.test", "nobody@example.test")] == [250, 550]
    slapd.stop()
    assert [code for code, _ in rcpt(server, "ALICE@example.test", "nobody@example.test", "bob@example.test")] \
        == [250, 550, 451]  # the first two from the cache; bob was never asked
    slapd.start()
    assert [code for code, _ in rcpt(server, "bob@example.test")] == [250]  # the failure was not cached


def test_rcpt_with_slapd_hung_gets_451_and_other_sessions_go_on(make_server, slapd):
    server = make_server(rcpt_ldap(slapd, lookup_timeout="5") + QUEUE)
    slapd.pause()
    waiting = gevent.spawn(rcpt, server, "alice@example.test")
    assert rcpt(server, "x@other.test")[0][0] == 250
    assert not waiting.ready()
    assert waiting.get(timeout=30) == [(451, b"4.4.3 Recipient cannot be verified now, try again later")]
    slapd.resume()
    assert rcpt(server, "alice@example.test")[0][0] == 250



def test_garbage_instead_of_ldap_is_a_failure(make_server, tls_server, nonsense):
    uri = f"ldap://{nonsense()}"
    server = make_server(section("rcpt_ldap", uri=uri, base=SUFFIX) + QUEUE)
    assert rcpt(server, "alice@example.test") == [(451, b"4.4.3 Recipient cannot be verified now, try again later")]
    server = tls_server(section("auth/ldap", uri=uri, base=SUFFIX) + QUEUE)
    assert login(server, "alice", ALICE_PW) == 454


# -- TLS to the directory ---------------------------------------------------------------


@pytest.fixture
def tls_slapd(tmp_path):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ldap-ca.pem"))
    with LoopbackSlapd(PEOPLE, tls_ca=ca) as daemon:
        yield daemon


def test_ldaps_and_starttls_verify_the_directory_certificate(make_server, tls_server, tls_slapd, caplog):
    starttls_uri = tls_slapd.uri.replace("127.0.0.1", "localhost")
    for options in ({"uri": tls_slapd.ldaps_uri}, {"uri": starttls_uri, "starttls": True}):
        trusted = make_server(section("rcpt_ldap", base=SUFFIX, ca_file="ldap-ca.pem", **options) + QUEUE)
        assert rcpt(trusted, "alice@example.test", "nobody@example.test") == [
            (250, b"2.1.5 <alice@example.test>, recipient ok"), (550, b"5.1.1 nobody@example.test: no such user here")]
        untrusted = make_server(section("rcpt_ldap", base=SUFFIX, **options) + QUEUE)  # the system's CAs
        assert rcpt(untrusted, "alice@example.test")[0][0] == 451
        server = tls_server(section("auth/ldap", base=f"ou=people,{SUFFIX}", ca_file="ldap-ca.pem", **options) + QUEUE)
        assert login(server, "alice", ALICE_PW) == 235
    by_address = tls_slapd.ldaps_uri.replace("localhost", "127.0.0.1")  # the certificate names localhost only
    server = make_server(section("rcpt_ldap", uri=by_address, base=SUFFIX, ca_file="ldap-ca.pem") + QUEUE)
    caplog.clear()
    assert rcpt(server, "alice@example.test")[0][0] == 451
    assert "doesn't match any name in ['127.0.0.1']" in caplog.text  # ldap3's name check

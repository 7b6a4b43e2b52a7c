"""auth/dovecot: SMTP AUTH checked by a real Dovecot auth service, over smtplib with STARTTLS."""

from __future__ import annotations

import gevent
import pytest

from qpgevent.core import dovecot_protocol
from qpgevent.testing import maildir_messages
from qpgevent.testing.scanners import dead_port

from directory_daemons import DOVECOT_USERS, LoopbackDovecot
from directory_smtp import auth_reply as login
from tls_helpers import USERS, write_users

DANA, DANA_PW = "dana@example.test", DOVECOT_USERS["dana@example.test"]
ALICE, ALICE_PW = "alice@example.test", USERS["alice@example.test"]  # in flat_file's users


def plugins(socket: str, *extra: str, first: str = "", after: str = "") -> str:
    options = "".join(f"  {line}\n" for line in extra)
    return (f"{first}[[auth/dovecot]]\n  socket = {socket}\n{options}{after}"
            "[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n  path = Maildir\n")


FLAT_FILE = "[[auth/flat_file]]\n  users = users.auth\n"


@pytest.mark.parametrize("where", ["inet", "unix"])
def test_dovecot_user_authenticates_and_sends(tls_server, dovecot, where):
    server = tls_server(plugins(dovecot.inet if where == "inet" else dovecot.client_socket))
    with server.smtp(timeout=30) as client:
        client.starttls(context=server.certs.client_context())
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]  # no CRAM-MD5 through Dovecot
        client.login(DANA, DANA_PW)
        client.sendmail(DANA, ["x@example.test"], b"Subject: hi\r\n\r\nvia Dovecot SASL\r\n")
    message = next(iter(maildir_messages(server.maildir).values()))
    assert b"(authenticated as dana@example.test)" in message


def test_dovecot_is_told_the_client_address_and_that_the_session_is_encrypted(tls_server, dovecot):
    server = tls_server(plugins(dovecot.client_socket))  # a unix socket: Dovecot sees no address itself
    assert login(server, DANA, DANA_PW)[0] == 235
    requests = [line for line in dovecot.log().splitlines() if "client in: AUTH" in line]
    assert len(requests) == 1
    assert "\tservice=smtp\tsecured\trip=127.0.0.1\tlip=127.0.0.1\tresp=<hidden>" in requests[0]


def test_login_mechanism_and_dovecot_that_offers_only_login(tls_server):
    with LoopbackDovecot(DOVECOT_USERS, mechanisms="login") as only_login:
        server = tls_server(plugins(only_login.inet))
        assert login(server, DANA, DANA_PW, "LOGIN")[0] == 235
        assert login(server, DANA, DANA_PW, "PLAIN")[0] == 235  # asked by LOGIN: CONT, CONT, OK
        assert login(server, DANA, "wrong", "PLAIN")[0] == 535


def test_wrong_password_and_unknown_user_get_535(tls_server, dovecot):
    server = tls_server(plugins(dovecot.client_socket, f"userdb_socket = {dovecot.userdb_socket}"))
    assert login(server, DANA, "wrong") == (535, b"5.7.8 Authentication credentials invalid")
    assert login(server, "nobody@example.test", "whatever") == (535, b"5.7.8 Authentication credentials invalid")
    assert login(server, "dana@example.test\tx", DANA_PW)[0] == 535  # a TAB cannot smuggle a field
    # LOGIN can carry a NUL, which would shift PLAIN's fields towards Dovecot: refused.
    for user, password in ((DANA + "\0", DANA_PW), (DANA, DANA_PW + "\0"), ("\0" + DANA, DANA_PW)):
        assert login(server, user, password, "LOGIN")[0] == 535


@pytest.mark.parametrize("dovecot_first", [True, False])
def test_back_ends_chain_a_user_from_each_authenticates(tls_server, dovecot, tmp_path, dovecot_first):
    write_users(tmp_path)  # alice and bob, in flat_file's users.auth
    userdb = f"userdb_socket = {dovecot.userdb_socket}"
    text = plugins(dovecot.inet, userdb, after=FLAT_FILE) if dovecot_first else plugins(dovecot.inet, userdb, first=FLAT_FILE)
    server = tls_server(text)
    assert login(server, ALICE, ALICE_PW)[0] == 235  # Dovecot does not know her: DECLINED, flat_file says OK
    assert login(server, DANA, DANA_PW)[0] == 235  # flat_file does not know her: DECLINED, Dovecot says OK
    assert login(server, ALICE, "wrong")[0] == 535
    assert login(server, "nobody@example.test", "x")[0] == 535  # nobody knows them: 535, not 454


def test_without_userdb_socket_a_dovecot_refusal_passes_to_the_next_back_end(tls_server, dovecot, tmp_path):
    write_users(tmp_path, {DANA: "flat-pw"})  # the same name in both, another password
    with_userdb = tls_server(plugins(dovecot.inet, f"userdb_socket = {dovecot.userdb_socket}", after=FLAT_FILE))
    assert login(with_userdb, DANA, "flat-pw")[0] == 535  # Dovecot knows dana: its FAIL is final
    without = tls_server(plugins(dovecot.inet, after=FLAT_FILE))
    assert login(without, DANA, "flat-pw")[0] == 235  # FAIL could be "unknown": flat_file is asked
    assert login(without, DANA, DANA_PW)[0] == 235


@pytest.mark.parametrize("on_failure, expected", [("tempfail", 454), ("reject", 535), ("accept", 235)])
def test_dovecot_down_gets_the_configured_fallback(tls_server, dovecot, on_failure, expected):
    server = tls_server(plugins(dovecot.inet, f"on_failure = {on_failure}"))
    assert login(server, DANA, DANA_PW)[0] == 235
    dovecot.stop()
    code, text = login(server, DANA, DANA_PW)
    assert code == expected
    if expected == 454:
        assert text == b"4.7.0 Temporary authentication failure"
    dovecot.start()
    assert login(server, DANA, DANA_PW)[0] == 235


def test_a_fallback_ends_the_chain_so_back_ends_that_need_no_dovecot_go_first(tls_server, dovecot, tmp_path):
    write_users(tmp_path)
    dovecot_first = tls_server(plugins(dovecot.inet, after=FLAT_FILE))
    flat_file_first = tls_server(plugins(dovecot.inet, first=FLAT_FILE))
    dovecot.stop()
    assert login(dovecot_first, ALICE, ALICE_PW)[0] == 454  # flat_file is never asked
    assert login(flat_file_first, ALICE, ALICE_PW)[0] == 235
    assert login(flat_file_first, DANA, DANA_PW)[0] == 454


def test_dovecot_passdb_failure_is_temporary(tls_server):
    with LoopbackDovecot(DOVECOT_USERS, broken_passdb=True) as broken:
        server = tls_server(plugins(broken.client_socket, "on_failure = reject"))
        assert login(server, DANA, DANA_PW)[0] == 535  # FAIL code=temp_fail: on_failure decides
        server = tls_server(plugins(broken.client_socket))
        assert login(server, DANA, DANA_PW) == (454, b"4.7.0 Temporary authentication failure")


def test_hung_dovecot_gets_454_after_the_timeout_and_other_sessions_go_on(tls_server, dovecot):
    server = tls_server(plugins(dovecot.inet, "lookup_timeout = 5"))
    dovecot.pause()
    waiting = gevent.spawn(login, server, DANA, DANA_PW)
    with server.smtp(timeout=30) as other:  # a session that needs no AUTH, meanwhile
        other.starttls(context=server.certs.client_context())
        other.sendmail("x@example.test", ["y@example.test"], b"Subject: meanwhile\r\n\r\nhello\r\n")
    assert not waiting.ready()  # the other session finished while AUTH still waits on Dovecot
    assert waiting.get(timeout=30) == (454, b"4.7.0 Temporary authentication failure")
    assert len(maildir_messages(server.maildir)) == 1
    dovecot.resume()
    assert login(server, DANA, DANA_PW)[0] == 235


def test_garbage_from_the_socket_is_a_failure_not_a_pass(tls_server, nonsense):
    server = tls_server(plugins(nonsense()))
    assert login(server, DANA, DANA_PW)[0] == 454


def test_endless_line_meets_the_line_limit_not_the_timeout(tls_server, nonsense, caplog):
    endless = nonsense(b"VERSION\t1\t2\nMECH\t" + b"A" * (dovecot_protocol.MAX_LINE + 100), hang=True)
    server = tls_server(plugins(endless, "lookup_timeout = 60"))
    assert login(server, DANA, DANA_PW)[0] == 454
    assert f"line longer than {dovecot_protocol.MAX_LINE} octets" in caplog.text


def test_bad_socket_is_a_config_error(tls_server):
    with pytest.raises(Exception, match="not host:port"):
        tls_server(plugins("nowhere"))
    server = tls_server(plugins(f"127.0.0.1:{dead_port()}"))
    assert login(server, DANA, DANA_PW)[0] == 454

"""The Dovecot auth protocol codec (sans-I/O) and the directory plugins' TTL cache, in memory."""

from __future__ import annotations

import base64

import pytest

from qpgevent.core import dovecot_protocol as dp
from qpgevent.directory import TtlCache
from qpgevent.testing import wait_until

HANDSHAKE = [b"VERSION\t1\t2", b"MECH\tPLAIN\tplaintext", b"MECH\tlogin\tplaintext",
             b"MECH\tCRAM-MD5\tdictionary\tactive", b"SPID\t22766", b"CUID\t1", b"COOKIE\tabc", b"DONE"]


def test_client_handshake_collects_mechanisms_until_done():
    handshake = dp.ClientHandshake()
    assert [handshake.feed(line) for line in HANDSHAKE] == [False] * 7 + [True]
    assert handshake.mechanisms == {"PLAIN": ("plaintext",), "LOGIN": ("plaintext",),
                                    "CRAM-MD5": ("dictionary", "active")}


@pytest.mark.parametrize("lines, error", [
    ([b"HTTP/1.1 400 Bad Request"], "expected VERSION"),
    ([b"VERSION\t2\t0"], "version 2.0"),
    ([b"VERSION\t1\t2", b"OK\t1"], "unexpected 'OK'"),
    ([b"\xff\xfe"], "not UTF-8"),
    ([b"VERSION\t1\t2", b"MECH\tPL\x01xAIN"], "bad escape"),
    ([b"V" * (dp.MAX_LINE + 1)], "longer than"),
])
def test_handshake_refuses_what_dovecot_never_says(lines, error):
    handshake = dp.ClientHandshake()
    with pytest.raises(dp.ProtocolError, match=error):
        for line in lines:
            handshake.feed(line)


def test_auth_request_carries_the_initial_response_and_escapes_fields():
    line = dp.auth_request(7, "PLAIN", secured=True, no_penalty=True, remote_ip="192.0.2.1\tuser=x",
                           local_ip="127.0.0.1", initial=b"\0alice\0pw")
    words = line.decode().rstrip("\n").split("\t")
    assert words[:6] == ["AUTH", "7", "PLAIN", "service=smtp", "secured", "no-penalty"]
    assert words[6] == "rip=192.0.2.1\x01tuser=x"  # a TAB in a value cannot start a field
    assert base64.b64decode(words[8].removeprefix("resp=")) == b"\0alice\0pw"
    assert dp.continue_request(7, b"secret") == b"CONT\t7\tc2VjcmV0\n"
    with pytest.raises(ValueError):
        dp.escape("a\0b")


def test_escape_round_trips():
    value = "a\tb\nc\rd\x01e"
    assert "\t" not in dp.escape(value) and dp.unescape(dp.escape(value)) == value


@pytest.mark.parametrize("line, kind, fields, temporary", [
    (b"OK\t1\tuser=alice@example.test", "OK", {"user": "alice@example.test"}, False),
    (b"FAIL\t1\tuser=alice@example.test", "FAIL", {"user": "alice@example.test"}, False),
    (b"FAIL\t1\tcode=temp_fail\treason=db down", "FAIL", {"code": "temp_fail", "reason": "db down"}, True),
    (b"FAIL\t1\ttemp", "FAIL", {"temp": ""}, True),
])
def test_auth_replies(line, kind, fields, temporary):
    reply = dp.parse_auth_reply(line, 1)
    assert (reply.kind, reply.fields, reply.temporary) == (kind, fields, temporary)


def test_cont_reply_and_bad_replies():
    assert dp.parse_auth_reply(b"CONT\t3\tVXNlcm5hbWU6", 3).challenge == b"Username:"
    for line, error in ((b"CONT\t3\t***", "not base64"), (b"OK\t4", "we asked 3"), (b"DONE", "not an AUTH reply")):
        with pytest.raises(dp.ProtocolError, match=error):
            dp.parse_auth_reply(line, 3)


def test_master_protocol_lookups():
    assert dp.master_hello() == b"VERSION\t1\t1\n"
    assert dp.lookup_request(2, "USER", "bob@example.test") == b"USER\t2\tbob@example.test\tservice=smtp\n"
    handshake = dp.MasterHandshake()
    assert [handshake.feed(b"VERSION\t1\t1"), handshake.feed(b"SPID\t9")] == [False, True]
    user = dp.parse_lookup_reply(b"USER\t2\tbob@example.test\tuid=65534\thome=/h", 2)
    assert (user.found, user.user, user.fields) == (True, "bob@example.test", {"uid": "65534", "home": "/h"})
    passdb = dp.parse_lookup_reply(b"PASS\t2\tuser=bob@example.test", 2)
    assert (passdb.found, passdb.user) == (True, "bob@example.test")
    assert dp.parse_lookup_reply(b"NOTFOUND\t2", 2).found is False
    failed = dp.parse_lookup_reply(b"FAIL\t2\treason=userdb down", 2)
    assert (failed.found, failed.failed, failed.fields["reason"]) == (False, True, "userdb down")
    with pytest.raises(dp.ProtocolError):
        dp.parse_lookup_reply(b"USER\t3\tbob", 2)
    with pytest.raises(ValueError):
        dp.lookup_request(1, "LIST", "x")


def test_ttl_cache_keeps_answers_and_misses_for_their_own_ttls():
    cache = TtlCache(ttl=600, negative_ttl=0.05, size=2)
    calls = []

    def lookup(key):
        calls.append(key)
        return None if key == "nobody" else key.upper()

    assert [cache.fetch(key, lookup) for key in ("a", "a", "nobody")] == ["A", "A", None]
    assert calls == ["a", "nobody"]
    wait_until(lambda: cache.get("nobody") == (False, None), 5, "the negative answer to expire")
    assert cache.get("a") == (True, "A")
    cache.put("b", "B")
    cache.put("c", "C")  # size 2: the oldest ("a") goes
    assert cache.get("a") == (False, None) and cache.get("c") == (True, "C")
    off = TtlCache(ttl=0, negative_ttl=0, size=10)
    off.put("a", "A")
    assert off.get("a") == (False, None)

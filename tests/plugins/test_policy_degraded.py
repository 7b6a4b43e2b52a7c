"""Degraded mode: Redis goes away under the store-backed plugins, then comes back.

``[store] fail = open``: the checks are skipped (logged, counted) and mail flows;
``fail = temp``: clients get a 4xx and try later. Either way no session gets an
internal error, no process dies, and the checks are back within seconds of Redis.
The load run uses the real ``qpgevent`` command with greylisting, karma and limit.
"""

from __future__ import annotations

import collections
import smtplib
import time

import gevent
import pytest

from qpgevent import store
from qpgevent.testing import ServerProcess, wait_until, write_ini

from policy_helpers import ACCEPT, greeting, rcpt, section

GREYLISTED = (450, b"4.7.1 This mail is temporarily denied")
POLICY_FAILURE = b"4.3.0 Temporary policy failure, please try again later"


@pytest.fixture
def redis_backend(request):
    server = request.getfixturevalue("redis_server")
    if server.process is None:
        server.start()
    server.flush()
    yield server
    if server.process is None:  # the test failed while Redis was stopped
        server.start()


def policy(**greylisting) -> str:
    return (section("karma", tarpit_delay=0) + section("limit", rate_conn="1000/60", concurrency=100)
            + section("greylisting", **{"black_timeout": "1h", "grey_timeout": "2h", **greylisting}) + ACCEPT)


def test_fail_open_skips_the_checks_while_redis_is_down(make_server, redis_backend):
    server = make_server(policy(), store_backend="redis", store_url=redis_backend.url, store_retry=0.3)
    assert rcpt(server, "bob@example.test") == GREYLISTED
    degraded_before = store.stats(server.services.store_service)["degraded"]
    redis_backend.stop()
    try:
        assert greeting(server)[0] == 220  # karma and limit: skipped
        assert rcpt(server, "carol@example.test")[0] == 250  # greylisting: skipped
        assert store.stats(server.services.store_service)["down"] and store.stats(server.services.store_service)["degraded"] >= degraded_before + 3
    finally:
        redis_backend.start()
    back = time.monotonic()
    wait_until(lambda: rcpt(server, "dave@example.test") == GREYLISTED, 5, "greylisting working again", 0.1)
    assert time.monotonic() - back < 3
    assert not store.stats(server.services.store_service)["down"]


def test_fail_temp_refuses_temporarily_while_redis_is_down(make_server, redis_backend):
    server = make_server(section("greylisting", black_timeout="0", grey_timeout="1h") + ACCEPT,
                         store_backend="redis", store_url=redis_backend.url, store_fail="temp", store_retry=0.3)
    assert rcpt(server, "bob@example.test") == GREYLISTED
    assert rcpt(server, "bob@example.test")[0] == 250
    redis_backend.stop()
    try:
        assert rcpt(server, "bob@example.test") == (450, POLICY_FAILURE)
    finally:
        redis_backend.start()
    # This Redis keeps nothing across a restart: the triplet is new again once it is back.
    wait_until(lambda: rcpt(server, "bob@example.test") == GREYLISTED, 5, "greylisting working again", 0.1)


def test_fail_temp_at_connect_is_a_421(make_server, redis_backend):
    server = make_server(section("limit", rate_conn="10/60") + ACCEPT, store_backend="redis",
                         store_url=redis_backend.url, store_fail="temp")
    redis_backend.stop()
    try:
        assert greeting(server) == (421, POLICY_FAILURE.decode())
    finally:
        redis_backend.start()


# -- a load run with Redis stopped in the middle -------------------------------------------

def one_message(port: int, outcomes: collections.Counter) -> None:
    """One message; its outcome counted by reply ("250", "450 4.3.0", "421 4.3.0", ...)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="mx.client.test", timeout=15) as client:
            refused = client.sendmail("a@client.test", ["bob@example.test"], b"Subject: load\r\n\r\nhi\r\n")
            assert refused == {}
            outcomes["250"] += 1
    except smtplib.SMTPRecipientsRefused as error:
        (code, text), = error.recipients.values()
        outcomes[f"{code} {text[:5].decode()}"] += 1
    except (smtplib.SMTPConnectError, smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as error:
        outcomes[f"{error.smtp_code} {error.smtp_error[:5].decode()}"] += 1


def pids(log: str, words: str) -> set[str]:
    """The processes that logged ``words`` (the second field of a log line is the pid)."""
    return {line.split()[2] for line in log.splitlines() if words in line}


@pytest.mark.parametrize("fail, degraded_replies", [("temp", {"421 4.3.0", "450 4.3.0"}), ("open", set())])
def test_redis_stopped_during_a_load_run(tmp_path, redis_backend, fail, degraded_replies):
    ini = write_ini(tmp_path, policy(black_timeout="0", grey_timeout="1h"), store_backend="redis",
                    store_url=redis_backend.url, store_fail=fail, store_retry=0.5, store_timeout=0.5,
                    max_connections=500)
    server = ServerProcess(ini)
    outcomes: collections.Counter = collections.Counter()
    try:
        one_message(server.port, outcomes)  # the triplet's first attempt (black_timeout 0: primed)
        assert outcomes == {"450 4.7.1": 1}
        outcomes.clear()
        running = True

        def client_loop():
            while running:
                one_message(server.port, outcomes)

        clients = [gevent.spawn(client_loop) for _ in range(30)]
        wait_until(lambda: outcomes["250"] >= 100, 30, "the load run going")
        redis_backend.stop()
        stopped = dict(outcomes)
        if fail == "temp":
            wait_until(lambda: sum(outcomes[r] for r in degraded_replies) >= 30, 15, "sessions getting 4xx")
        else:
            wait_until(lambda: outcomes["250"] >= stopped["250"] + 100, 15, "mail flowing without Redis")
        redis_backend.start()
        restarted = time.monotonic()
        # Every worker that lost the store uses it again (it logs so on its first good call).
        wait_until(lambda: pids(server.log(), "store unavailable") <= pids(server.log(), "store is back"), 15,
                   "every worker using Redis again", 0.1)
        recovered, at_recovery = time.monotonic() - restarted, outcomes["250"]
        wait_until(lambda: outcomes["250"] >= at_recovery + 100, 15, "mail flowing again")
        running = False
        gevent.joinall(clients, timeout=30, raise_error=True)
        assert server.process.poll() is None, "the server died"
    finally:
        running = False
        status = server.terminate()
    log = server.log()
    assert status == 0, log
    # Never an internal error. This Redis keeps nothing across its restart, so the
    # triplet is new again: one greylisting refusal, then black_timeout 0 lets it pass.
    assert set(outcomes) <= {"250", "450 4.7.1"} | degraded_replies, outcomes
    assert outcomes["450 4.7.1"] <= 30
    assert "Traceback" not in log and "internal error" not in log.lower()
    assert pids(log, "store unavailable"), log
    assert recovered < 5  # retry is 0.5 s: back within a second or two of Redis

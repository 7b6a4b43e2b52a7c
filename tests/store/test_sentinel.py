"""The Redis store behind Sentinel: a failover is followed without a restart.

A real primary, replica and three Sentinels (``qpgevent.testing.redis_sentinel``). The
primary is killed (SIGKILL, a crash); while the Sentinels vote, store calls fail and the
plugins follow ``[store] fail``; once the replica is promoted, the same store object (the
same worker processes) reads and writes on it, and what was written before the crash is
still there.
"""

from __future__ import annotations

import smtplib

import pytest
import redis

from qpgevent.backends.store import open_store
from qpgevent.backends.store_base import StoreUnavailable
from qpgevent.testing import ServerProcess, wait_until, write_ini
from qpgevent.testing.redis_sentinel import LoopbackSentinels

GREYLISTED = (450, b"4.7.1 This mail is temporarily denied")


@pytest.fixture
def sentinels():
    with LoopbackSentinels() as group:
        yield group


def replicated(group: LoopbackSentinels) -> None:
    """Wait until the replica has everything the primary has (WAIT: Redis's own answer)."""
    with redis.Redis("127.0.0.1", group.primary.port, socket_timeout=5) as primary:
        assert primary.execute_command("WAIT", 1, 5000) == 1


def works(store) -> bool:
    try:
        store.set("after", "failover")
        return store.get("after") == "failover"
    except StoreUnavailable:
        return False


def test_the_store_follows_a_failover(sentinels):
    store = open_store("redis", sentinels=sentinels.addresses, sentinel_master=sentinels.master_name,
                       url="redis://127.0.0.1/0", timeout=0.5, retry=0.2)
    try:
        store.set("before", "the crash")
        assert store.get("before") == "the crash"
        replicated(sentinels)
        sentinels.crash_primary()
        with pytest.raises(StoreUnavailable):
            store.get("before")  # the primary is gone; the Sentinels have not voted yet
        new_port = sentinels.wait_for_failover()
        assert new_port == sentinels.replica.port
        wait_until(lambda: works(store), 15, "the store writing to the new primary", 0.1)
        assert store.get("before") == "the crash"
        with redis.Redis("127.0.0.1", new_port, decode_responses=True) as promoted:
            assert promoted.get("qpgevent:after") == "failover"  # it is the new primary that has it
    finally:
        store.close()


def rcpt(port: int, recipient: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="mx.client.test", timeout=15) as client:
        client.ehlo()
        client.mail("alice@client.test")
        return client.rcpt(recipient)


def test_greylisting_goes_on_across_a_failover_in_the_same_workers(tmp_path, sentinels):
    plugins = ("[[greylisting]]\n  black_timeout = 0\n  grey_timeout = 1h\n"
               "[[rcpt_ok]]\n  domains = example.test\n[[queue/discard]]\n")
    ini = write_ini(tmp_path, plugins, workers=2, store_backend="redis", store_url="redis://127.0.0.1/0",
                    store_sentinels=sentinels.addresses, store_sentinel_master=sentinels.master_name,
                    store_fail="temp", store_retry=0.2, store_timeout=0.5)
    server = ServerProcess(ini)
    try:
        assert rcpt(server.port, "bob@example.test") == GREYLISTED  # the triplet is recorded
        replicated(sentinels)
        sentinels.crash_primary()
        # During the vote: the configured degraded mode (fail = temp), never a 250 unchecked.
        assert rcpt(server.port, "carol@example.test") == (450, b"4.3.0 Temporary policy failure, please try again later")
        sentinels.wait_for_failover()
        # The triplet recorded before the crash is on the new primary: bob passes now.
        wait_until(lambda: rcpt(server.port, "bob@example.test")[0] == 250, 20,
                   "greylisting on the new primary", 0.2)
        assert rcpt(server.port, "dave@example.test") == GREYLISTED  # and new triplets are recorded
        log = server.log()
        assert "killed by signal" not in log and "exited with" not in log, log[-3000:]
        assert server.process.poll() is None
    finally:
        server.terminate()

"""The store's contract, the same tests on both backends (a SQLite file, a real Redis).

Values with TTLs, counters, exact sliding windows, leases and their heartbeat; atomic
across processes; a dead holder's leases lapse within the TTL; an unreachable backend
fails fast, and is used again once it is back. Waits are deadlines on a condition.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest

from qpgevent.backends.store_base import StoreUnavailable
from qpgevent.backends.store_sqlite import EmbeddedStore
from qpgevent.testing import wait_until

from store_helpers import make_store

CHILD = Path(__file__).with_name("store_child.py")


def where(store) -> str:
    return getattr(store, "url", None) or store.path


def child(mode: str, store, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gevent.monkey", str(CHILD), mode, store.backend,
                             where(store), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- values and counters -------------------------------------------------------------

def test_set_get_delete(store):
    assert store.get("missing") is None
    store.set("a", "one")
    store.set("b", 2)
    assert (store.get("a"), store.get("b")) == ("one", "2")
    store.set("a", "uno")
    assert store.get("a") == "uno"
    store.delete("a")
    store.delete("never-set")
    assert store.get("a") is None and store.get("b") == "2"


def test_a_value_lapses_at_its_ttl(store):
    started = time.monotonic()
    store.set("short", "x", ttl=0.4)
    store.set("long", "y", ttl=60)
    assert store.get("short") == "x"
    wait_until(lambda: store.get("short") is None, 5, "the value lapsing")
    assert time.monotonic() - started >= 0.35
    assert store.get("long") == "y"


def test_incr_counts_from_zero_and_each_change_renews_the_ttl(store):
    assert store.incr("n") == 1
    assert store.incr("n", 5) == 6
    assert store.incr("n", -2) == 4
    assert store.get("n") == "4"
    store.incr("t", 1, ttl=0.5)
    renewed = time.monotonic()
    store.incr("t", 1, ttl=0.5)
    wait_until(lambda: store.get("t") is None, 5, "the counter lapsing")
    assert time.monotonic() - renewed >= 0.45
    assert store.incr("t", 1, ttl=0.5) == 1  # a lapsed counter starts again from 0


def test_prefixes_keep_two_users_of_one_backend_apart(backend, request, tmp_path):
    first = make_store(backend, request, tmp_path, prefix="one:")
    second = make_store(backend, request, tmp_path, prefix="two:") if backend == "embedded" else None
    if second is None:  # the same Redis, not flushed again
        from qpgevent.backends.store_redis import RedisStore
        second = RedisStore(first.url, prefix="two:")
    try:
        first.set("k", "1")
        assert second.get("k") is None
        second.set("k", "2")
        assert first.get("k") == "1"
    finally:
        first.close()
        second.close()


# -- sliding windows ---------------------------------------------------------------

def test_hit_counts_events_and_refuses_past_the_limit(store):
    assert [store.hit("w", 3, 60) for _ in range(5)] == [1, 2, 3, 4, 4]
    assert store.count("w", 60) == 3  # refused events were not recorded
    assert store.count("other", 60) == 0
    assert store.hit("other", 3, 60) == 1  # keys are independent


def test_the_window_slides(store):
    store.hit("w", 2, 0.6)
    gevent.sleep(0.3)
    store.hit("w", 2, 0.6)
    assert store.hit("w", 2, 0.6) == 3  # full
    # The first event leaves the window before the second: room for exactly one more.
    wait_until(lambda: store.count("w", 0.6) == 1, 5, "the oldest event leaving the window")
    assert store.hit("w", 2, 0.6) == 2
    assert store.hit("w", 2, 0.6) == 3
    wait_until(lambda: store.count("w", 0.6) == 0, 5, "the window emptying")


def test_hit_is_atomic_across_processes(store):
    children = [child("hit", store, "shared", 100, 60) for _ in range(4)]
    allowed = 0
    for process in children:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        allowed += int(out)
    assert allowed == 100  # 240 attempts, exactly the limit let through
    assert store.count("shared", 60) == 100


# -- leases ----------------------------------------------------------------------------

def test_leases_up_to_the_limit_then_none_until_one_is_released(store):
    leases = [store.acquire("slots", 3) for _ in range(3)]
    assert all(leases)
    assert store.acquire("slots", 3) is None
    assert store.holders("slots") == 3
    store.release(leases[0])
    store.release(leases[0])  # twice is harmless
    assert store.holders("slots") == 2
    again = store.acquire("slots", 3)
    assert again is not None and store.acquire("slots", 3) is None
    for lease in [*leases[1:], again]:
        store.release(lease)
    assert store.holders("slots") == 0


def test_the_heartbeat_keeps_held_leases_alive_past_their_ttl(store):
    lease = store.acquire("beat", 1, ttl=0.6)
    deadline = time.monotonic() + 2.0  # more than three TTLs
    while time.monotonic() < deadline:
        assert store.holders("beat") == 1
        assert store.acquire("beat", 1, ttl=0.6) is None
        gevent.sleep(0.1)
    store.release(lease)
    assert store.acquire("beat", 1, ttl=0.6) is not None


def held(process: subprocess.Popen) -> None:
    line = process.stdout.readline()
    assert line.startswith("held"), f"{line!r} {process.stderr.read() if process.poll() is not None else ''}"


def test_the_leases_of_a_killed_holder_are_free_within_the_ttl(store):
    ttl = 3.0
    holder = child("hold", store, "per-ip", 5, ttl)
    try:
        held(holder)
        assert store.holders("per-ip") == 5
        assert store.acquire("per-ip", 5) is None
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        killed = time.monotonic()
        leases = []

        def all_five_taken_again() -> bool:
            # The holder's leases may lapse a few milliseconds apart: take each as it frees.
            lease = store.acquire("per-ip", 5, ttl=30)
            if lease is not None:
                leases.append(lease)
            return len(leases) == 5

        wait_until(all_five_taken_again, ttl + 2, "all 5 slots freeing")
        assert time.monotonic() - killed < ttl + 1
        assert store.acquire("per-ip", 5) is None
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdout.close()
        holder.stderr.close()


def test_the_leases_of_a_hung_holder_lapse_at_the_ttl(store):
    # Stopped, not dead: its pid is alive, only the missing heartbeat can free its slots.
    ttl = 1.5
    holder = child("hold", store, "hung", 2, ttl)
    try:
        held(holder)
        holder.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        assert store.acquire("hung", 2) is None
        wait_until(lambda: store.holders("hung") == 0, ttl + 2, "the hung holder's leases lapsing")
        # At most a third of the TTL passed between its last heartbeat and the stop.
        assert time.monotonic() - stopped >= ttl * 2 / 3 - 0.2
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait(10)
        holder.stdout.close()
        holder.stderr.close()


# -- failures ----------------------------------------------------------------------

def test_an_unreachable_redis_fails_fast_and_is_used_again_once_back(request, tmp_path):
    redis_server = request.getfixturevalue("redis_server")
    store = make_store("redis", request, tmp_path, retry=0.5)
    try:
        store.set("k", "v")
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="ConnectionError"):
            store.get("k")
        with pytest.raises(StoreUnavailable, match="retrying in"):
            store.get("k")  # the breaker is open: not even a connection attempt
        assert time.monotonic() - started < 0.5
        assert store.is_down and store.stats["failures"] == 1 and store.stats["fast_failures"] == 1
    finally:
        redis_server.start()
    back = time.monotonic()
    wait_until(lambda: _answers(store), 5, "the store answering again", step=0.1)
    assert time.monotonic() - back < 2  # within the retry interval and a try
    assert not store.is_down
    assert store.get("k") is None  # this Redis keeps nothing across restarts
    store.close()


def _answers(store) -> bool:
    try:
        store.get("probe")
    except StoreUnavailable:
        return False
    return True


def test_an_unusable_sqlite_path_is_unavailable_not_a_crash(tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    store = EmbeddedStore(str(tmp_path / "a-file" / "store.sqlite"), retry=0)
    with pytest.raises(StoreUnavailable):
        store.get("k")
    with pytest.raises(StoreUnavailable):
        store.acquire("k", 1)
    (tmp_path / "a-file").unlink()
    assert store.get("k") is None  # fixed: works without a restart
    store.close()


def test_a_forked_child_uses_its_own_connection(store):
    store.set("before", "fork")
    lease = store.acquire("forked", 2)
    pid = os.fork()
    if pid == 0:  # the child: the parent's lease is not its own to renew or release
        code = 0
        try:
            assert store.get("before") == "fork"
            store.set("child", "was here")
            assert store.acquire("forked", 2) is not None
            assert store.acquire("forked", 2) is None
        except BaseException:  # noqa: BLE001 - report through the exit status
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get("child") == "was here"
    store.release(lease)

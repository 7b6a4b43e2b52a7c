"""A qpgevent cluster behind HAProxy with Redis and Sentinel, under faults.

After each fault, every message that got a 250 is in exactly one host's Maildir (or, for
a message whose connection broke after its end of data, at most two: RFC 1047's window,
which the client knows about), and the client gave up on none. The lab: ``lab_cluster``.
"""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
import sys

from qpgevent.testing import wait_until

from lab_cluster import ADMIN_PORT, CONCURRENCY, HOSTS, LB, MX_HOSTS, RATE, TOKEN, Load


def progress(load: Load, at_least: int, timeout: float = 60) -> None:
    wait_until(lambda: len(load.accepted) >= at_least, timeout, f"{at_least} messages accepted "
               f"(now {len(load.accepted)}, failures {dict(load.failures)})", 0.05)


def test_mail_is_spread_over_the_hosts_with_the_clients_address(all_up):
    cluster = all_up
    load = Load()
    load.run(30, concurrency=6).join(timeout=120)
    load.check(cluster)
    assert len(load.accepted) == 30
    per_host = {name: sum(1 for m in host.messages() if load.tag.encode() in m)
                for name, host in cluster.hosts.items()}
    assert all(per_host.values()), per_host  # round robin reached every host
    # PROXY v2 carried the real client: its address, not HAProxy's, is in the Received line.
    sample = next(m for host in cluster.hosts.values() for m in host.messages() if load.tag.encode() in m)
    assert f"[{HOSTS['client'][0]}]".encode() in sample and LB.encode() not in sample.split(b"\r\n\r\n")[0]


def test_kill_9_of_one_master_mid_load(all_up):
    cluster = all_up
    load = Load()
    pool = load.run(300, concurrency=20)
    progress(load, 50)
    victim = cluster.hosts["h2"]
    victim.process.process.send_signal(signal.SIGKILL)  # its workers die with it (PDEATHSIG)
    cluster.wait_states({"h2": "DOWN"})
    pool.join(timeout=240)
    load.check(cluster)
    assert len(load.accepted) == 300
    stored_on = {name for name, host in cluster.hosts.items() if any(load.tag.encode() in m for m in host.messages())}
    assert {"h1", "h3"} <= stored_on


def test_rolling_restart_under_load_refuses_no_session(all_up):
    cluster = all_up
    load = Load()
    pool = load.run(400, concurrency=20)
    progress(load, 30)
    for name in MX_HOSTS:
        host = cluster.hosts[name]
        host.process.process.send_signal(signal.SIGTERM)  # drain_delay: /health says 503 first
        cluster.wait_states({name: "DOWN"})
        assert host.process.wait(60) == 0
        host.start()
        cluster.wait_states({name: "UP"})
    pool.join(timeout=300)
    load.check(cluster)
    assert len(load.accepted) == 400
    # Not one attempt failed: no refused connection, no session cut, no 421.
    assert load.refused_sessions == 0 and not load.failures, load.failures


def test_redis_primary_killed_mid_load(all_up):
    cluster = all_up
    load = Load()
    pool = load.run(300, concurrency=20)
    progress(load, 50)
    cluster.sentinels.crash_primary()
    during = len(load.accepted)
    cluster.sentinels.wait_for_failover(timeout=60)
    # After the failover the greylisting store works again: the load finishes, and a new
    # triplet is greylisted (recorded on the new primary) while the load's known one passes.
    pool.join(timeout=240)
    load.check(cluster)
    assert len(load.accepted) == 300
    assert any(f.startswith("450 4.3.0") for f in load.failures), load.failures  # fail = temp while it lasted
    with smtplib.SMTP(LB, 25, local_hostname="new.client.test", timeout=30) as client:
        client.ehlo()
        client.mail("new-sender@client.test")
        assert client.rcpt("carol@example.test") == (450, b"4.7.1 This mail is temporarily denied")
    assert cluster.worker_restarts() == []
    assert during < 300


def test_the_per_address_limit_holds_across_the_hosts(all_up):
    cluster = all_up
    source = HOSTS["client2"][0]
    with cluster.lab.inside("client2"):
        held, serving = [], set()
        try:
            for _ in range(CONCURRENCY):  # round robin spreads them over the hosts
                client = smtplib.SMTP(timeout=30)
                code, banner = client.connect(LB, 25)
                held.append(client)
                assert code == 220, banner
                serving.add(banner.split()[0])
            assert len(serving) >= 2, serving  # no single host holds all of them
            extra = smtplib.SMTP(timeout=30)
            assert extra.connect(LB, 25) == (421, f"4.7.0 Too many concurrent connections from {source}".encode())
            extra.close()
        finally:
            for client in held:
                client.close()

        def welcome() -> bool:
            with smtplib.SMTP(timeout=30) as again:
                return again.connect(LB, 25)[0] == 220
        # The slots come back once the others left (leases released at disconnect).
        wait_until(welcome, 30, "a session from the address once the others closed", 0.1)


def test_the_per_address_rate_holds_across_the_hosts(all_up):
    source = HOSTS["client3"][0]
    with all_up.lab.inside("client3"):
        serving = set()
        for _ in range(RATE):  # one after the other, round robin over the hosts
            with smtplib.SMTP(timeout=30) as client:
                code, banner = client.connect(LB, 25)
                assert code == 220, banner
                serving.add(banner.split()[0])
        assert len(serving) == 3, serving  # every host took some: each alone saw fewer than RATE
        with smtplib.SMTP(timeout=30) as client:
            assert client.connect(LB, 25) == (421, f"4.7.0 Connection rate limit exceeded for {source}".encode())


def cluster_status(*extra: str) -> tuple[int, dict]:
    """``qpgevent status --json`` over the three hosts' admin pages, run from the client host."""
    urls = [arg for name in MX_HOSTS for arg in ("--url", f"http://{HOSTS[name][0]}:{ADMIN_PORT}")]
    done = subprocess.run([sys.executable, "-m", "qpgevent", "status", "--json", "--token", TOKEN, *urls, *extra],
                          capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout)


def test_status_shows_every_host_and_a_draining_one(all_up):
    cluster = all_up
    with smtplib.SMTP(LB, 25, local_hostname="held.client.test", timeout=30) as held:
        held.ehlo()
        code, view = cluster_status()
        assert code == 0, view
        assert [h["health"] for h in view["hosts"]] == ["up", "up", "up"]
        assert view["total"]["up"] == 3 and view["total"]["processes"] == 3  # one worker each

        # Each worker publishes its board on its own time: wait for the HELO to be on it.
        def held_on_the_board():
            view = cluster_status()[1]
            shown = any(s["helo"] == "held.client.test" for h in view["hosts"] for s in h["status"]["sessions"])
            return shown and view
        view = wait_until(held_on_the_board, 20, "the held session's HELO on the board")
        assert view["total"]["sessions"] >= 1  # the one held open here, counted in the totals
    # A long drain for h3, so that a slow "qpgevent status" still sees it; a second TERM ends it.
    victim = cluster.hosts["h3"]
    ini = victim.ini.read_text()
    victim.ini.write_text(ini.replace("drain_delay = 2", "drain_delay = 60"))
    try:
        victim.process.terminate(60)
        victim.start()
        cluster.wait_states({"h3": "UP"})
        victim.process.process.send_signal(signal.SIGTERM)
        wait_until(lambda: cluster_status()[1]["hosts"][2]["health"] == "draining", 30, "h3 draining")
        code, view = cluster_status()
        assert code == 1 and view["total"]["up"] == 2
        victim.process.process.send_signal(signal.SIGTERM)  # the second: stop now
        assert victim.process.wait(60) == 0
    finally:
        victim.ini.write_text(ini)
    code, view = cluster_status()
    assert code == 1 and view["hosts"][2]["health"] == "unreachable" and view["total"]["up"] == 2
